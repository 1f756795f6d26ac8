"""The edge-node worker: gRPC server, stage execution, tensor codec and next-hop link."""

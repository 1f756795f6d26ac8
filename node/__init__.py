"""The ``edge-node`` worker: gRPC server, health service, authentication, limits, stage
execution, tensor codec and the next-hop link. It never plans."""

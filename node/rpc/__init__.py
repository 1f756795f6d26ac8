"""Generated gRPC stubs for proto/edgesplit.proto; regenerate with scripts/gen-proto."""

"""Generated protobuf/gRPC code; regenerate with tools/generate_protos.py."""

"""gRPC transport: protobuf ⇄ domain mapping and domain errors ⇄ gRPC status."""

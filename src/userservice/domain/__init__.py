"""Pure domain layer: rules, validation, pagination and the repository protocol (no gRPC)."""

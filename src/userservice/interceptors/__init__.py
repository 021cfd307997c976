"""gRPC server interceptors: recovery, access log and metrics, auth, rate limit (see chain)."""

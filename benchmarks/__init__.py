"""Side-by-side throughput and CPU-per-call benchmark: bare grpc.aio vs the full service."""

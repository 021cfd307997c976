"""gRPC server interceptors: recovery, access log, auth, admission, rate limit, decoding.

chain.py composes them (with tracing when OTEL_* turns it on) and says why in that order.
"""

"""gRPC server interceptors, one package per concern, composed once in chain.py.

The chain, outermost first: recovery, tracing (when OTEL_* turns it on), the access log
(logging), auth (with keys/), admission, the public-stream budget, rate limit (local and Redis)
and decoding; chain.py says why in that order. handlers.py is the behaviour shape they all
wrap, status.py the rich error statuses they refuse with, and registration.py applies the
composed chain as servicers register. Per-call state (request id, principal, scopes) lives in
``userservice.rpc_context``.
"""

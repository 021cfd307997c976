"""gRPC server interceptors, one package per concern, composed once in chain.py.

recovery, logging (the access line), metrics, requestid, auth (with keys/), admission,
ratelimit (local and Redis) and decoding are layers or parts of one; handlers.py is the
behaviour shape they all wrap, status.py the rich error statuses they refuse with, and
registration.py applies the composed chain as servicers register. Per-call state (request
id, principal, scopes) lives in ``userservice.rpc_context``.
"""

"""Authentication and authorization: bearer tokens verified, scopes checked per method.

interceptor.py is the layer; verifier.py checks a token's signature and claims; keys/ holds
where the verification keys come from (a static secret, a file, a JWKS URL).
"""

from __future__ import annotations

from userservice.interceptors.auth.interceptor import (
    ADMIN,
    READ,
    WRITE,
    AuthInterceptor,
    current_principal,
    mint_token,
)
from userservice.interceptors.auth.verifier import Principal, TokenVerifier

__all__ = [
    "ADMIN",
    "READ",
    "WRITE",
    "AuthInterceptor",
    "Principal",
    "TokenVerifier",
    "current_principal",
    "mint_token",
]

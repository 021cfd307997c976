"""The suite's one signing secret, issuer and audience, and the tokens made with them."""

from __future__ import annotations

from collections.abc import Sequence

from userservice.interceptors.auth import mint_token

TEST_JWT_SECRET = "test-secret-for-the-suite-only-0123456789abcdef"
TEST_ISSUER = "https://issuer.userservice.test"
TEST_AUDIENCE = "userservice-tests"
TEST_PAGE_TOKEN_SECRET = "page-token-secret-for-the-suite-0123456789"
ALL_SCOPES = ("users.read", "users.write", "users.admin")


def token(subject: str = "tester", scopes: Sequence[str] = ALL_SCOPES, ttl: float = 300) -> str:
    """Return an HS256 token signed with the test secret, for the test issuer and audience."""
    return mint_token(TEST_JWT_SECRET, subject, list(scopes), ttl, TEST_ISSUER, TEST_AUDIENCE)


def bearer(scopes: Sequence[str] = ALL_SCOPES, subject: str = "tester", ttl: float = 600) -> str:
    """Return an authorization header value for a freshly minted test token."""
    return "Bearer " + token(subject, scopes, ttl)

"""Fetching a JWKS document: a GET that follows no redirect, and its Cache-Control lifetime."""

from __future__ import annotations

import contextlib
import urllib.parse
import urllib.request
from collections.abc import Callable
from email.message import Message
from typing import Any, Final

from userservice.interceptors.auth.keys.source import MAX_JWKS_BYTES, KeyFetchError


def cache_seconds(headers: Message, minimum: float, maximum: float) -> float:
    """Return how long to keep a response: its max-age less its Age, within the bounds.

    Without a usable max-age (absent, ``no-cache``, ``no-store``) the minimum applies: the
    key set is refreshed as often as the floor allows.
    """
    seconds: float | None = None
    for directive in ",".join(headers.get_all("Cache-Control") or []).split(","):
        name, _, value = directive.strip().partition("=")
        name = name.lower()
        if name in ("no-cache", "no-store"):
            seconds = None
            break
        if name == "max-age":
            with contextlib.suppress(ValueError):
                seconds = float(value.strip().strip('"'))
    if seconds is None:
        return minimum
    with contextlib.suppress(TypeError, ValueError):
        seconds -= float(headers.get("Age", 0))
    return min(max(seconds, minimum), maximum)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could lead from https to http, where anyone on the path can substitute keys.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER: Final = urllib.request.build_opener(_NoRedirect)


def http_get(url: str, timeout: float) -> tuple[bytes, Message]:
    """GET url (in a worker thread); return the body and headers of a 200 answer."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 (scheme checked by config)
    with _OPENER.open(request, timeout=timeout) as response:
        if response.status != 200:
            raise KeyFetchError(f"HTTP {response.status}")
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise KeyFetchError(f"the response exceeds {MAX_JWKS_BYTES} bytes")
        return body, response.headers


Fetch = Callable[[str, float], tuple[bytes, Message]]


def display_url(url: str) -> str:
    """Return url without credentials or query, which may hold secrets: fit for logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

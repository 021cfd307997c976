"""A JWKS URL: cached per Cache-Control, refreshed in the background and on unknown kids.

The document is kept for the response's ``Cache-Control: max-age`` (clamped to a configured
floor and ceiling) and refreshed in the background before it goes stale; a token naming an
unknown ``kid`` triggers one immediate refetch, at most once per ``refetch_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from userservice.interceptors.auth.keys.http import Fetch, cache_seconds, display_url, http_get
from userservice.interceptors.auth.keys.source import (
    ChangingKeys,
    KeyFetchError,
    KeySet,
    cancel_task,
    parse_jwks,
    why,
)

_log: Final = logging.getLogger("userservice.keys")


class JwksUrlKeys(ChangingKeys):
    """A JWKS URL: cached per Cache-Control, refreshed in the background and on unknown kids."""

    def __init__(
        self,
        url: str,
        *,
        min_cache_seconds: float,
        max_cache_seconds: float,
        refetch_seconds: float,
        timeout_seconds: float,
        fetch: Fetch = http_get,
    ) -> None:
        """Fetch nothing yet: start() fetches the first key set."""
        self._url = url
        self._shown_url = display_url(url)
        self._min = min_cache_seconds
        self._max = max_cache_seconds
        self._refetch_seconds = refetch_seconds
        self._timeout = timeout_seconds
        self._fetch_blocking = fetch
        super().__init__(KeySet())
        self._body = b""
        self._fresh_until = 0.0
        self._unknown_refetch_at = -refetch_seconds
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Fetch the key set (KeyFetchError if that fails) and begin background refreshes."""
        await self._fetch()
        self._task = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    async def refresh_unknown(self) -> bool:
        """Refetch for an unknown kid, at most once per refetch interval.

        A call arriving while a fetch is under way waits for that fetch instead, so the
        first tokens signed with a new key are all accepted, not only the first one.
        """
        if self._inflight is None:
            now = time.monotonic()
            if now - self._unknown_refetch_at < self._refetch_seconds:
                return False
            self._unknown_refetch_at = now
        try:
            return await self._shared_fetch()
        except KeyFetchError as error:
            _log.warning("JWKS refetch failed, keeping the previous keys", extra=why(error))
            return False

    async def _shared_fetch(self) -> bool:
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(), name="jwks-fetch")
            self._inflight.add_done_callback(self._fetch_done)
        # Shielded: one waiting call being cancelled must not cancel the others' fetch.
        return await asyncio.shield(self._inflight)

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported

    async def _fetch(self) -> bool:
        try:
            body, headers = await asyncio.to_thread(self._fetch_blocking, self._url, self._timeout)
            keys = parse_jwks(body.decode())
        except KeyFetchError:
            raise
        except Exception as error:
            # The network and the document are outside our control: whatever fails there
            # is a failed fetch (keys kept), never a dead refresh task.
            raise KeyFetchError(f"cannot fetch the JWKS from {self._shown_url}: {error}") from error
        self._fresh_until = time.monotonic() + cache_seconds(headers, self._min, self._max)
        if body == self._body:
            return False
        self._body = body
        self._replace(keys, "JWKS fetched", {"url": self._shown_url})
        return True

    async def _refresh_loop(self) -> None:
        while True:
            delay = self._fresh_until - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                await self._shared_fetch()
            except KeyFetchError as error:
                # The identity provider is down: keep serving with the keys we have.
                _log.warning("JWKS refresh failed, keeping the previous keys", extra=why(error))
                self._fresh_until = time.monotonic() + self._min

    async def aclose(self) -> None:
        """Stop the background refresh and any fetch under way."""
        await cancel_task(self._task)
        await cancel_task(self._inflight)
        self._task = self._inflight = None

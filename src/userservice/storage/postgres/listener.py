"""The PostgreSQL store's change feed: one LISTEN connection per process wakes waiting readers.

Writers NOTIFY in their own transaction; the listener records the newest sequence and wakes
wait_for_events, which falls back to polling at its timeout if a notice is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Final

import asyncpg

from userservice.storage.postgres import queries
from userservice.storage.postgres.connection import UNAVAILABLE_ERRORS, ConnectOptions
from userservice.storage.signal import SequenceSignal

EVENTS_CHANNEL: Final = "user_events"
_KEEPALIVE_SECONDS: Final = 10.0
_MAX_BACKOFF_SECONDS: Final = 5.0

_log = logging.getLogger(__name__)


class EventListener:
    """Knows the newest committed sequence and lets readers wait for a newer one."""

    def __init__(self, url: str, options: ConnectOptions, latest_sequence: int) -> None:
        """Start from latest_sequence; run() keeps the LISTEN connection up."""
        self._url = url
        self._options = options
        self.signal = SequenceSignal(latest_sequence)
        self._failures = 0

    @property
    def latest_sequence(self) -> int:
        """The newest sequence committed anywhere, as far as this process has heard."""
        return self.signal.latest_sequence

    def wake(self, sequence: int) -> None:
        """Record that sequence committed and wake every waiter."""
        self.signal.advance(sequence)

    def close(self) -> None:
        """Release every waiter for good."""
        self.signal.close()

    async def wait(self, after_sequence: int, timeout: float) -> None:
        """Return once a sequence above after_sequence may exist, or after timeout seconds."""
        await self.signal.wait(after_sequence, timeout)

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with jittered back-off."""
        while True:
            try:
                await self._listen_once()
            except Exception as error:
                if self._failures == 0:
                    # A lost connection is expected (database restart, failover): one line
                    # naming the error. Anything else may be a bug and keeps its stack.
                    _log.warning(
                        "PostgreSQL event listener lost; watchers poll until it is back",
                        exc_info=not isinstance(error, UNAVAILABLE_ERRORS),
                        extra={"error": f"{type(error).__name__}: {error}"},
                    )
                self._failures += 1
            backoff = min(0.1 * 2 ** min(self._failures, 10), _MAX_BACKOFF_SECONDS)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self.wake(int(payload))

    async def _listen_once(self) -> None:
        conn = await asyncpg.connect(
            self._url, **self._options.connect_kwargs("userservice-listener")
        )
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(EVENTS_CHANNEL, self._on_notification)
            # Notices sent while nobody listened are gone: wake anyone behind. The
            # value is assigned, not maxed, so that after a restore of an older
            # backup watchers wait again instead of spinning on a stale high mark;
            # a write that commits after this read still NOTIFYs this listener.
            self.signal.reset(int(await conn.fetchval(queries.SELECT_LATEST_SEQUENCE)))
            if self._failures:
                _log.info("PostgreSQL event listener reconnected")
                self._failures = 0
            while not lost.is_set():
                # A periodic query notices a connection that died without a word.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_KEEPALIVE_SECONDS):
                        await lost.wait()
                if not lost.is_set():
                    await conn.fetchval(queries.PING)
            raise ConnectionResetError("the listener connection closed")
        finally:
            conn.terminate()

"""The change feed: one pump per process reads new events once and fans them out to watchers.

A watcher first replays the retained events it asked for straight from the store, one
bounded batch per query, and then attaches to the pump. The pump reads each new event
from the store once per wake-up, whatever the number of watchers, and appends it to
every attached watcher's bounded buffer. A watcher that falls further behind than its
buffer is ended with the last sequence it was sent, so it can resume without a gap,
and the server's memory stays bounded by watchers x buffer.

Erasure: the stores scrub a deleted user's earlier events in the delete's transaction, so a
read that starts after it gets them erased. What this process read before (a watcher's buffer,
a read still in flight) is erased here, as soon as the process learns of the delete: from the
service when the delete ran here (before DeleteUser returns), else when the DELETED event
arrives by a replay batch or the pump. The ids of the last ERASED_IDS_REMEMBERED deleted users
are kept, so a read that began before a delete and lands after it is erased on arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import Iterable
from typing import Final, Protocol

from userservice.domain.errors import (
    DomainError,
    SequenceExpiredError,
    ShuttingDownError,
    StorageUnavailableError,
    WatcherTooSlowError,
)
from userservice.domain.model import EventType, UserEvent

DEFAULT_BUFFER_SIZE: Final = 1024
DEFAULT_BATCH_SIZE: Final = 256
# A lost wake-up (a dropped NOTIFY) delays delivery by at most this long.
DEFAULT_POLL_SECONDS: Final = 5.0
# Far more deletes than can commit while one store read is in flight; ids are never reused,
# so erasing by a remembered id is never wrong, only forgetting one too early would be.
ERASED_IDS_REMEMBERED: Final = 4096

_log = logging.getLogger(__name__)


class EventSource(Protocol):
    """What the feed needs from a UserRepository."""

    async def events_after(self, sequence: int, limit: int) -> list[UserEvent]:
        """Return up to limit events with sequence > the given one, ascending."""
        ...

    async def wait_for_events(self, after_sequence: int, timeout: float) -> None:
        """Return once an event after after_sequence may exist, or after timeout seconds."""
        ...


class Watcher:
    """One WatchUsers stream: a replay from the store, then a bounded buffer of live events."""

    def __init__(self, feed: ChangeFeed, cursor: int, *, from_oldest: bool) -> None:
        self._feed = feed
        # Every event up to cursor is delivered or buffered; sent is the last one delivered.
        self.cursor = cursor
        self.sent = cursor
        self._from_oldest = from_oldest
        self._attached = False
        self._buffer: deque[UserEvent] = deque()
        self._arrived = asyncio.Event()
        self._error: DomainError | None = None

    async def next(self, idle_timeout: float) -> UserEvent | None:
        """Return the next event, or None once idle_timeout passes with nothing to send."""
        while not self._attached and not self._buffer:
            self._raise_if_failed()
            await self._replay_batch()
        while not self._buffer:
            self._raise_if_failed()
            self._arrived.clear()
            try:
                async with asyncio.timeout(idle_timeout):
                    await self._arrived.wait()
            except TimeoutError:
                self._raise_if_failed()
                return None
        event = self._buffer.popleft()
        self.sent = event.sequence
        return event

    def close(self) -> None:
        """Detach from the feed; called when the stream ends for any reason."""
        self._feed._detach(self)

    def _offer(self, event: UserEvent) -> None:
        if event.sequence <= self.cursor or self._error is not None:
            return
        if len(self._buffer) >= self._feed.buffer_size:
            self._fail(WatcherTooSlowError(self.sent, self._feed.buffer_size))
            return
        self._buffer.append(event)
        self.cursor = event.sequence
        self._arrived.set()

    def _erase(self, user_ids: set[str]) -> None:
        if any(event.user.id in user_ids for event in self._buffer):
            self._buffer = deque(
                event.erased() if event.user.id in user_ids else event for event in self._buffer
            )

    def _fail(self, error: DomainError) -> None:
        if self._error is None:
            self._error = error
            self._buffer.clear()
            self._arrived.set()
            self._feed._detach(self)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    async def _replay_batch(self) -> None:
        batch_size = self._feed.batch_size
        events = self._feed._admit(await self._feed.source.events_after(self.cursor, batch_size))
        # Sequences are contiguous, so a hole means retention pruned events this
        # watcher had not read yet; only a replay "from the oldest" may skip them.
        if events and events[0].sequence != self.cursor + 1 and not self._from_oldest:
            raise SequenceExpiredError(self.cursor, events[0].sequence - 1)
        self._from_oldest = False
        self._buffer.extend(events)
        if events:
            self.cursor = events[-1].sequence
        if len(events) < batch_size:
            self._attached = self._feed._attach(self)


class ChangeFeed:
    """Fans the store's new events out to every attached watcher from one pump task."""

    def __init__(
        self,
        source: EventSource,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
    ) -> None:
        if buffer_size < 1 or batch_size < 1 or not poll_seconds > 0:
            raise ValueError("buffer_size, batch_size and poll_seconds must be positive")
        self.source = source
        self.buffer_size = buffer_size
        # A pump read never exceeds one buffer, so a watcher that keeps up between two
        # reads is never ended just because one commit appended many events.
        self.batch_size = min(batch_size, buffer_size)
        self._poll_seconds = poll_seconds
        self._watchers: set[Watcher] = set()  # every open watcher, replaying or attached
        self._attached: set[Watcher] = set()
        self._cursor = 0  # the last sequence fanned out; meaningful while the pump runs
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._erased: dict[str, None] = {}  # the latest deleted ids, oldest first

    @property
    def watcher_count(self) -> int:
        """How many watchers are attached to the live fan-out."""
        return len(self._attached)

    def watch(self, after_sequence: int, *, from_oldest: bool = False) -> Watcher:
        """Return a watcher delivering every event after after_sequence, replayed then live."""
        if self._closed:
            raise ShuttingDownError()
        watcher = Watcher(self, after_sequence, from_oldest=from_oldest)
        self._watchers.add(watcher)
        return watcher

    async def close(self) -> None:
        """End every watcher with ShuttingDownError and stop the pump."""
        self._closed = True
        for watcher in list(self._watchers):
            watcher._fail(ShuttingDownError())
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    def _attach(self, watcher: Watcher) -> bool:
        """Attach a watcher that has replayed up to its cursor; False while the pump is ahead."""
        if self._closed:
            watcher._fail(ShuttingDownError())
            return False
        if self._pump is None:
            self._cursor = watcher.cursor
            # A fresh context: the pump outlives the call that starts it, so it must not carry
            # that call's request id, principal or trace span into every later read.
            self._pump = asyncio.create_task(
                self._run(), name="userservice-change-feed", context=contextvars.Context()
            )
        elif watcher.cursor < self._cursor:
            return False  # the pump already fanned out events this watcher lacks: replay on
        self._attached.add(watcher)
        return True

    def _detach(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        self._attached.discard(watcher)

    async def _run(self) -> None:
        try:
            while self._attached:
                events = self._admit(await self.source.events_after(self._cursor, self.batch_size))
                if events and events[0].sequence != self._cursor + 1:
                    self._fail_all(SequenceExpiredError(self._cursor, events[0].sequence - 1))
                for event in events:
                    for watcher in list(self._attached):
                        watcher._offer(event)
                if events:
                    self._cursor = events[-1].sequence
                if len(events) < self.batch_size and self._attached:
                    await self.source.wait_for_events(self._cursor, self._poll_seconds)
        except StorageUnavailableError as error:
            # Each watcher ends UNAVAILABLE with what it was sent, and resumes elsewhere.
            self._fail_all(error)
        except Exception:
            _log.exception("change feed pump failed")
            self._fail_all(StorageUnavailableError())
        finally:
            # Cleared in the same step the loop ends in, so an attach never finds a dead pump.
            self._pump = None

    def erase(self, user_ids: Iterable[str]) -> None:
        """Erase these deleted users' events in every buffer now and in every later read."""
        fresh = {user_id for user_id in user_ids if user_id not in self._erased}
        if not fresh:
            return
        for user_id in fresh:
            self._erased[user_id] = None
        while len(self._erased) > ERASED_IDS_REMEMBERED:
            del self._erased[next(iter(self._erased))]
        for watcher in self._watchers:
            watcher._erase(fresh)

    def _admit(self, events: list[UserEvent]) -> list[UserEvent]:
        """Return a store read as it may enter a buffer: no event of a deleted user unerased."""
        self.erase(event.user.id for event in events if event.type == EventType.DELETED)
        if not self._erased:
            return events
        return [
            event.erased() if event.user.id in self._erased and not event.user.is_erased else event
            for event in events
        ]

    def _fail_all(self, error: DomainError) -> None:
        for watcher in list(self._attached):
            watcher._fail(error)

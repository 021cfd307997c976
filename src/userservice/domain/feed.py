"""The change feed: one pump per process reads new events once into a window all watchers share.

The pump reads each new event from the store once per wake-up, whatever the number of
watchers, writes it into one ring of the most recent events (the window) and wakes the
watchers waiting for it: the work per event does not grow with the number of watchers. A
watcher holds only its position in the log (the last sequence it was sent) and takes the
next event from the window. A watcher whose position is older than the window (it asked for
history, or it read slower than the writes came and fell more than a window behind) reads
pages of retained events from the store from its position, as the first replay does, until
it reaches the window again; only the watchers behind read the store. Events are taken by
sequence from one place at a time, and sequences are contiguous, so the handover between
store and window has no gap and no repeat. Memory stays bounded by the window plus one page
per watcher reading the store, and at most DEFAULT_STORE_READERS such reads run at once.

A watcher is ended only when its position is older than the retained events
(SequenceExpiredError: retention pruned what it had not read yet), when the store fails
(StorageUnavailableError) or when the process shuts down (ShuttingDownError); the latter two
carry the last sequence it was sent, so it resumes elsewhere with no gap and no repeat.

Erasure: the stores scrub a deleted user's earlier events in the delete's transaction, so a
read that starts after it gets them erased. What this process read before (the window, a
watcher's page, a read still in flight) is erased here, as soon as the process learns of the
delete: from the service when the delete ran here (before DeleteUser returns), else when the
DELETED event arrives by a page or the pump. The ids of the last ERASED_IDS_REMEMBERED deleted
users are kept, so a read that began before a delete and lands after it is erased on arrival.
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
)
from userservice.domain.model import EventType, UserEvent

DEFAULT_WINDOW_SIZE: Final = 1024
DEFAULT_BATCH_SIZE: Final = 256
# Watchers replaying or catching up read the store at most this many at a time: a reconnect
# storm (a fleet restarting, every watch resuming) queues here instead of taking every pooled
# connection from the unary calls; each waits for a page, not for the others to finish.
DEFAULT_STORE_READERS: Final = 4
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
    """One WatchUsers stream: its position, and a page from the store while it is behind."""

    def __init__(self, feed: ChangeFeed, cursor: int, *, from_oldest: bool) -> None:
        self._feed = feed
        # Every event up to cursor is delivered or in the page; sent is the last one delivered.
        self.cursor = cursor
        self.sent = cursor
        self._from_oldest = from_oldest
        self._page: deque[UserEvent] = deque()
        self._error: DomainError | None = None

    async def next(self, idle_timeout: float) -> UserEvent | None:
        """Return the next event, or None once idle_timeout passes with nothing to send."""
        feed = self._feed
        while True:
            if self._error is not None:
                raise self._ended(self._error)
            if self._page:
                event = self._page.popleft()
                self.sent = event.sequence
                return event
            cursor = self.cursor
            if feed._pump is not None and cursor >= feed._floor:
                if cursor < feed._head:
                    # In the window: the event after cursor is in its slot, by sequence.
                    event = feed._ring[(cursor + 1) % feed.window_size]
                    self.cursor = self.sent = event.sequence
                    return event
                wake = feed._wake
                try:
                    async with asyncio.timeout(idle_timeout):
                        await wake.wait()
                except TimeoutError:
                    if self._error is not None:
                        raise self._ended(self._error) from None
                    return None
                continue
            try:
                caught_up = await self._read_page()
            except StorageUnavailableError as error:
                raise self._ended(error) from None
            if caught_up and feed._pump is None and self._error is None:
                feed._start(self.cursor)

    def close(self) -> None:
        """Leave the feed; called when the stream ends for any reason."""
        self._feed._watchers.discard(self)

    def _ended(self, error: DomainError) -> DomainError:
        """Return the error to end this stream with, naming the last sequence it was sent."""
        # Exact types: a subclass (a busy pool, a statement timeout) keeps its own code.
        if type(error) is ShuttingDownError:
            return ShuttingDownError(last_sequence=self.sent)
        if type(error) is StorageUnavailableError:
            return StorageUnavailableError(error.message, last_sequence=self.sent)
        return error

    def _erase(self, user_ids: set[str]) -> None:
        if any(event.user.id in user_ids for event in self._page):
            self._page = deque(
                event.erased() if event.user.id in user_ids else event for event in self._page
            )

    def _fail(self, error: DomainError) -> None:
        if self._error is None:
            self._error = error
            self._page.clear()

    async def _read_page(self) -> bool:
        """Read the next page after cursor from the store; True when none is left behind it."""
        feed = self._feed
        batch_size = feed.batch_size
        async with feed._store_readers:
            feed.pages_read += 1
            feed._store_reads += 1
            feed.store_reads_peak = max(feed.store_reads_peak, feed._store_reads)
            try:
                read = await feed.source.events_after(self.cursor, batch_size)
            finally:
                feed._store_reads -= 1
        events = feed._admit(read)
        if self._error is not None:
            return False
        # Sequences are contiguous, so a hole means retention pruned events this
        # watcher had not read yet; only a replay "from the oldest" may skip them.
        if events and events[0].sequence != self.cursor + 1 and not self._from_oldest:
            raise SequenceExpiredError(self.cursor, events[0].sequence - 1)
        self._from_oldest = False
        if events:
            self._page.extend(events)
            self.cursor = events[-1].sequence
        return len(events) < batch_size


class ChangeFeed:
    """Reads the store's new events once, from one pump task, into a window all watchers share."""

    def __init__(
        self,
        source: EventSource,
        *,
        window_size: int = DEFAULT_WINDOW_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        store_readers: int = DEFAULT_STORE_READERS,
    ) -> None:
        if window_size < 1 or batch_size < 1 or store_readers < 1 or not poll_seconds > 0:
            raise ValueError(
                "window_size, batch_size, store_readers and poll_seconds must be positive"
            )
        self.source = source
        self.window_size = window_size
        # A pump read never exceeds the window, so one read cannot push out events that a
        # watcher keeping up between two reads has not taken yet.
        self.batch_size = min(batch_size, window_size)
        self.pages_read = 0  # store pages read by watchers replaying or catching up
        self.store_reads_peak = 0  # the most such reads ever in flight at once
        self._store_reads = 0
        self._store_readers = asyncio.Semaphore(store_readers)
        self._poll_seconds = poll_seconds
        self._watchers: set[Watcher] = set()
        # The window: the event with sequence s (floor < s <= head) is in _ring[s % window_size].
        self._ring: list[UserEvent] = []
        self._head = 0  # the last sequence the pump read; meaningful while the pump runs
        self._floor = 0  # the window holds the events after it
        self._wake = asyncio.Event()  # set, and replaced, each time the window moves
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._erased: dict[str, None] = {}  # the latest deleted ids, oldest first

    @property
    def watcher_count(self) -> int:
        """How many watchers read from the shared window (the others read the store)."""
        if self._pump is None:
            return 0
        return sum(
            1 for watcher in self._watchers if not watcher._page and watcher.cursor >= self._floor
        )

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
        self._fail_all(ShuttingDownError())
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    def _start(self, cursor: int) -> None:
        """Start the pump after cursor, where a watcher found nothing newer in the store."""
        if self._closed:
            return
        self._head = self._floor = cursor
        # A fresh context: the pump outlives the call that starts it, so it must not carry
        # that call's request id, principal or trace span into every later read.
        self._pump = asyncio.create_task(
            self._run(), name="userservice-change-feed", context=contextvars.Context()
        )

    def _append(self, events: list[UserEvent]) -> None:
        """Put events (contiguous, after head) into the window, then wake its waiters."""
        ring, size = self._ring, self.window_size
        if not ring:
            # Slots outside the window are never read, so any event may fill them.
            ring.extend([events[0]] * size)
        for event in events:
            ring[event.sequence % size] = event
        self._head = events[-1].sequence
        self._floor = max(self._floor, self._head - size)
        self._wake.set()
        self._wake = asyncio.Event()

    async def _run(self) -> None:
        try:
            while self._watchers:
                events = self._admit(await self.source.events_after(self._head, self.batch_size))
                if events and events[0].sequence != self._head + 1:
                    # Pruned before the pump read them: the window restarts after the hole,
                    # and each watcher behind it learns from its own store read.
                    self._head = self._floor = events[0].sequence - 1
                if events:
                    self._append(events)
                if len(events) < self.batch_size and self._watchers:
                    await self.source.wait_for_events(self._head, self._poll_seconds)
        except StorageUnavailableError as error:
            # Each watcher ends UNAVAILABLE with what it was sent, and resumes elsewhere.
            self._fail_all(error)
        except Exception:
            _log.exception("change feed pump failed")
            self._fail_all(StorageUnavailableError())
        finally:
            # Cleared in the same step the loop ends in, so a watcher never waits on a dead pump.
            self._pump = None

    def erase(self, user_ids: Iterable[str]) -> None:
        """Erase these deleted users' events in the window, every page, and every later read."""
        fresh = {user_id for user_id in user_ids if user_id not in self._erased}
        if not fresh:
            return
        for user_id in fresh:
            self._erased[user_id] = None
        while len(self._erased) > ERASED_IDS_REMEMBERED:
            del self._erased[next(iter(self._erased))]
        ring = self._ring
        for slot, event in enumerate(ring):
            if event.user.id in fresh and not event.user.is_erased:
                ring[slot] = event.erased()
        for watcher in self._watchers:
            if watcher._page:
                watcher._erase(fresh)

    def _admit(self, events: list[UserEvent]) -> list[UserEvent]:
        """Return a store read as it may be delivered: no event of a deleted user unerased."""
        self.erase(event.user.id for event in events if event.type == EventType.DELETED)
        if not self._erased:
            return events
        return [
            event.erased() if event.user.id in self._erased and not event.user.is_erased else event
            for event in events
        ]

    def _fail_all(self, error: DomainError) -> None:
        for watcher in self._watchers:
            watcher._fail(error)
        self._wake.set()
        self._wake = asyncio.Event()

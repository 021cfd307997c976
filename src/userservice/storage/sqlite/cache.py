"""The SQLite store's exact read cache: an LRU of users, refreshed by every commit."""

from __future__ import annotations

from collections import OrderedDict

from userservice.domain.model import User


class ReadCache:
    """Users by id, least recently used first; belongs to the event loop thread alone."""

    def __init__(self, size: int) -> None:
        """Keep at most size users."""
        self._users: OrderedDict[str, User] = OrderedDict()
        self._size = size
        self.generation = 0
        """Commits applied so far: a read that began under an older one may be stale."""

    def __len__(self) -> int:
        """Return how many users are cached."""
        return len(self._users)

    def get(self, user_id: str) -> User | None:
        """Return the cached user, marking it recently used, or None."""
        user = self._users.get(user_id)
        if user is not None:
            self._users.move_to_end(user_id)
        return user

    def remember(self, user: User, generation: int) -> None:
        """Cache what a read returned, unless a write committed since the read began."""
        # Such a write may not be in what the read returned; caching it then could
        # resurrect the old state, so only an undisturbed read caches.
        if generation == self.generation:
            self._put(user)

    def committed(self, changes: dict[str, User | None]) -> None:
        """Apply one commit's effects: None for a deleted user."""
        self.generation += 1
        for user_id, user in changes.items():
            if user is None:
                self._users.pop(user_id, None)
            else:
                self._put(user)

    def invalidate(self) -> None:
        """Forget every user because another process committed; reads in flight go uncached."""
        self.generation += 1
        self._users.clear()

    def clear(self) -> None:
        """Forget every user (the store is closing)."""
        self._users.clear()
        self._size = 0

    def _put(self, user: User) -> None:
        self._users[user.id] = user
        self._users.move_to_end(user.id)
        if len(self._users) > self._size:
            self._users.popitem(last=False)

"""The HS256 shared secret: one fixed key (rotating it is a deploy)."""

from __future__ import annotations

from typing import Any

from userservice.interceptors.auth.keys.source import KeyEntry, KeysChanged


class StaticKeys:
    """One fixed key (the HS256 secret): nothing to refresh."""

    generation = 0

    def __init__(self, key: Any, algorithm: str) -> None:
        """Accept only algorithm, with key."""
        self._entry: KeyEntry = (key, (algorithm,))

    def resolve(self, token: str) -> KeyEntry:
        """Return the fixed key."""
        return self._entry

    async def refresh_unknown(self) -> bool:
        """A fixed key never changes."""
        return False

    def on_change(self, listener: KeysChanged) -> None:
        """A fixed key never changes: listener is never called."""

    async def start(self) -> None:
        """Nothing to start."""

    async def aclose(self) -> None:
        """Nothing to stop."""

"""Where the client's bearer token comes from: fixed, a callable, or a file that is rewritten."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeAlias

from userservice.file_signature import FileSignature, file_signature

TokenSource: TypeAlias = Callable[[], str | Awaitable[str]]
"""Returns the bearer token to send now; called before every call, so keep it cheap."""
TOKEN_ENDED_REASONS: Final = frozenset({"TOKEN_EXPIRED", "KEY_WITHDRAWN"})
"""The server ends a stream with these when its token ends (expiry, a withdrawn signing key):
the token was good when the stream opened, so a newer one from the source may resume it."""


class TokenFile:
    """A bearer token kept in a file and re-read whenever the file changes.

    For a Kubernetes projected service-account token (or any agent that rewrites a token
    file): each call stats the file, and reads it again only when its inode, size or
    modification time changed. If the file cannot be read after it once could, the token
    read last is kept, as a replaced file is briefly absent on some volumes.
    """

    def __init__(self, path: str | Path) -> None:
        """Read path on the first call, not now."""
        self.path = Path(path)
        self._signature: FileSignature | None = None
        self._token = ""

    def __call__(self) -> str:
        """Return the token in the file now (surrounding whitespace removed)."""
        try:
            signature = file_signature(str(self.path))
            if signature != self._signature:
                self._token = self.path.read_text(encoding="utf-8").strip()
                self._signature = signature
        except OSError:
            if self._signature is None:
                raise
        return self._token

"""A PEM public key or certificate, or a JWKS file, re-read in the background when it changes.

A background task checks the file's inode, size and modification time every
``reload_check_seconds`` and re-reads it when they change (a Kubernetes Secret or cert-manager
update swaps the file).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Final

import jwt

from userservice.file_signature import file_signature
from userservice.interceptors.auth.keys.source import (
    ChangingKeys,
    cancel_task,
    load_key_file,
    parse_key_data,
)

_log: Final = logging.getLogger("userservice.keys")


class FileKeys(ChangingKeys):
    """A PEM or JWKS file, re-read in the background when it changes."""

    def __init__(self, path: str, check_seconds: float) -> None:
        """Load path now (KeyFileError if unusable); check it every check_seconds."""
        self._path = path
        self._check_seconds = check_seconds
        self._signature = file_signature(path)
        super().__init__(load_key_file(path))
        self._checked_at = time.monotonic()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def refresh_unknown(self) -> bool:
        """Check the file now, unless it was checked within the last check interval."""
        if time.monotonic() - self._checked_at < self._check_seconds:
            return False
        return await self.check()

    async def check(self) -> bool:
        """Re-read the file if it changed; return whether the key set changed."""
        async with self._lock:
            self._checked_at = time.monotonic()
            try:
                signature = await asyncio.to_thread(file_signature, self._path)
                if signature == self._signature:
                    return False
                data = await asyncio.to_thread(Path(self._path).read_bytes)
                keys = parse_key_data(data)
            except (OSError, ValueError, jwt.PyJWTError) as error:
                # A half-written or removed file must not take the keys away: keep them.
                _log.warning(
                    "key file unusable, keeping the previous keys",
                    extra={"path": self._path, "error": str(error).splitlines()[0][:200]},
                )
                return False
            self._signature = signature
            self._replace(keys, "key file reloaded", {"path": self._path})
            return True

    async def start(self) -> None:
        """Begin checking the file in the background."""
        self._task = asyncio.create_task(self._watch(), name="key-file-reload")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._check_seconds)
            await self.check()

    async def aclose(self) -> None:
        """Stop checking the file."""
        await cancel_task(self._task)
        self._task = None

"""What every key source shares: the KeySource protocol, key sets, key parsing, the errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

KeyEntry = tuple[Any, Sequence[str]]
"""A verification key and the one algorithm it accepts."""

_log: Final = logging.getLogger("userservice.keys")
_EC_ALGORITHMS: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
MAX_JWKS_BYTES: Final = 1024 * 1024
"""A larger JWKS response is refused: no real key set comes near it."""


KeysChanged = Callable[[], None]
"""Called (on the event loop) right after a source's key set changed."""


class KeyFileError(ValueError):
    """A key file cannot be read, or holds no usable public key or key set."""


class KeyFetchError(RuntimeError):
    """The JWKS URL could not be fetched or did not hold a usable key set."""


class UnknownKeyError(jwt.InvalidTokenError):
    """The token names a ``kid`` the current key set does not hold."""


class KeySource(Protocol):
    """Keys for verifying tokens; ``generation`` changes whenever the key set does."""

    @property
    def generation(self) -> int:
        """A number that changes whenever the key set changes."""
        ...

    def resolve(self, token: str) -> KeyEntry:
        """Return the key for a (still unverified) token, or raise jwt.InvalidTokenError."""
        ...

    async def refresh_unknown(self) -> bool:
        """Re-read the keys for a token naming an unknown kid; False if not attempted."""
        ...

    def on_change(self, listener: KeysChanged) -> None:
        """Call listener after every change of the key set (after generation is bumped)."""
        ...

    async def start(self) -> None:
        """Load what start-up needs and begin background refreshes."""
        ...

    async def aclose(self) -> None:
        """Stop background refreshes."""
        ...


@dataclass(frozen=True, slots=True)
class KeySet:
    """Keys by kid; ``only`` is the key a token without a matching kid may use."""

    by_kid: Mapping[str, KeyEntry] = field(default_factory=dict)
    only: KeyEntry | None = None
    only_kid: str | None = None

    def resolve(self, token: str) -> KeyEntry:
        """Return the key the token's kid names (or the only key); raise if none fits."""
        kid = jwt.get_unverified_header(token).get("kid")
        found = self.by_kid.get(kid) if isinstance(kid, str) else None
        if found is None and self.only is not None and (kid is None or self.only_kid is None):
            found = self.only
        if found is not None:
            return found
        if isinstance(kid, str):
            raise UnknownKeyError("no key in the key set matches the token's kid")
        raise jwt.InvalidTokenError("the token names no kid and the key set holds several keys")


class ChangingKeys:
    """A key set that changes: its generation, its change listeners and the key lookup."""

    def __init__(self, keys: KeySet) -> None:
        """Start at generation 0 with keys and no listener."""
        self._keys = keys
        self._generation = 0
        self._listeners: list[KeysChanged] = []

    @property
    def generation(self) -> int:
        """Bumped whenever the key set changes."""
        return self._generation

    def on_change(self, listener: KeysChanged) -> None:
        """Call listener after every change of the key set."""
        self._listeners.append(listener)

    def resolve(self, token: str) -> KeyEntry:
        """Return the key for token from the current key set."""
        return self._keys.resolve(token)

    def _replace(self, keys: KeySet, event: str, where: dict[str, str]) -> None:
        """Take keys as the key set, bump the generation, log event and call the listeners."""
        self._keys = keys
        self._generation += 1
        _log.info(event, extra={**where, "kids": sorted(keys.by_kid)})
        notify(self._listeners)


def parse_key_data(data: bytes) -> KeySet:
    """Parse a PEM public key or certificate (RSA or EC) or a JWKS document."""
    if data.lstrip().startswith(b"{"):
        return parse_jwks(data.decode())
    return _pem(data)


def load_key_file(path: str) -> KeySet:
    """Load a key file, or raise KeyFileError saying why."""
    try:
        return parse_key_data(Path(path).read_bytes())
    except (OSError, ValueError, jwt.PyJWTError) as error:
        raise KeyFileError(f"cannot load {path!r}: {error}") from error


def _pem(data: bytes) -> KeySet:
    if b"-----BEGIN CERTIFICATE-----" in data:
        key: Any = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if isinstance(key, rsa.RSAPublicKey):
        return KeySet(only=(key, ("RS256",)))
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return KeySet(only=(key, (_EC_ALGORITHMS[key.curve.name],)))
    raise ValueError(f"unsupported key type {type(key).__name__} (use RSA or EC P-256/384/521)")


def parse_jwks(text: str) -> KeySet:
    """Parse a JWKS document, keeping only its RSA and EC signing keys."""
    # Symmetric (oct) keys do not belong in a public key set: accepting one would let
    # anyone who can read the file or the URL mint tokens.
    document = json.loads(text)
    if not isinstance(document, dict):
        raise ValueError("a JWKS is a JSON object with a keys list")
    keys = [
        jwk
        for jwk in jwt.PyJWKSet.from_dict(document).keys
        if jwk.key_type in ("RSA", "EC") and jwk.public_key_use in (None, "sig")
    ]
    if not keys:
        raise ValueError("the JWKS holds no RSA or EC signing key")
    by_kid = {jwk.key_id: (jwk.key, (jwk.algorithm_name,)) for jwk in keys if jwk.key_id}
    only = (keys[0].key, (keys[0].algorithm_name,)) if len(keys) == 1 else None
    return KeySet(by_kid, only, keys[0].key_id if only else None)


def notify(listeners: Sequence[KeysChanged]) -> None:
    """Call every listener of a key set change; one that fails is logged, never stops the rest."""
    for listener in listeners:
        # A failing listener must neither stop the others nor the refresh that called it.
        try:
            listener()
        except Exception:
            _log.exception("a key set change listener failed")


def why(error: Exception) -> dict[str, str]:
    """Return the first line of error as a log field: the reason a fetch or reload failed."""
    return {"error": str(error).splitlines()[0][:300] if str(error) else type(error).__name__}


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel task (if any) and wait for it to end, whatever it raises."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task

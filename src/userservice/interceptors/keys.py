"""Where token verification keys come from, and how they rotate without a restart.

- ``StaticKeys``: the HS256 shared secret (rotating it is a deploy).
- ``FileKeys``: a PEM public key or certificate, or a JWKS file. A background task checks
  the file's inode, size and modification time every ``reload_check_seconds`` and re-reads
  it when they change (a Kubernetes Secret or cert-manager update swaps the file).
- ``JwksUrlKeys``: a JWKS document fetched over HTTPS, kept for the response's
  ``Cache-Control: max-age`` (clamped to a configured floor and ceiling) and refreshed in
  the background before it goes stale; a token naming an unknown ``kid`` triggers one
  immediate refetch, at most once per ``auth_jwks_refetch_seconds``.

Nothing here blocks the event loop: file reads and HTTP fetches run in a worker thread
(``asyncio.to_thread``), off every call's path. PyJWT's ``PyJWKClient`` is not used: it
fetches synchronously inside ``get_signing_key``, i.e. on the calling thread of the call
being verified, and caches for a fixed lifespan regardless of the response's headers.
A source whose key set changes bumps ``generation``, which tells the verifier to drop its
cache of verified tokens, so a key taken out of the set stops being accepted at once, and
then calls the listeners given to ``on_change``: the auth interceptor re-checks the tokens
of its open streams there, so a stream signed with a withdrawn key ends too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, Final, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from userservice.file_signature import file_signature

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


def _notify(listeners: Sequence[KeysChanged]) -> None:
    for listener in listeners:
        # A failing listener must neither stop the others nor the refresh that called it.
        try:
            listener()
        except Exception:
            _log.exception("a key set change listener failed")


class FileKeys:
    """A PEM or JWKS file, re-read in the background when it changes."""

    def __init__(self, path: str, check_seconds: float) -> None:
        """Load path now (KeyFileError if unusable); check it every check_seconds."""
        self._path = path
        self._check_seconds = check_seconds
        self._signature = file_signature(path)
        self._keys = load_key_file(path)
        self._generation = 0
        self._checked_at = time.monotonic()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[KeysChanged] = []

    @property
    def generation(self) -> int:
        """Bumped on every successful reload of a changed file."""
        return self._generation

    def on_change(self, listener: KeysChanged) -> None:
        """Call listener after every reload of a changed file."""
        self._listeners.append(listener)

    def resolve(self, token: str) -> KeyEntry:
        """Return the key for token from the file's current key set."""
        return self._keys.resolve(token)

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
            self._signature, self._keys = signature, keys
            self._generation += 1
            _log.info("key file reloaded", extra={"path": self._path, "kids": sorted(keys.by_kid)})
        _notify(self._listeners)
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
        await _cancel(self._task)
        self._task = None


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


def _http_get(url: str, timeout: float) -> tuple[bytes, Message]:
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


class JwksUrlKeys:
    """A JWKS URL: cached per Cache-Control, refreshed in the background and on unknown kids."""

    def __init__(
        self,
        url: str,
        *,
        min_cache_seconds: float,
        max_cache_seconds: float,
        refetch_seconds: float,
        timeout_seconds: float,
        fetch: Fetch = _http_get,
    ) -> None:
        """Fetch nothing yet: start() fetches the first key set."""
        self._url = url
        self._shown_url = display_url(url)
        self._min = min_cache_seconds
        self._max = max_cache_seconds
        self._refetch_seconds = refetch_seconds
        self._timeout = timeout_seconds
        self._fetch_blocking = fetch
        self._keys = KeySet()
        self._body = b""
        self._generation = 0
        self._fresh_until = 0.0
        self._unknown_refetch_at = -refetch_seconds
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[KeysChanged] = []

    @property
    def generation(self) -> int:
        """Bumped whenever a fetch returns a different key set."""
        return self._generation

    def on_change(self, listener: KeysChanged) -> None:
        """Call listener after every fetch that returned a different key set."""
        self._listeners.append(listener)

    def resolve(self, token: str) -> KeyEntry:
        """Return the key for token from the last fetched key set."""
        return self._keys.resolve(token)

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
            _log.warning("JWKS refetch failed, keeping the previous keys", extra=_why(error))
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
        self._keys, self._body = keys, body
        self._generation += 1
        _log.info("JWKS fetched", extra={"url": self._shown_url, "kids": sorted(keys.by_kid)})
        _notify(self._listeners)
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
                _log.warning("JWKS refresh failed, keeping the previous keys", extra=_why(error))
                self._fresh_until = time.monotonic() + self._min

    async def aclose(self) -> None:
        """Stop the background refresh and any fetch under way."""
        await _cancel(self._task)
        await _cancel(self._inflight)
        self._task = self._inflight = None


def display_url(url: str) -> str:
    """Return url without credentials or query, which may hold secrets: fit for logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _why(error: Exception) -> dict[str, str]:
    return {"error": str(error).splitlines()[0][:300] if str(error) else type(error).__name__}


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task

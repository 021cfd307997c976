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

from userservice.interceptors.auth.keys.file import FileKeys
from userservice.interceptors.auth.keys.http import cache_seconds, display_url
from userservice.interceptors.auth.keys.jwks import JwksUrlKeys
from userservice.interceptors.auth.keys.source import (
    MAX_JWKS_BYTES,
    KeyEntry,
    KeyFetchError,
    KeyFileError,
    KeysChanged,
    KeySet,
    KeySource,
    UnknownKeyError,
    load_key_file,
    parse_jwks,
    parse_key_data,
)
from userservice.interceptors.auth.keys.static import StaticKeys

__all__ = [
    "MAX_JWKS_BYTES",
    "FileKeys",
    "JwksUrlKeys",
    "KeyEntry",
    "KeyFetchError",
    "KeyFileError",
    "KeySet",
    "KeySource",
    "KeysChanged",
    "StaticKeys",
    "UnknownKeyError",
    "cache_seconds",
    "display_url",
    "load_key_file",
    "parse_jwks",
    "parse_key_data",
]

"""Opaque, tamper-evident keyset page tokens bound to the filter they were issued for."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from userservice.domain.errors import InvalidArgumentError, Reason

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_MAC_BYTES = 16
_VERSION = 1


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _invalid(description: str) -> InvalidArgumentError:
    return InvalidArgumentError.single("page_token", description, Reason.INVALID_PAGE_TOKEN)


def effective_page_size(requested: int) -> int:
    """Apply the documented default and maximum; negative sizes are INVALID_ARGUMENT."""
    if requested < 0:
        raise InvalidArgumentError.single("page_size", "must not be negative")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class PagePosition:
    """Where a page token resumes: after this id, with the total counted at the first page."""

    after_id: str
    total_size: int | None


class PageTokenCodec:
    """Signs page tokens with the current key, verifies them against the whole key ring.

    A token is ``<key id>.<body>.<mac>``: the key id names the ring's key that signed it,
    so a replica that already signs with a new secret still accepts the tokens its peers
    (or it, before the rotation) issued under a previous one. The MAC covers the key id
    and the encoded body, and is compared as text: any change to the token is rejected.
    Two-part tokens (``<body>.<mac>``, from before key ids) are checked against every key.
    """

    def __init__(self, key: bytes, previous: Sequence[bytes] = ()) -> None:
        """Sign with key; also accept tokens signed with any of previous."""
        self._kid = key_id(key)
        self._key = key
        self._ring = {key_id(item): item for item in (*previous, key)}

    def encode(self, after_id: str, filter_text: str, total_size: int) -> str:
        """Return a token resuming after after_id for this (canonical) filter."""
        body = json.dumps(
            {"v": _VERSION, "a": after_id, "f": _filter_digest(filter_text), "t": total_size},
            separators=(",", ":"),
        ).encode()
        signed = f"{self._kid}.{_b64encode(body)}"
        return f"{signed}.{_b64encode(_mac(self._key, signed.encode()))}"

    def decode(self, token: str, filter_text: str) -> PagePosition:
        """Return where to resume; raise InvalidArgumentError if forged or reused."""
        parts = token.split(".")
        try:
            if len(parts) == 3:
                body = self._verified(*parts)
            elif len(parts) == 2:
                body = self._verified_legacy(*parts)
            else:
                raise _invalid("is malformed")
            payload = json.loads(body)
        except (ValueError, UnicodeError):
            raise _invalid("is malformed") from None
        if not isinstance(payload, dict):
            raise _invalid("is malformed")
        if payload.get("v") != _VERSION or not isinstance(payload.get("a"), str):
            raise _invalid("has an unsupported version")
        if payload.get("f") != _filter_digest(filter_text):
            raise _invalid("was issued for a different filter")
        total = payload.get("t")
        # Tokens minted before totals were carried have none: the next page counts again.
        carried = total if isinstance(total, int) and total >= 0 else None
        return PagePosition(str(payload["a"]), carried)

    def _verified(self, kid: str, body_text: str, mac_text: str) -> bytes:
        key = self._ring.get(kid)
        if key is None:
            raise _invalid("is not a token this service issued")
        expected = _b64encode(_mac(key, f"{kid}.{body_text}".encode()))
        if not hmac.compare_digest(mac_text.encode(), expected.encode()):
            raise _invalid("is not a token this service issued")
        return _b64decode(body_text)

    def _verified_legacy(self, body_text: str, mac_text: str) -> bytes:
        body, mac = _b64decode(body_text), _b64decode(mac_text)
        if not any(hmac.compare_digest(mac, _mac(key, body)) for key in self._ring.values()):
            raise _invalid("is not a token this service issued")
        return body


def key_id(key: bytes) -> str:
    """Return the short public name of a page-token key (a hash: it reveals nothing of it)."""
    return _b64encode(hashlib.sha256(b"userservice page-token key id\0" + key).digest()[:6])


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:_MAC_BYTES]


def _filter_digest(filter_text: str) -> str:
    return hashlib.sha256(filter_text.encode()).hexdigest()[:16]


def random_page_token_secret() -> str:
    """Return a fresh page-token secret, for a process (or a group of workers) given none.

    Tokens signed with it do not survive a restart and no other replica accepts them, which
    is why configuration requires a shared secret on PostgreSQL outside development.
    """
    return secrets.token_urlsafe(32)


def page_token_codec(secret: str, previous: Sequence[str] = ()) -> PageTokenCodec:
    """Return the codec signing with secret (a random one if empty), accepting previous too."""
    current = secret or random_page_token_secret()
    return PageTokenCodec(current.encode(), [item.encode() for item in previous])

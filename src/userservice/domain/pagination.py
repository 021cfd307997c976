"""Opaque, tamper-evident keyset page tokens bound to the filter they were issued for."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
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
    """Signs and verifies page tokens with an HMAC key shared by every replica."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, after_id: str, filter_text: str, total_size: int) -> str:
        """Return a token resuming after after_id for this (canonical) filter."""
        body = json.dumps(
            {"v": _VERSION, "a": after_id, "f": _filter_digest(filter_text), "t": total_size},
            separators=(",", ":"),
        ).encode()
        return f"{_b64encode(body)}.{_b64encode(self._mac(body))}"

    def decode(self, token: str, filter_text: str) -> PagePosition:
        """Return where to resume; raise InvalidArgumentError if forged or reused."""
        body_text, _, mac_text = token.partition(".")
        try:
            body, mac = _b64decode(body_text), _b64decode(mac_text)
        except (ValueError, UnicodeEncodeError):
            raise _invalid("is malformed") from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise _invalid("is not a token this service issued")
        payload = json.loads(body)
        if payload.get("v") != _VERSION or not isinstance(payload.get("a"), str):
            raise _invalid("has an unsupported version")
        if payload.get("f") != _filter_digest(filter_text):
            raise _invalid("was issued for a different filter")
        total = payload.get("t")
        # Tokens minted before totals were carried have none: the next page counts again.
        carried = total if isinstance(total, int) and total >= 0 else None
        return PagePosition(str(payload["a"]), carried)


def _filter_digest(filter_text: str) -> str:
    return hashlib.sha256(filter_text.encode()).hexdigest()[:16]

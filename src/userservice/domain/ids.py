"""Server-assigned user ids: UUIDv7 (RFC 9562), time-ordered so id order is insert order."""

from __future__ import annotations

import os
import re
import time

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def new_user_id() -> str:
    """Return a new lower-case UUIDv7 string."""
    timestamp_ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (timestamp_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def is_valid_id(candidate: str) -> bool:
    """Tell whether a string has the canonical lower-case UUID form ids use."""
    return _UUID_RE.match(candidate) is not None


def now_us() -> int:
    """Return wall-clock time in integer microseconds since the epoch."""
    return time.time_ns() // 1_000

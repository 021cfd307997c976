"""Server-assigned user ids: UUIDv7 (RFC 9562) with the §6.2 monotonic counter.

Ids from one process sort in creation order, even within one millisecond and across a
wall-clock step back: 42 bits after the timestamp (rand_a and the top of rand_b) are a
counter, seeded at random each new millisecond with its top bit clear (room for 2^41
ids in that millisecond); when the clock does not move forward the counter is
incremented, and if it ever overflowed the timestamp field is advanced (§6.2 Method 1).
The last 32 bits stay random. Across replicas, ids only follow their clocks.
"""

from __future__ import annotations

import os
import re
import threading
import time

# Used with fullmatch: "$" would also match before a trailing newline.
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


_COUNTER_BITS = 42
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1
_lock = threading.Lock()
_last = [0, 0]  # [timestamp_ms, counter] of the last id


def _next_stamp() -> tuple[int, int]:
    now_ms = time.time_ns() // 1_000_000
    with _lock:
        last_ms, counter = _last
        if now_ms > last_ms:
            last_ms, counter = now_ms, int.from_bytes(os.urandom(6), "big") >> 7
        elif counter < _COUNTER_MAX:
            counter += 1
        else:
            last_ms, counter = last_ms + 1, int.from_bytes(os.urandom(6), "big") >> 7
        _last[0], _last[1] = last_ms, counter
    return last_ms, counter


def new_user_id() -> str:
    """Return a new lower-case UUIDv7 string, greater than every earlier one of this process."""
    timestamp_ms, counter = _next_stamp()
    value = (timestamp_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (counter >> 30) << 64  # rand_a: the counter's top 12 bits
    value |= 0b10 << 62
    value |= (counter & ((1 << 30) - 1)) << 32  # rand_b: the counter's low 30 bits
    value |= int.from_bytes(os.urandom(4), "big")
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def is_valid_id(candidate: str) -> bool:
    """Tell whether a string has the canonical lower-case UUID form ids use."""
    return _UUID_RE.fullmatch(candidate) is not None


def now_us() -> int:
    """Return wall-clock time in integer microseconds since the epoch."""
    return time.time_ns() // 1_000

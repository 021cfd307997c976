"""Rate limiting: a token bucket per principal, in this process (local.py) or in Redis (redis.py).

interceptor.py is the layer and what each method costs; limiter.py is what it asks a limiter.
The Redis limiter is imported only when configured (see interceptors/chain.py).
"""

from __future__ import annotations

from userservice.interceptors.ratelimit.interceptor import (
    MESSAGE_COSTS,
    METHOD_COSTS,
    SCAN_COSTS,
    RateLimitInterceptor,
)
from userservice.interceptors.ratelimit.limiter import ALLOWED, Decision, Limiter
from userservice.interceptors.ratelimit.local import LocalLimiter

__all__ = [
    "ALLOWED",
    "MESSAGE_COSTS",
    "METHOD_COSTS",
    "SCAN_COSTS",
    "Decision",
    "Limiter",
    "LocalLimiter",
    "RateLimitInterceptor",
]

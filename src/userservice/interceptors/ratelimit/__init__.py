"""Rate limiting: a token bucket per principal, in this process (local.py) or in Redis (redis.py).

interceptor.py is the layer (what each method costs is its proto policy, userservice.policy);
limiter.py is what it asks a limiter.
The Redis limiter is imported only when configured (see interceptors/chain.py).
"""

from __future__ import annotations

from userservice.interceptors.ratelimit.interceptor import (
    RateLimitInterceptor,
)
from userservice.interceptors.ratelimit.limiter import ALLOWED, Decision, Limiter
from userservice.interceptors.ratelimit.local import LocalLimiter

__all__ = [
    "ALLOWED",
    "Decision",
    "Limiter",
    "LocalLimiter",
    "RateLimitInterceptor",
]

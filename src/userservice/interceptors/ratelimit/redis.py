"""A token bucket limiter in Redis, so every replica draws from one bucket per principal.

One Lua script does the whole read-refill-take-write step atomically, with the time taken
from Redis ``TIME`` so the replicas' clocks do not matter; keys expire once their bucket
would be full again. Redis being unreachable or slower than the socket timeout never
blocks calls for long: the limiter answers per ``fail_open`` and re-probes Redis at most
once per ``recheck_seconds``, logging the outage once (then once a minute) and the recovery.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Final, TypedDict, Unpack

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from userservice.interceptors.ratelimit.limiter import ALLOWED, Decision

_log: Final = logging.getLogger("userservice.ratelimit")
_REMIND_EVERY_SECONDS: Final = 60.0
_TIMEOUT_SECONDS: Final = 0.1

_BUCKET_SCRIPT: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
elseif now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
end
local allowed = 0
local retry_after = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry_after = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {allowed, tostring(retry_after)}
"""


class LimiterOptions(TypedDict, total=False):
    """RedisLimiter's optional settings, taken alike by its constructor and from_url."""

    prefix: str
    timeout: float
    recheck_seconds: float


class RedisLimiter:
    """Token buckets shared through Redis; see the module docstring for failure handling."""

    def __init__(
        self,
        client: Redis,
        rate: float,
        burst: float,
        *,
        fail_open: bool,
        prefix: str = "userservice:ratelimit:",
        timeout: float = _TIMEOUT_SECONDS,
        recheck_seconds: float = 1.0,
        owns_client: bool = False,
    ) -> None:
        """Use client (its socket timeouts should not exceed timeout) for buckets under prefix."""
        self._client = client
        self._script = client.register_script(_BUCKET_SCRIPT)
        self._rate = rate
        self._burst = burst
        self._prefix = prefix
        self._timeout = timeout
        self._recheck = recheck_seconds
        self._owns_client = owns_client
        # A bucket left alone refills completely within burst/rate seconds; then it can go.
        self._ttl_ms = math.ceil(burst / rate * 1000) + 1000
        self._fallback = ALLOWED if fail_open else Decision(False, recheck_seconds, undecided=True)
        self._mode = "open (calls allowed)" if fail_open else "closed (calls refused)"
        self._down_since: float | None = None
        self._down_until = 0.0
        self._reminded_at = 0.0
        self._decided_without = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        rate: float,
        burst: float,
        *,
        fail_open: bool,
        **options: Unpack[LimiterOptions],
    ) -> RedisLimiter:
        """Connect lazily to url with bounded timeouts and one retry on a dropped connection."""
        # A Redis restart leaves every pooled connection dead; each would fail one call and
        # start a recheck interval of fallback answers. One immediate retry on a fresh
        # connection (ConnectionError only, never a timeout) hides that, and limit()'s
        # timeout still bounds both attempts together.
        timeout = options.get("timeout", _TIMEOUT_SECONDS)
        client = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        return cls(client, rate, burst, fail_open=fail_open, owns_client=True, **options)

    @property
    def available(self) -> bool:
        """Return whether the last attempt to reach Redis succeeded."""
        return self._down_since is None

    async def check(self) -> bool:
        """Ping Redis, logging an outage as limit() would; return whether it answered."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error, time.monotonic())
            return False
        return True

    async def limit(self, key: str, cost: float) -> Decision:
        """Take cost tokens from key's shared bucket, or answer per fail_open without Redis."""
        if self._down_since is not None:
            now = time.monotonic()
            if now < self._down_until:
                self._decided_without += 1
                return self._fallback
            # This call probes Redis; concurrent ones keep the fallback until it answers.
            self._down_until = now + self._recheck
        try:
            async with asyncio.timeout(self._timeout):
                allowed, retry_after = await self._script(
                    keys=(self._prefix + key,),
                    args=(self._rate, self._burst, cost, self._ttl_ms),
                )
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error, time.monotonic())
            self._decided_without += 1
            return self._fallback
        if self._down_since is not None:
            self._recovered()
        return ALLOWED if allowed == 1 else Decision(False, float(retry_after))

    def _failed(self, error: BaseException, now: float) -> None:
        self._down_until = now + self._recheck
        reason = type(error).__name__
        if self._down_since is None:
            self._down_since = self._reminded_at = now
            _log.warning(
                "rate limiter: Redis unreachable (%s); failing %s",
                reason,
                self._mode,
                extra={"error": reason},
            )
        elif now - self._reminded_at >= _REMIND_EVERY_SECONDS:
            self._reminded_at = now
            _log.warning(
                "rate limiter: Redis still unreachable after %.0fs (%s); "
                "%d calls decided without it",
                now - self._down_since,
                reason,
                self._decided_without,
                extra={"error": reason},
            )

    def _recovered(self) -> None:
        down_for = time.monotonic() - (self._down_since or 0.0)
        _log.info(
            "rate limiter: Redis reachable again after %.1fs; %d calls were decided without it",
            down_for,
            self._decided_without,
        )
        self._down_since = None
        self._down_until = 0.0
        self._decided_without = 0

    async def aclose(self) -> None:
        """Close the Redis connections if this limiter created the client."""
        if self._owns_client:
            await self._client.aclose()

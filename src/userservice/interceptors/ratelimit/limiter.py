"""What the rate limit layer asks a limiter, and the answer; in-process or Redis alike."""

from __future__ import annotations

from typing import Final, NamedTuple, Protocol


class Decision(NamedTuple):
    """A limiter's answer: allowed, or denied with the seconds until a retry can succeed.

    undecided says the limiter could not reach its state (Redis down, failing closed):
    the call is refused without being over any limit.
    """

    allowed: bool
    retry_after: float
    undecided: bool = False


ALLOWED: Final = Decision(True, 0.0)


class Limiter(Protocol):
    """Takes cost tokens from key's bucket, or says how long until it could."""

    async def limit(self, key: str, cost: float) -> Decision:
        """Return whether a call costing cost may proceed for key."""
        ...

"""The scenarios `make bench` runs and the configurations each compares with its floor.

Configurations (long-lived servers unless noted):

- `bare`: the floor, benchmarks/bare_server.py on the default asyncio loop, answering from memory;
- `bare+uvloop`: the same on uvloop (GetUser only: the loop's own share of the gap);
- `full`: `userservice serve` on a SQLite file of `--small-rows` users (10k);
- `full-1m`: the same on `--big-rows` users (1M);
- `full-write`: the same on a store that starts empty and takes every write;
- `full-2w`: `userservice serve --workers 2` on the small store;
- start-up spawns a fresh `bare` or `full` process per round.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOOR = "bare"


@dataclass(frozen=True)
class Scenario:
    """One load shape, run against each of `configs` (the floor first) every round."""

    key: str
    label: str
    kind: str  # a benchmarks.loadgen command (load, export, import) or "startup"
    configs: tuple[str, ...]
    group: str
    method: str = "get"
    concurrency: int = 1
    channels: int = 1
    big: bool = False  # ListUsers: page tokens of the big store

    @property
    def unit(self) -> str:
        """What one operation is, for the figures column."""
        if self.kind in ("export", "import"):
            return "users/s"
        if self.kind == "startup":
            return "ms"
        return "calls/s"

    @property
    def bulk(self) -> bool:
        """A long single-shot measurement, run in the first `--bulk-rounds` rounds only."""
        return self.kind != "load"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("get-c1", "GetUser c1", "load", ("bare", "bare+uvloop", "full"), "getuser"),
    Scenario(
        "get-c16",
        "GetUser c16",
        "load",
        ("bare", "bare+uvloop", "full"),
        "getuser",
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "get-c64",
        "GetUser c64",
        "load",
        ("bare", "bare+uvloop", "full"),
        "getuser",
        concurrency=64,
        channels=2,
    ),
    Scenario(
        "create-c16",
        "CreateUser c16",
        "load",
        ("bare", "full-write"),
        "create",
        method="create",
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "list-10k",
        "ListUsers 50/page, 10k",
        "load",
        ("bare", "full"),
        "list",
        method="list",
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "list-1m",
        "ListUsers 50/page, 1M",
        "load",
        ("bare", "full-1m"),
        "list",
        method="list",
        concurrency=16,
        channels=2,
        big=True,
    ),
    Scenario("export", "StreamUsers export", "export", ("bare", "full-1m"), "export"),
    Scenario("import", "ImportUsers import", "import", ("bare", "full-write"), "import"),
    Scenario("startup", "start-up to SERVING", "startup", ("bare", "full"), "startup"),
    Scenario(
        "workers-c64",
        "GetUser c64, 8 conns",
        "load",
        ("bare", "full", "full-2w"),
        "workers",
        concurrency=64,
        channels=8,
    ),
)

GROUPS: tuple[str, ...] = tuple(dict.fromkeys(s.group for s in SCENARIOS))


def select(only: str) -> list[Scenario]:
    """Return the scenarios named (by key or group) in `only`; all of them if it is empty."""
    names = {name.strip() for name in only.split(",") if name.strip()}
    if not names:
        return list(SCENARIOS)
    known = {s.key for s in SCENARIOS} | set(GROUPS)
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(unknown)}; choose from {sorted(known)}")
    return [s for s in SCENARIOS if s.key in names or s.group in names]

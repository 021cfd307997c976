"""The scenarios `make bench` runs and the configurations each compares with its floor.

Configurations (long-lived servers unless noted):

- `bare`: benchmarks/bare_server.py on the default asyncio loop, answering from memory: what
  grpc.aio alone costs;
- `bare+uvloop`: the same on uvloop (GetUser only: the loop's own share of the gap);
- `floor`, `floor-1m`, `floor-write`: the storage floors on SQLite (bare_server.py --store,
  on uvloop): the SQLite store's own queries, threads and pragmas, on a copy of the same
  store as `full`, `full-1m` and `full-write`, with none of the service's layers;
- `full`: `userservice serve` on a SQLite file of `--small-rows` users (10k);
- `full-1m`: the same on `--big-rows` users (1M);
- `full-write`: the same on a store that starts empty and takes every write;
- `full-2w`: `userservice serve --workers 2` on the small store;
- `floor-pg`, `full-pg`: the PostgreSQL floor and the service on one database of `--pg-rows`
  users (100k), created for the run and dropped after it;
- start-up spawns a fresh `bare` or `full` process per round.

Each scenario names its floor: the configuration that does the same storage work without our
layers, which every other configuration's `x floor` ratio is paired with.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOOR = "bare"
STORE_FLOORS = frozenset({"floor", "floor-1m", "floor-write", "floor-pg"})
PG_CONFIGS = frozenset({"floor-pg", "full-pg"})


@dataclass(frozen=True)
class Scenario:
    """One load shape, run against each of `configs` (the floor first) every round."""

    key: str
    label: str
    kind: str  # a benchmarks.loadgen command (load, export, import, watch) or "startup"
    configs: tuple[str, ...]
    group: str
    method: str = "get"
    concurrency: int = 1
    channels: int = 1
    big: bool = False  # ListUsers: page tokens of the big store
    floor: str = FLOOR  # the configuration every other one is paired with
    pg: bool = False  # ids and page tokens of the PostgreSQL store
    default: bool = True  # run without --only (the others: --only all, a group or the key)

    @property
    def unit(self) -> str:
        """What one operation is, for the figures column."""
        if self.kind in ("export", "import"):
            return "users/s"
        if self.kind == "watch":
            return "events/s"
        if self.kind == "startup":
            return "ms"
        return "calls/s"

    @property
    def bulk(self) -> bool:
        """A long single-shot measurement, run in the first `--bulk-rounds` rounds only."""
        return self.kind != "load"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "get-c1",
        "GetUser c1",
        "load",
        ("floor", "bare", "bare+uvloop", "full"),
        "getuser",
        floor="floor",
        default=False,
    ),
    Scenario(
        "get-c16",
        "GetUser c16",
        "load",
        ("floor", "bare", "bare+uvloop", "full"),
        "getuser",
        floor="floor",
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "get-c64",
        "GetUser c64",
        "load",
        ("floor", "bare", "full"),
        "getuser",
        floor="floor",
        concurrency=64,
        channels=2,
        default=False,
    ),
    Scenario(
        "get-pg-c16",
        "GetUser c16, PG",
        "load",
        ("floor-pg", "full-pg"),
        "getuser",
        floor="floor-pg",
        pg=True,
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "create-c16",
        "CreateUser c16",
        "load",
        ("floor-write", "bare", "full-write"),
        "create",
        method="create",
        floor="floor-write",
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "create-pg-c16",
        "CreateUser c16, PG",
        "load",
        ("floor-pg", "full-pg"),
        "create",
        method="create",
        floor="floor-pg",
        pg=True,
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "list-10k",
        "ListUsers 50/page, 10k",
        "load",
        ("floor", "bare", "full"),
        "list",
        method="list",
        floor="floor",
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "list-1m",
        "ListUsers 50/page, 1M",
        "load",
        ("floor-1m", "full-1m"),
        "list",
        method="list",
        big=True,
        floor="floor-1m",
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "list-pg",
        "ListUsers 50/page, PG",
        "load",
        ("floor-pg", "full-pg"),
        "list",
        method="list",
        floor="floor-pg",
        pg=True,
        concurrency=16,
        channels=2,
    ),
    Scenario(
        "export",
        "StreamUsers export",
        "export",
        ("floor-1m", "bare", "full-1m"),
        "export",
        floor="floor-1m",
    ),
    Scenario(
        "export-pg",
        "StreamUsers export, PG",
        "export",
        ("floor-pg", "full-pg"),
        "export",
        floor="floor-pg",
        pg=True,
    ),
    Scenario(
        "import",
        "ImportUsers import",
        "import",
        ("floor-write", "bare", "full-write"),
        "import",
        floor="floor-write",
    ),
    Scenario(
        "import-pg",
        "ImportUsers import, PG",
        "import",
        ("floor-pg", "full-pg"),
        "import",
        floor="floor-pg",
        pg=True,
    ),
    Scenario(
        "watch",
        "WatchUsers fan-out",
        "watch",
        ("floor-write", "full-write"),
        "watch",
        floor="floor-write",
        concurrency=8,
    ),
    Scenario(
        "watch-pg",
        "WatchUsers fan-out, PG",
        "watch",
        ("floor-pg", "full-pg"),
        "watch",
        floor="floor-pg",
        pg=True,
        concurrency=8,
    ),
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

# By RPC, and by store: `pg` picks every PostgreSQL scenario, `sqlite` every other one.
GROUPS: tuple[str, ...] = (*dict.fromkeys(s.group for s in SCENARIOS), "pg", "sqlite")


def _groups(scenario: Scenario) -> set[str]:
    return {scenario.group, "pg" if scenario.pg else "sqlite"}


def select(only: str) -> list[Scenario]:
    """Return the scenarios named (by key or group) in `only`; the default ones if it is empty."""
    names = {name.strip() for name in only.split(",") if name.strip()}
    if not names:
        return [s for s in SCENARIOS if s.default]
    if "all" in names:
        return list(SCENARIOS)
    known = {s.key for s in SCENARIOS} | set(GROUPS) | {"all"}
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"unknown scenario {', '.join(unknown)}; choose from {sorted(known)}")
    # A name that is a scenario's key (import, export) means that scenario, not its group.
    groups = names - {s.key for s in SCENARIOS}
    return [s for s in SCENARIOS if s.key in names or _groups(s) & groups]

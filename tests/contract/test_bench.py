"""`make bench` end to end at toy size: every selected cell measured, floors and ratios reported."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.databases import POSTGRES_ADMIN_URL, unavailable

from benchmarks.profile import summarize
from benchmarks.report import load_targets, target_met
from benchmarks.scenarios import SCENARIOS, select
from benchmarks.seed import seeded_file, user_ids

REPO = Path(__file__).resolve().parents[2]


def test_seeded_file_has_the_rows_in_id_order_and_is_reused(tmp_path: Path) -> None:
    path = seeded_file(tmp_path, 300)
    with sqlite3.connect(path) as conn:
        count, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT email_normalized) FROM users"
        ).fetchone()
        migrated = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0]
    assert (count, distinct) == (300, 300)
    assert migrated >= 1
    ids = user_ids(path, [0, 150, 299])
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    assert seeded_file(tmp_path, 300) == path
    assert path.stat().st_mtime_ns == seeded_file(tmp_path, 300).stat().st_mtime_ns


def _bench(tmp_path: Path, only: str, *extra: str) -> tuple[str, dict[str, Any]]:
    output = tmp_path / "results.json"
    argv = [sys.executable, "-m", "benchmarks", "--only", only, "--rounds", "1"]
    argv += ["--seconds", "0.3", "--warmup", "0", "--stream-users", "300", "--small-rows", "300"]
    argv += ["--watchers", "3", "--watch-events", "40"]
    argv += ["--cache-dir", str(tmp_path), "--output", str(output), *extra]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    summary: dict[str, Any] = json.loads(output.read_text())
    return done.stdout, summary


def _check_cells(scenarios: dict[str, Any], expected: dict[str, set[str]]) -> None:
    assert set(scenarios) == set(expected)
    for key, configs in expected.items():
        entry = scenarios[key]
        assert set(entry["configs"]) == configs
        for name, cell in entry["configs"].items():
            assert len(cell["rounds"]) == 1, (key, name)
            assert cell["errors"] == 0, (key, name, cell["rounds"])
            if name != entry["floor"]:
                ratio = "startup" if key == "startup" else "throughput"
                assert cell["vs_floor"][ratio] > 0, (key, name)


def test_bench_measures_each_scenario_against_its_floor(tmp_path: Path) -> None:
    stdout, summary = _bench(tmp_path, "get-c1,list-10k,import,watch,startup")
    assert "x floor" in stdout
    assert "GetUser c1" in stdout
    assert "*floor " in stdout  # the floor's row is marked
    scenarios = summary["scenarios"]
    _check_cells(
        scenarios,
        {
            "get-c1": {"floor", "bare", "bare+uvloop", "full"},
            "list-10k": {"floor", "bare", "full"},
            "import": {"floor-write", "bare", "full-write"},
            "watch": {"floor-write", "full-write"},
            "startup": {"bare", "full"},
        },
    )
    assert scenarios["get-c1"]["floor"] == "floor"
    for config in ("floor-write", "full-write"):
        # Both sides really wrote every user: the floor inserts as the store does.
        assert scenarios["import"]["configs"][config]["rounds"][0]["created"] == 300
        # Every watcher got every event created while it watched.
        assert scenarios["watch"]["configs"][config]["rounds"][0]["operations"] == 3 * 40
    assert scenarios["startup"]["configs"]["full"]["median"]["startup_ms"] > 0
    assert summary["memory"]["full"]["peak_rss_mib"] >= summary["memory"]["full"]["idle_rss_mib"]
    headlines = {headline["name"]: headline for headline in summary["headlines"]}
    assert "GetUser c16 throughput, SQLite" not in headlines  # get-c16 was not selected
    imported = headlines["ImportUsers users/s, SQLite"]
    assert imported["against"] == "import floor-write"
    assert imported["met"] is (imported["value"] >= 0.8)
    assert "ImportUsers users/s, SQLite" in stdout


def test_bench_runs_the_postgres_scenarios_in_a_database_of_its_own(tmp_path: Path) -> None:
    before = asyncio.run(_bench_databases())
    stdout, summary = _bench(
        tmp_path,
        "pg",
        "--pg-rows",
        "300",
        "--stream-users",
        "600",
        "--postgres-url",
        POSTGRES_ADMIN_URL,
    )
    if "full-pg" in summary["failed"]:
        unavailable("PostgreSQL", RuntimeError(summary["failed"]["full-pg"]))
    pg = {"floor-pg", "full-pg"}
    _check_cells(
        summary["scenarios"],
        dict.fromkeys(
            ("get-pg-c16", "create-pg-c16", "list-pg", "export-pg", "import-pg", "watch-pg"), pg
        ),
    )
    exported = summary["scenarios"]["export-pg"]["configs"]
    # The export ends with the table (300 rows), on both sides.
    assert {cell["rounds"][0]["operations"] for cell in exported.values()} == {300}
    assert "GetUser c16 throughput, PG" in stdout
    assert asyncio.run(_bench_databases()) <= before  # the run dropped its database


async def _bench_databases() -> set[str]:
    import asyncpg

    try:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        unavailable("PostgreSQL", error)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'userservice_bench_%'"
        )
    finally:
        await conn.close()
    return {row[0] for row in rows}


def test_profile_summary_gives_each_function_its_self_and_inclusive_share(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "run (x/site-packages/grpc/a.py:1);read (/r/src/userservice/b.py:7) 3\n"
        "run (x/site-packages/grpc/a.py:2);read (/r/src/userservice/b.py:9);parse (c.py:1) 1\n"
    )
    lines = summarize(raw, top=5).splitlines()
    assert lines[0] == "4 samples"
    start = lines.index("     self  function") + 1
    self_table = lines[start : lines.index("", start)]
    assert self_table == ["    75.0%  read (userservice/b.py)", "    25.0%  parse (c.py)"]
    inclusive = lines[lines.index("inclusive  function") + 1 :]
    assert inclusive[:2] == ["   100.0%  run (grpc/a.py)", "   100.0%  read (userservice/b.py)"]


def test_every_target_compares_cells_the_bench_measures() -> None:
    cells = {(scenario.key, config) for scenario in SCENARIOS for config in scenario.configs}
    targets = load_targets()
    assert len(targets) >= 5
    for target in targets:
        assert {target.a, target.b} <= cells, target.name
        assert "issue" not in target.name.lower()


def test_every_scenario_is_paired_with_a_floor_it_runs() -> None:
    for scenario in SCENARIOS:
        assert scenario.configs[0] == scenario.floor or scenario.floor in scenario.configs
        # A PostgreSQL scenario is compared only with the PostgreSQL floor.
        assert scenario.pg == (scenario.floor == "floor-pg"), scenario.key
    assert {s.key for s in select("pg")} == {s.key for s in SCENARIOS if s.pg}
    assert select("all") == list(SCENARIOS)
    assert {s.key for s in select("")} == {s.key for s in SCENARIOS if s.default}
    assert [s.key for s in select("import")] == ["import"]  # the key, not its group
    assert {s.key for s in select("sqlite")} == {s.key for s in SCENARIOS if not s.pg}


@pytest.mark.parametrize(
    ("target", "value", "met"),
    [
        (">= 0.95x", 0.95, True),
        (">= 0.95x", 0.94, False),
        ("<= 1.1x", 1.2, False),
        ("<= 30 us", 12.5, True),
        ("-", 3.0, None),
    ],
)
def test_a_target_reads_as_met_or_missed(target: str, value: float, met: bool | None) -> None:
    assert target_met(target, value) is met


def test_a_malformed_target_is_refused() -> None:
    with pytest.raises(ValueError, match="target"):
        target_met("about 1x", 1.0)

"""`make bench` end to end at toy size: every selected cell measured, floors and ratios reported."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from benchmarks.profile import summarize
from benchmarks.report import load_targets
from benchmarks.scenarios import SCENARIOS
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


def test_bench_measures_each_scenario_against_its_floor(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    argv = [sys.executable, "-m", "benchmarks", "--only", "get-c1,list-10k,import,startup"]
    argv += ["--rounds", "1", "--seconds", "0.3", "--warmup", "0", "--stream-users", "300"]
    argv += ["--small-rows", "300", "--cache-dir", str(tmp_path), "--output", str(output)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "x floor" in done.stdout
    assert "GetUser c1" in done.stdout
    summary = json.loads(output.read_text())
    scenarios = summary["scenarios"]
    assert set(scenarios) == {"get-c1", "list-10k", "import", "startup"}
    for key, expected in (
        ("get-c1", {"bare", "bare+uvloop", "full"}),
        ("list-10k", {"bare", "full"}),
        ("import", {"bare", "full-write"}),
        ("startup", {"bare", "full"}),
    ):
        configs = scenarios[key]["configs"]
        assert set(configs) == expected
        for name, cell in configs.items():
            assert len(cell["rounds"]) == 1, (key, name)
            assert cell["errors"] == 0, (key, name, cell["rounds"])
            if name != "bare":
                ratio = "startup" if key == "startup" else "throughput"
                assert cell["vs_floor"][ratio] > 0, (key, name)
    imported = scenarios["import"]["configs"]["full-write"]["rounds"][0]
    assert imported["created"] == 300
    assert scenarios["startup"]["configs"]["full"]["median"]["startup_ms"] > 0
    assert summary["memory"]["full"]["peak_rss_mib"] >= summary["memory"]["full"]["idle_rss_mib"]
    names = {headline["name"] for headline in summary["headlines"]}
    assert "GetUser c16 throughput, full / bare" not in names  # get-c16 was not selected
    assert "ImportUsers users/s, full-write / bare" in names


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

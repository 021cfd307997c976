"""Run the benchmark: every scenario against the bare floor, interleaved, in one run.

Every server and every load generator is its own process, so the server's CPU time read
from /proc covers only the server. Within each round every scenario runs each of its
configurations (the floor included) in an order that rotates per round; the report uses
medians of per-round values and of per-round paired ratios: on a shared, noisy machine,
numbers from separate runs are not comparable, ratios within one round are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks._proc import listening_sockets, memory_kib, tree_memory_kib
from benchmarks.procs import (
    REPO,
    BenchError,
    Server,
    free_port,
    read_line,
    run_json,
    spawn,
    start_bare,
    start_full,
    stop,
    tail,
    token_env,
)
from benchmarks.scenarios import GROUPS, PG_CONFIGS, STORE_FLOORS, Scenario, select
from benchmarks.seed import copy_seeded, drop_postgres, seed_postgres, seeded_file, user_ids
from userservice.domain.filtering import canonical_filter, parse_filter
from userservice.domain.pagination import PageTokenCodec
from userservice.storage.sqlite import migrate_sqlite

# Where page tokens resume: positions spread over the second half of the listing, so a
# page measures the cost deep into it; more than one, so not every call reads the same
# few database pages.
_TOKEN_POSITIONS = 64


def _page_tokens(path: Path, rows: int, secret: str, output: Path) -> Path:
    """Write page tokens for positions deep into a `rows`-row listing to `output`.

    The ids they resume after go, line for line, to `output` with the suffix `.ids`: the
    storage floors read them instead of decoding the service's signed tokens.
    """
    first, last = rows // 2, max(rows // 2 + 1, rows - 100)
    step = max(1, (last - first) // _TOKEN_POSITIONS)
    ids = user_ids(path, list(range(first, last, step))[:_TOKEN_POSITIONS])
    codec = PageTokenCodec(secret.encode())
    no_filter = canonical_filter(parse_filter(""))
    # The total is carried in the token as the service does after the first page, so
    # these pages do not count the rows again.
    output.write_text("".join(codec.encode(i, no_filter, rows) + "\n" for i in ids))
    output.with_suffix(".ids").write_text("".join(i + "\n" for i in ids))
    return output


class Bench:
    """The servers, the prepared inputs and the rows measured so far."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.servers: dict[str, Server] = {}
        self.failed: dict[str, str] = {}
        self.files: dict[str, Path] = {}
        self.secret = secrets.token_urlsafe(30)  # 40 characters, the JWT secret
        self.page_secret = secrets.token_urlsafe(32)
        self.token = ""
        self.rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.run_id = secrets.token_hex(4)
        self.pg_url = ""
        self.pg_database = ""

    def prepare(self, scenarios: list[Scenario]) -> None:
        """Seed the SQLite files and write the request inputs the scenarios need."""
        needed = {config for scenario in scenarios for config in scenario.configs}
        small = seeded_file(self.args.cache_dir, self.args.small_rows)
        self.files["small"] = small
        positions = range(0, self.args.small_rows, max(1, self.args.small_rows // 1000))
        ids = user_ids(small, list(positions))
        self.files["user_ids"] = self.workdir / "user-ids.txt"
        self.files["user_ids"].write_text("".join(i + "\n" for i in ids))
        self.files["tokens_small"] = _page_tokens(
            small, self.args.small_rows, self.page_secret, self.workdir / "tokens-small.txt"
        )
        if needed & PG_CONFIGS:
            self._prepare_postgres()
        if needed & {"full-1m", "floor-1m"}:
            big = seeded_file(self.args.cache_dir, self.args.big_rows)
            self.files["big"] = big
            self.files["tokens_big"] = _page_tokens(
                big, self.args.big_rows, self.page_secret, self.workdir / "tokens-big.txt"
            )

    def _prepare_postgres(self) -> None:
        """Seed this run's own PostgreSQL database; the PG configurations fail if it cannot."""
        source = seeded_file(self.args.cache_dir, self.args.pg_rows)
        positions = range(0, self.args.pg_rows, max(1, self.args.pg_rows // 1000))
        self.files["pg_user_ids"] = self.workdir / "pg-user-ids.txt"
        self.files["pg_user_ids"].write_text(
            "".join(i + "\n" for i in user_ids(source, list(positions)))
        )
        self.files["tokens_pg"] = _page_tokens(
            source, self.args.pg_rows, self.page_secret, self.workdir / "tokens-pg.txt"
        )
        self.pg_database = f"userservice_bench_{self.run_id}"
        try:
            self.pg_url = seed_postgres(self.args.postgres_url, self.pg_database, source)
        except Exception as error:  # any driver or OS error: PostgreSQL is then not measured
            for name in PG_CONFIGS:
                self.failed[name] = f"PostgreSQL at {self.args.postgres_url}: {error}"
            print(f"[bench] PostgreSQL not available: {error}", file=sys.stderr)
            self.drop_postgres()

    def drop_postgres(self) -> None:
        """Drop this run's PostgreSQL database, if it made one."""
        if not self.pg_database:
            return
        with contextlib.suppress(Exception):
            drop_postgres(self.args.postgres_url, self.pg_database)
        self.pg_database = ""

    def start(self, scenarios: list[Scenario]) -> None:
        """Start every long-lived server the scenarios use; record why one could not."""
        needed = [
            name
            for name in (
                "bare",
                "bare+uvloop",
                "floor",
                "floor-1m",
                "floor-write",
                "floor-pg",
                "full",
                "full-1m",
                "full-write",
                "full-2w",
                "full-pg",
            )
            if any(name in s.configs for s in scenarios if s.kind != "startup")
            and name not in self.failed
        ]
        needed += [name for name in _venv_configs(self.args) if name not in needed]
        for name in needed:
            try:
                self.servers[name] = self.start_one(name)
            except BenchError as error:
                self.failed[name] = str(error)
                print(f"[bench] {name}: not available: {error}", file=sys.stderr)
                continue
            server = self.servers[name]
            memory = tree_memory_kib(server.process.pid)
            server.idle_rss_mib = memory["VmRSS"] / 1024
            print(
                f"[bench] {name} up in {server.ready_seconds:.2f} s, idle RSS "
                f"{server.idle_rss_mib:.0f} MiB",
                file=sys.stderr,
            )

    def _database(self, name: str) -> Path:
        target = self.workdir / f"{name.replace('@', '-at-')}.db"
        if name == "full-write":
            return target  # an empty store: the service migrates it at start
        if name == "floor-write":
            migrate_sqlite(target)  # empty too, with the same schema
            return target
        source = self.files["big"] if name in ("full-1m", "floor-1m") else self.files["small"]
        return copy_seeded(source, target)

    def start_one(self, name: str) -> Server:
        """Start the long-lived server of configuration `name` and wait until it listens."""
        if "@" in name:
            # The same configuration run by another environment's interpreter (--venv).
            base, _, label = name.partition("@")
            venv = self.args.venvs[label]
            if base == "bare+uvloop":
                return start_bare(name, uvloop=True, python=str(venv / "bin" / "python"))
            database = f"sqlite:///{self._database(name)}"
            return start_full(name, self._full_env(database), self.workdir, 1, venv / "bin")
        if name.startswith("bare"):
            return start_bare(name, uvloop=name == "bare+uvloop")
        if name in STORE_FLOORS:
            # On uvloop, as the service runs.
            if name == "floor-pg":
                url, tokens = self.pg_url, self.files["tokens_pg"]
            else:
                url = f"sqlite:///{self._database(name)}"
                tokens = self.files["tokens_big" if name == "floor-1m" else "tokens_small"]
            extra = ["--store", url, "--page-tokens", str(tokens)]
            extra += ["--page-after-ids", str(tokens.with_suffix(".ids"))]
            return start_bare(name, uvloop=True, extra=extra)
        workers = 2 if name == "full-2w" else 1
        database = self.pg_url if name == "full-pg" else f"sqlite:///{self._database(name)}"
        server = start_full(name, self._full_env(database), self.workdir, workers)
        if workers > 1:
            # Wait until every worker listens: connections made before would all land
            # on the first one.
            deadline = time.monotonic() + 30.0
            while listening_sockets(server.port) < workers:
                if time.monotonic() > deadline or server.process.poll() is not None:
                    stop(server.process)
                    raise BenchError(f"{name}: {workers} workers did not all listen in 30 s")
                time.sleep(0.05)
        return server

    def _full_env(self, database: str) -> dict[str, str]:
        # Inherited USERSERVICE_* settings (a developer's shell) must not change what we
        # measure.
        env = {k: v for k, v in os.environ.items() if not k.startswith("USERSERVICE_")}
        env.update(
            {
                "USERSERVICE_DATABASE_URL": database,
                "USERSERVICE_AUTH_JWT_SECRET": self.secret,
                "USERSERVICE_AUTH_ISSUER": "https://issuer.bench.invalid",
                "USERSERVICE_AUTH_AUDIENCE": "userservice-bench",
                "USERSERVICE_PAGE_TOKEN_SECRET": self.page_secret,
                "USERSERVICE_METRICS_ADDRESS": "",
                # Access logging stays on at INFO: its cost is part of the service's cost.
                "USERSERVICE_LOG_LEVEL": "INFO",
                "USERSERVICE_UVLOOP": "true",
                # The limiter still runs per call; it just must never reject.
                "USERSERVICE_RATE_LIMIT_RPS": "1000000",
                "USERSERVICE_RATE_LIMIT_BURST": "1000000",
                "USERSERVICE_MAX_CONCURRENT_RPCS": "1000",
                "USERSERVICE_SHUTDOWN_DRAIN_SECONDS": "0",
                "USERSERVICE_SHUTDOWN_GRACE_SECONDS": "1",
            }
        )
        return env

    def mint_token(self) -> None:
        """Mint the bearer token every load generator sends, with `userservice token`."""
        env = self._full_env(f"sqlite:///{self.workdir / 'unused.db'}")
        argv = [str(Path(sys.executable).parent / "userservice"), "token"]
        argv += [
            "--subject",
            "bench",
            "--scopes",
            "users.read users.write users.admin",
            "--ttl",
            "1h",
        ]
        token = run_json(argv, env, 30.0, raw=True).strip()
        if not token or any(c.isspace() for c in token):
            raise BenchError(f"userservice token printed {token[:80]!r}, expected one token")
        self.token = token

    def measure(self, scenario: Scenario, config: str, round_index: int) -> dict[str, Any]:
        """One measurement of `config` in `scenario`."""
        if scenario.kind == "startup":
            return self._startup(config)
        server = self.servers[config]
        if server.process.poll() is not None:
            raise BenchError(f"{config} server exited {server.process.returncode}")
        log_before = server.log_path.stat().st_size if server.log_path else 0
        argv = [sys.executable, "-m", "benchmarks.loadgen", scenario.kind]
        argv += ["--target", server.target]
        argv += ["--server-pid", str(server.process.pid)]
        prefix = f"{scenario.key}-{self.run_id}-{round_index}-{config}"
        if scenario.kind == "load":
            argv += ["--method", scenario.method, "--concurrency", str(scenario.concurrency)]
            argv += ["--channels", str(scenario.channels), "--email-prefix", prefix]
            argv += ["--warmup", str(self.args.warmup), "--seconds", str(self.args.seconds)]
            argv += [
                "--user-ids-file",
                str(self.files["pg_user_ids" if scenario.pg else "user_ids"]),
            ]
            tokens = self.files[
                "tokens_pg" if scenario.pg else "tokens_big" if scenario.big else "tokens_small"
            ]
            argv += ["--page-tokens-file", str(tokens)]
            timeout = self.args.warmup + self.args.seconds + 60.0
        else:
            count = self.args.stream_users
            if scenario.pg and scenario.kind == "export":
                count = min(count, self.args.pg_rows)  # the export ends with the table
            if scenario.kind == "watch":
                count = self.args.watch_events
                argv += ["--watchers", str(self.args.watchers)]
                argv += ["--concurrency", str(scenario.concurrency)]
            if scenario.kind in ("import", "watch"):
                argv += ["--email-prefix", prefix]
            argv += ["--count", str(count)]
            timeout = 600.0
        # The floor gets the same token: the same request headers on both sides keep
        # HPACK and metadata handling out of the difference.
        result: dict[str, Any] = run_json(argv, token_env(self.token), timeout)
        if server.log_path and result.get("total_calls"):
            logged = server.log_path.stat().st_size - log_before
            result["log_bytes_per_call"] = logged / result["total_calls"]
        return result

    def _startup(self, config: str) -> dict[str, Any]:
        """Spawn a fresh server and time it from spawn to health SERVING."""
        port = free_port()
        poller = spawn(
            [sys.executable, "-m", "benchmarks.loadgen", "startup", f"--target=127.0.0.1:{port}"],
            None,
            subprocess.PIPE,
            None,
        )
        server_process = None
        try:
            if read_line(poller, 30.0) != "READY":
                raise BenchError("startup poller did not start")
            if config == "bare":
                argv = [sys.executable, "-m", "benchmarks.bare_server", "--port", str(port)]
                env = None
            else:
                database = self.workdir / "startup.db"
                if not database.exists():
                    copy_seeded(self.files["small"], database)
                argv = [str(Path(sys.executable).parent / "userservice"), "serve"]
                env = self._full_env(f"sqlite:///{database}")
                env["USERSERVICE_LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
            started = time.monotonic()
            server_process = spawn(argv, env, subprocess.DEVNULL, subprocess.DEVNULL)
            line = read_line(poller, 60.0)
            if not line.startswith("{"):
                raise BenchError(f"startup poller: {line!r} (exit {poller.poll()})")
            timing = json.loads(line)
            memory = memory_kib(server_process.pid)
        finally:
            stop(poller)
            if server_process is not None:
                stop(server_process)
        return {
            "operations": 1,
            "startup_ms": (timing["serving_at"] - started) * 1e3,
            "listening_ms": (timing["listening_at"] - started) * 1e3,
            "serving_rss_mib": memory.get("VmRSS", 0) / 1024,
            "errors": 0,
        }

    def run(self, scenarios: list[Scenario]) -> None:
        """The interleaved rounds."""
        for index in range(self.args.rounds):
            for scenario in scenarios:
                if scenario.bulk and index >= self.args.bulk_rounds:
                    continue
                configs = [c for c in scenario.configs if self._available(c, scenario)]
                shift = index % max(1, len(configs))
                for config in configs[shift:] + configs[:shift]:
                    self._one(scenario, config, index)

    def _available(self, config: str, scenario: Scenario) -> bool:
        if scenario.kind == "startup":
            return True
        return config in self.servers and not self.servers[config].failure

    def _one(self, scenario: Scenario, config: str, index: int) -> None:
        cells = self.rows.setdefault(scenario.key, {})
        try:
            row = self.measure(scenario, config, index)
        except BenchError as error:
            failure = str(error)
            server = self.servers.get(config)
            if server is not None and server.process.poll() is not None:
                server.failure = failure
                if server.log_path:
                    failure += f"\n--- server log tail ---\n{tail(server.log_path)}"
            print(f"[bench] {scenario.key} {config}: {failure}", file=sys.stderr)
            cells.setdefault(config, [])
            return
        row["round"] = index
        cells.setdefault(config, []).append(row)
        print(
            f"[bench] round {index + 1} {scenario.key:<14} {config:<12} "
            + report.progress(scenario, row),
            file=sys.stderr,
        )

    def memory(self) -> dict[str, dict[str, float | None]]:
        """Idle RSS (right after start) and peak RSS (high-water mark) per server, MiB."""
        result: dict[str, dict[str, float | None]] = {}
        for name, server in self.servers.items():
            peak = tree_memory_kib(server.process.pid)["VmHWM"] / 1024
            result[name] = {"idle_rss_mib": server.idle_rss_mib, "peak_rss_mib": peak}
        return result

    def stop(self) -> None:
        """Stop every server."""
        for server in self.servers.values():
            stop(server.process)
        self.drop_postgres()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=1.5, help="timed window (default 1.5)")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up (default 0.5)")
    parser.add_argument(
        "--bulk-rounds",
        type=int,
        default=2,
        help="rounds of export, import, watch and start-up, at most --rounds (default 2)",
    )
    parser.add_argument(
        "--stream-users", type=int, default=50_000, help="users exported/imported (50000)"
    )
    parser.add_argument("--watchers", type=int, default=16, help="WatchUsers streams (16)")
    parser.add_argument(
        "--watch-events", type=int, default=1000, help="users created while watched (1000)"
    )
    parser.add_argument("--small-rows", type=int, default=10_000, help="small store (10000)")
    parser.add_argument("--big-rows", type=int, default=1_000_000, help="big store (1000000)")
    parser.add_argument("--pg-rows", type=int, default=100_000, help="PostgreSQL store (100000)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a database to connect to as a user who may CREATE DATABASE; the run creates "
        "its own beside it and drops it at the end ($BENCH_POSTGRES_URL)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds, 1 s windows, 20000 streamed users, 300 watched: a smoke run, not figures",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios or groups (" + ", ".join(GROUPS) + "), or all; "
        "default: all but GetUser c1 and c64",
    )
    parser.add_argument(
        "--venv",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run GetUser's bare+uvloop and full with another virtualenv's packages "
        "(e.g. another grpcio), as configurations bare+uvloop@LABEL and full@LABEL in the "
        "same rounds; repeatable",
    )
    parser.add_argument("--output", type=Path, default=REPO / ".bench" / "results.json")
    parser.add_argument(
        "--cache-dir", type=Path, default=REPO / ".bench", help="seeded stores (.bench/)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.bulk_rounds, args.seconds, args.warmup = 2, 2, 1.0, 0.3
        args.stream_users = min(args.stream_users, 20_000)
        args.watch_events = min(args.watch_events, 300)
    args.bulk_rounds = min(args.bulk_rounds, args.rounds)
    if (
        args.rounds < 1
        or args.bulk_rounds < 1
        or args.seconds <= 0
        or args.warmup < 0
        or args.stream_users < 1
        or args.watchers < 1
        or args.watch_events < 1
    ):
        parser.error(
            "--rounds, --bulk-rounds, --stream-users, --watchers and --watch-events >= 1,"
            " --seconds > 0, --warmup >= 0"
        )
    if args.small_rows < 200 or args.big_rows < 200 or args.pg_rows < 200:
        parser.error("--small-rows, --big-rows and --pg-rows must be at least 200")
    try:
        args.scenarios = select(args.only)
    except ValueError as error:
        parser.error(str(error))
    args.venvs = {}
    for entry in args.venv:
        label, _, path = entry.partition("=")
        if not label or not path or not (Path(path) / "bin" / "userservice").exists():
            parser.error(f"--venv {entry!r}: LABEL=PATH of a virtualenv with userservice installed")
        args.venvs[label] = Path(path)
    extra = _venv_configs(args)
    args.scenarios = [
        dataclasses.replace(s, configs=(*s.configs, *extra)) if s.key.startswith("get-c") else s
        for s in args.scenarios
    ]
    return args


def _venv_configs(args: argparse.Namespace) -> list[str]:
    """The configurations --venv adds to the SQLite GetUser scenarios: bare+uvloop and full."""
    return [f"{base}@{label}" for label in args.venvs for base in ("bare+uvloop", "full")]


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so `finally` stops the servers.
    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare, start the servers, run the rounds, stop everything; return the summary."""
    scenarios: list[Scenario] = args.scenarios
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    # Next to the cached files rather than in /tmp, which may be memory: the run copies
    # the big store.
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache_dir))
    bench = Bench(args, workdir)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    try:
        bench.prepare(scenarios)
        bench.mint_token()
        bench.start(scenarios)
        bench.run(scenarios)
        memory = bench.memory()
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = report.summarize(scenarios, bench.rows, memory, bench.failed)
    summary["loadavg"] = {"before": load_before, "after": os.getloadavg()[0]}
    summary["cpus"] = os.cpu_count()
    summary["wall_seconds"] = time.monotonic() - started
    summary["settings"] = {
        key: getattr(args, key)
        for key in (
            "rounds",
            "bulk_rounds",
            "seconds",
            "warmup",
            "stream_users",
            "watchers",
            "watch_events",
            "small_rows",
            "big_rows",
            "pg_rows",
        )
    }
    summary["settings"]["quick"] = args.quick
    summary["command"] = "make bench" + (f" ARGS='{' '.join(args.argv)}'" if args.argv else "")
    summary["host"] = {"python": platform.python_version(), "platform": platform.platform()}
    summary["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m benchmarks`; exit status 1 if nothing was measured."""
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _terminate_as_exit():
            summary = run(args)
    except KeyboardInterrupt:
        # run()'s finally has already stopped every server by the time this runs.
        print("\n[bench] interrupted; servers stopped, no results written", file=sys.stderr)
        return 130
    except BenchError as error:
        print(f"[bench] {error}", file=sys.stderr)
        return 1
    print(report.render(summary))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nresults: {args.output}")
    measured = any(
        cell["rounds"]
        for entry in summary["scenarios"].values()
        for cell in entry["configs"].values()
    )
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())

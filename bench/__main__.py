"""Run the benchmark: bare grpc.aio vs bare on uvloop vs the full service, interleaved.

Every server and every load generator is its own process, so the server's CPU time read
from /proc covers only the server. Configurations alternate within each round and the
report uses medians of per-round values and per-round paired ratios: on a shared, noisy
machine, numbers from separate runs are not comparable, ratios within one round are.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import platform
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._proc import memory_kib
from bench.loadgen import BEARER_ENV
from userservice.interceptors.auth import mint_token

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # not resolved: the venv's bin, not the base interpreter's
CONFIGS = ("bare", "bare+uvloop", "full")
RATIOS = (("bare+uvloop", "bare"), ("full", "bare"), ("full", "bare+uvloop"))
_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """A configuration could not be started or measured; the message says why."""


@dataclass
class Server:
    """One running server under test."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    token: str = ""
    user_id: str = "019b7a4e-6c2f-7d3e-8f1a-2b3c4d5e6f70"
    log_path: Path | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    failure: str = ""

    @property
    def target(self) -> str:
        """The address the load generator dials."""
        return f"127.0.0.1:{self.port}"


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the harness is SIGKILLed, the kernel
    # kills its servers too instead of leaving them bound to ports and burning CPU.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(argv: Sequence[str], env: dict[str, str] | None, stdout: Any, stderr: Any) -> Any:
    return subprocess.Popen(
        list(argv),
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        # Own process group: Ctrl-C in the terminal reaches only the harness, which then
        # stops every child in order (and the group kill catches grandchildren).
        start_new_session=True,
        # preexec_fn is only unsafe in a threaded parent; the harness never starts threads.
        preexec_fn=_die_with_parent,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a child's process group: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        return


def _free_port() -> int:
    # Bound without SO_REUSEADDR/SO_REUSEPORT, so the kernel hands out a port nobody holds.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise BenchError(f"no output within {timeout:.0f} s")
    return process.stdout.readline().decode().strip()


def start_bare(name: str, uvloop: bool) -> Server:
    """Start `python -m bench.bare_server` and wait until it listens."""
    argv = [sys.executable, "-m", "bench.bare_server", "--port", "0"]
    if uvloop:
        argv.append("--uvloop")
    process = _spawn(argv, None, subprocess.PIPE, None)
    try:
        line = _read_line(process, 15.0)
        if not line.startswith("LISTENING "):
            raise BenchError(f"{name}: unexpected output {line!r} (exit {process.poll()})")
        # The bare server ignores the token, but receiving the same request headers as
        # the full service keeps HPACK and metadata handling out of the difference.
        token = mint_token(secrets.token_urlsafe(30), "bench", ["users.read"], 3600)
        return Server(name=name, process=process, port=int(line.split()[1]), token=token)
    except BaseException:
        _stop(process)
        raise


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _token_env(token: str) -> dict[str, str]:
    # In the environment, not argv: other users of this shared machine can read argv in ps.
    return {**os.environ, BEARER_ENV: token}


def _run(argv: Sequence[str], env: dict[str, str] | None, timeout: float) -> str:
    # Name the command without its flags, which can be long and are not needed to see
    # which step failed.
    words = itertools.takewhile(lambda word: not word.startswith("--"), argv[1:])
    command = " ".join([Path(argv[0]).name, *words])
    try:
        done = subprocess.run(
            list(argv),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            preexec_fn=_die_with_parent,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{command}: timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{command} exited {done.returncode}: " + " | ".join(detail))
    return done.stdout.decode()


def full_environment(workdir: Path, port: int, concurrency: int) -> dict[str, str]:
    """Environment for `userservice serve` and `userservice token` in the full run."""
    # Inherited USERSERVICE_* settings (a developer's shell) must not change what we measure.
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERSERVICE_")}
    env.update(
        {
            "USERSERVICE_DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
            "USERSERVICE_AUTH_JWT_SECRET": secrets.token_urlsafe(30),  # 40 characters
            "USERSERVICE_AUTH_ISSUER": "https://issuer.bench.invalid",
            "USERSERVICE_AUTH_AUDIENCE": "userservice-bench",
            "USERSERVICE_LISTEN_ADDRESS": f"127.0.0.1:{port}",
            "USERSERVICE_METRICS_ADDRESS": "",
            # Access logging stays on at INFO: its cost is part of the service's cost.
            "USERSERVICE_LOG_LEVEL": "INFO",
            "USERSERVICE_UVLOOP": "true",
            # The limiter still runs per call; it just must never reject.
            "USERSERVICE_RATE_LIMIT_RPS": "1000000",
            "USERSERVICE_RATE_LIMIT_BURST": "1000000",
            "USERSERVICE_MAX_CONCURRENT_RPCS": str(max(1000, 2 * concurrency)),
            "USERSERVICE_SHUTDOWN_DRAIN_SECONDS": "0",
            "USERSERVICE_SHUTDOWN_GRACE_SECONDS": "1",
        }
    )
    return env


def start_full(workdir: Path, concurrency: int) -> Server:
    """Start `userservice serve` on a fresh SQLite file, seed one user, mint a token."""
    userservice = str(BIN / "userservice")
    _run([userservice, "--help"], None, 30.0)
    port = _free_port()
    env = full_environment(workdir, port, concurrency)
    token = _run(
        [
            userservice,
            "token",
            "--subject",
            "bench",
            "--scopes",
            "users.read users.write",
            "--ttl",
            "1h",
        ],
        env,
        30.0,
    ).strip()
    if not token or any(c.isspace() for c in token):
        raise BenchError(f"userservice token printed {token[:80]!r}, expected one token")
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = _spawn([userservice, "serve"], env, log, log)
    server = Server(name="full", process=process, port=port, token=token, log_path=log_path)
    try:
        deadline = time.monotonic() + 30.0
        while True:
            if process.poll() is not None:
                raise BenchError(f"userservice serve exited {process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline:
                raise BenchError("userservice serve did not listen within 30 s")
            time.sleep(0.1)
        seeded = json.loads(
            _run(
                [sys.executable, "-m", "bench.loadgen", "seed", "--target", server.target],
                _token_env(token),
                40.0,
            )
        )
        server.user_id = seeded["user_id"]
        return server
    except BaseException as error:
        _stop(process)
        if isinstance(error, BenchError):
            raise BenchError(f"{error}\n--- server log tail ---\n{_tail(log_path)}") from None
        raise


def measure(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """One timed load window against `server`; returns the load generator's numbers plus RSS."""
    if server.process.poll() is not None:
        raise BenchError(f"{server.name} server exited {server.process.returncode}")
    log_before = server.log_path.stat().st_size if server.log_path else 0
    argv = [sys.executable, "-m", "bench.loadgen", "load", "--target", server.target]
    argv += ["--server-pid", str(server.process.pid), "--user-id", server.user_id]
    argv += ["--concurrency", str(args.concurrency), "--channels", str(args.channels)]
    argv += ["--warmup", str(args.warmup), "--seconds", str(args.seconds)]
    timeout = args.warmup + args.seconds + 60.0
    result: dict[str, Any] = json.loads(_run(argv, _token_env(server.token), timeout))
    memory = memory_kib(server.process.pid)
    result["rss_mib"] = memory.get("VmRSS", 0) / 1024
    result["peak_rss_mib"] = memory.get("VmHWM", 0) / 1024
    if server.log_path and result["total_calls"]:
        logged = server.log_path.stat().st_size - log_before
        result["log_bytes_per_call"] = logged / result["total_calls"]
    return result


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else None


def _paired(
    servers: dict[str, Server], a: str, b: str, key: str, combine: Callable[[float, float], float]
) -> float | None:
    # Pair by round: both sides of a ratio were measured seconds apart, under the same
    # background load, so the pair cancels most of the machine's noise.
    if a not in servers or b not in servers:
        return None
    by_round = {row["round"]: row for row in servers[b].rounds}
    values = [
        combine(row[key], by_round[row["round"]][key])
        for row in servers[a].rounds
        if row["round"] in by_round and row.get(key) and by_round[row["round"]].get(key)
    ]
    return statistics.median(values) if values else None


def summarize(servers: dict[str, Server]) -> dict[str, Any]:
    """Medians per configuration, paired ratios and the full-stack overhead per call."""
    keys = (
        "calls_per_s",
        "server_cpu_us_per_call",
        "server_cores",
        "client_cpu_us_per_call",
        "client_cores",
        "background_cores",
        "latency_p50_ms",
        "latency_p99_ms",
        "rss_mib",
        "log_bytes_per_call",
    )
    summary: dict[str, Any] = {"configs": {}, "ratios": {}}
    for name, server in servers.items():
        entry: dict[str, Any] = {"failure": server.failure, "rounds": server.rounds}
        if server.rounds:
            entry["median"] = {key: _median(server.rounds, key) for key in keys}
            entry["range"] = {
                key: [min(r[key] for r in server.rounds), max(r[key] for r in server.rounds)]
                for key in ("calls_per_s", "server_cpu_us_per_call")
            }
            entry["errors"] = sum(r["errors"] for r in server.rounds)
            entry["peak_rss_mib"] = max(r["peak_rss_mib"] for r in server.rounds)
        summary["configs"][name] = entry
    for a, b in RATIOS:
        summary["ratios"][f"{a} / {b}"] = {
            key: _paired(servers, a, b, key, lambda x, y: x / y)
            for key in ("calls_per_s", "server_cpu_us_per_call")
        }
    summary["chain_and_store_overhead_us_per_call"] = _paired(
        servers, "full", "bare+uvloop", "server_cpu_us_per_call", lambda x, y: x - y
    )
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(summary: dict[str, Any], args: argparse.Namespace) -> str:
    """The human-readable report."""
    lines = [
        f"GetUser, {args.concurrency} in flight over {args.channels} channel(s), "
        f"{args.rounds} rounds x {args.seconds:g} s (+{args.warmup:g} s warm-up), "
        "medians over rounds [min-max]",
        "",
        f"{'config':<12} {'calls/s':>20} {'srv CPU us/call':>20} {'srv cores':>9} "
        f"{'cli us/call':>11} {'bg cores':>8} {'p50 ms':>7} {'p99 ms':>7} {'RSS MiB':>8} "
        f"{'errors':>6}",
    ]
    for name, entry in summary["configs"].items():
        if "median" not in entry:
            lines.append(f"{name:<12} not measured: {entry['failure'].splitlines()[0]}")
            continue
        med, rng = entry["median"], entry["range"]
        calls_lo, calls_hi = rng["calls_per_s"]
        calls = f"{med['calls_per_s']:.0f} [{calls_lo:.0f}-{calls_hi:.0f}]"
        cpu_lo, cpu_hi = rng["server_cpu_us_per_call"]
        cpu = f"{_fmt(med['server_cpu_us_per_call'], '.1f')} [{cpu_lo:.0f}-{cpu_hi:.0f}]"
        lines.append(
            f"{name:<12} {calls:>20} {cpu:>20} {_fmt(med['server_cores'], '.2f'):>9} "
            f"{_fmt(med['client_cpu_us_per_call'], '.1f'):>11} "
            f"{_fmt(med['background_cores'], '.2f'):>8} "
            f"{_fmt(med['latency_p50_ms'], '.2f'):>7} {_fmt(med['latency_p99_ms'], '.2f'):>7} "
            f"{_fmt(med['rss_mib'], '.1f'):>8} {entry['errors']:>6}"
        )
        if entry["failure"]:
            lines.append(f"{'':<12} stopped early: {entry['failure'].splitlines()[0]}")
    ratios = [(label, r) for label, r in summary["ratios"].items() if r["calls_per_s"]]
    if ratios:
        lines += ["", "paired per-round ratios (median):   throughput   server CPU/call"]
    for label, ratio in ratios:
        calls, cpu = ratio["calls_per_s"], ratio["server_cpu_us_per_call"]
        lines.append(f"  {label:<32} {calls:>10.2f}x {cpu:>15.2f}x")
    overhead = summary["chain_and_store_overhead_us_per_call"]
    if overhead is not None:
        log = summary["configs"]["full"]["median"].get("log_bytes_per_call")
        lines.append(
            f"\nchain + store overhead (full - bare+uvloop server CPU): {overhead:.1f} us/call"
            + (f"; access log {log:.0f} bytes/call" if log else "")
        )
    load = summary["loadavg"]
    lines.append(
        f"\n{summary['cpus']} CPUs, load average {load['before']:.2f} before / "
        f"{load['after']:.2f} after; bg cores = other processes' CPU during the window.\n"
        "Client and server share these CPUs, so calls/s depends on the machine; server CPU "
        "us/call is the number to compare."
    )
    return "\n".join(lines)


def _parse_only(raw: str) -> list[str]:
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(CONFIGS)}; got {raw!r}")
    return [name for name in CONFIGS if name in names]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    # 6 rounds: with 3 configurations rotating, each one runs in every position twice.
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed window (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up (default 1)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (64)")
    parser.add_argument("--channels", type=int, default=2, help="client channels (2)")
    parser.add_argument(
        "--only", type=_parse_only, default=list(CONFIGS), help="e.g. bare,full (default: all)"
    )
    parser.add_argument("--output", type=Path, default=REPO / ".bench" / "results.json")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--rounds >= 1, --seconds > 0 and --warmup >= 0")
    if not 1 <= args.channels <= args.concurrency <= 4096:
        parser.error("need 1 <= --channels <= --concurrency <= 4096")
    return args


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
    """Start the servers, run the interleaved rounds, stop everything; return the summary."""
    servers: dict[str, Server] = {}
    failed: dict[str, str] = {}
    workdir = Path(tempfile.mkdtemp(prefix="userservice-bench-"))
    load_before = os.getloadavg()[0]
    try:
        for name in args.only:
            try:
                if name == "full":
                    servers[name] = start_full(workdir, args.concurrency)
                else:
                    servers[name] = start_bare(name, uvloop=name == "bare+uvloop")
            except BenchError as error:
                failed[name] = str(error)
                print(f"[bench] {name}: not available: {error}", file=sys.stderr)
        names = list(servers)
        for index in range(args.rounds):
            # Rotate the order each round so no configuration always runs first or right
            # after the most expensive one.
            shift = index % max(1, len(names))
            for name in names[shift:] + names[:shift]:
                server = servers[name]
                if server.failure:
                    continue
                try:
                    row = measure(server, args)
                except BenchError as error:
                    server.failure = str(error)
                    if server.log_path:
                        server.failure += f"\n--- server log tail ---\n{_tail(server.log_path)}"
                    print(f"[bench] {name}: {server.failure}", file=sys.stderr)
                    continue
                row["round"] = index
                server.rounds.append(row)
                print(
                    f"[bench] round {index + 1}/{args.rounds} {name:<12} "
                    f"{row['calls_per_s']:8.0f} calls/s "
                    f"{row['server_cpu_us_per_call'] or 0:7.1f} us/call server "
                    f"{row['errors']} errors",
                    file=sys.stderr,
                )
    finally:
        for server in servers.values():
            _stop(server.process)
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(servers)
    for name, reason in failed.items():
        summary["configs"][name] = {"failure": reason, "rounds": []}
    summary["configs"] = {n: summary["configs"][n] for n in CONFIGS if n in summary["configs"]}
    summary["loadavg"] = {"before": load_before, "after": os.getloadavg()[0]}
    summary["cpus"] = os.cpu_count()
    summary["settings"] = {
        key: getattr(args, key)
        for key in ("rounds", "seconds", "warmup", "concurrency", "channels")
    }
    summary["host"] = {"python": platform.python_version(), "platform": platform.platform()}
    summary["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m bench`; exit status 1 if no configuration was measured."""
    args = parse_args(argv)
    try:
        with _terminate_as_exit():
            summary = run(args)
    except KeyboardInterrupt:
        # run()'s finally has already stopped every server by the time this runs.
        print("\n[bench] interrupted; servers stopped, no results written", file=sys.stderr)
        return 130
    print(render(summary, args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nresults: {args.output}")
    measured = any(entry.get("rounds") for entry in summary["configs"].values())
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())

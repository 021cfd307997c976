"""Profile one server of the bench under one scenario's load with py-spy; print where it goes.

`python -m benchmarks.profile import` starts the service's configuration of that scenario
(`full-write` for import, `full-1m` for export, `full` for the GetUser ones, `full-pg` for the
PostgreSQL ones; `--config floor`, or another of the scenario's configurations, for a floor),
records it with `py-spy record --format raw` while the bench's
own load generator runs the scenario once, and prints the share of samples per function:
self (the innermost frame) and inclusive (anywhere on the stack), over the samples in which
the server was not idle. The raw stacks stay in `--output` for a flame graph (speedscope,
flamegraph.pl). py-spy must be installed (it is in the `dev` extra) and allowed to ptrace.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.__main__ import Bench, parse_args
from benchmarks._proc import thread_cpu_seconds
from benchmarks.procs import REPO, BenchError
from benchmarks.scenarios import SCENARIOS

# py-spy raw frames read "function (path/to/file.py:line)"; the line is dropped when totals
# are made per function.
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _config_for(key: str, requested: str) -> str:
    scenario = next(s for s in SCENARIOS if s.key == key)
    if requested:
        if requested not in scenario.configs:
            raise SystemExit(f"{key} runs {', '.join(scenario.configs)}, not {requested}")
        return requested
    return next(config for config in scenario.configs if config.startswith("full"))


def _function(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    # Shortest readable location: from the package directory on.
    for marker in ("site-packages/", "/src/", "/benchmarks/"):
        if marker in path:
            path = path.rpartition(marker)[2]
            break
    return f"{match['function']} ({path})"


def summarize(raw: Path, top: int) -> str:
    """Return the self and inclusive shares of the top functions in a py-spy raw file."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # The first frame is the thread's own label when py-spy records threads apart.
        frames = [_function(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for function in dict.fromkeys(frames):  # once per sample, outermost first
            inclusive[function] += count
    if not total:
        return "no samples (was the server idle, or py-spy denied ptrace?)"
    lines = [f"{total} samples"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"\n{title:>9}  function")
        for function, count in counter.most_common(top):
            lines.append(f"{count / total:9.1%}  {function}")
    return "\n".join(lines)


def thread_table(threads: dict[str, float], elapsed: float) -> str:
    """Return the server's CPU per thread name (from /proc): what py-spy cannot attribute.

    py-spy sees only threads running Python: grpc's own C++ threads (event_engine) are
    missing from its samples, and it counts the grpc poller thread (`_poll_wrapper`, whose
    only Python frame is Thread.run) as busy while it waits in C.
    """
    total = sum(threads.values()) or 1.0
    lines = ["server CPU by thread (/proc), over the load:", f"{'share':>9}  {'cores':>5}  thread"]
    for name, cpu in sorted(threads.items(), key=lambda item: -item[1]):
        if cpu > 0:
            lines.append(f"{cpu / total:9.1%}  {cpu / elapsed:5.2f}  {name}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    keys = [s.key for s in SCENARIOS if s.kind != "startup"]
    parser.add_argument("scenario", choices=keys, help="the load to profile under")
    parser.add_argument("--config", default="", help="which server (default: the one measured)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (250)")
    parser.add_argument(
        "--native",
        action="store_true",
        help="also unwind C and Cython frames (grpc, uvloop); pauses the server per sample",
    )
    parser.add_argument("--top", type=int, default=30, help="functions listed per table (30)")
    parser.add_argument("--stream-users", type=int, default=100_000, help="export/import users")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed window of unary load")
    parser.add_argument("--small-rows", type=int, default=10_000, help="small store (10000)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".bench", help="seeded stores")
    parser.add_argument("--output", type=Path, default=REPO / ".bench" / "profile.txt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.profile`."""
    options = _parser().parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy (the dev extra has it)")
    config = _config_for(options.scenario, options.config)
    args = parse_args(
        [
            "--only",
            options.scenario,
            "--stream-users",
            str(options.stream_users),
            "--seconds",
            str(options.seconds),
            "--small-rows",
            str(options.small_rows),
            "--cache-dir",
            str(options.cache_dir),
        ]
    )
    scenario = args.scenarios[0]
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="profile-", dir=args.cache_dir))
    bench = Bench(args, workdir)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        bench.prepare([scenario])
        bench.mint_token()
        server = bench.start_one(config)
        bench.servers[config] = server
        record = [spy, "record", "--pid", str(server.process.pid), "--format", "raw"]
        record += ["--rate", str(options.rate), "--output", str(options.output)]
        # --nonblocking: the server is not paused per sample, so the profile does not slow it;
        # unwinding native frames needs the pause.
        record.append("--native" if options.native else "--nonblocking")
        spy_process = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches before the load starts
        threads_before = thread_cpu_seconds(server.process.pid)
        started = time.monotonic()
        try:
            result = bench.measure(scenario, config, 0)
            elapsed = time.monotonic() - started
            threads = {
                name: cpu - threads_before.get(name, 0.0)
                for name, cpu in thread_cpu_seconds(server.process.pid).items()
            }
        finally:
            spy_process.send_signal(signal.SIGINT)
            _, errors = spy_process.communicate(timeout=60)
        if not options.output.exists():
            raise BenchError("py-spy wrote nothing: " + errors.decode(errors="replace")[-500:])
    except BenchError as error:
        print(f"[profile] {error}", file=sys.stderr)
        return 1
    finally:
        bench.stop()  # the servers, and the run's PostgreSQL database if it made one
        shutil.rmtree(workdir, ignore_errors=True)
    cpu = result.get("server_cpu_us_per_op")
    print(
        f"{scenario.label}, {config}: {result['per_s']:.0f} {scenario.unit}, "
        f"server {cpu:.1f} us/op (slowed by the sampling)\n"
    )
    print(thread_table(threads, elapsed))
    print()
    print(summarize(options.output, options.top))
    print(f"\nraw stacks: {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Child processes of the harness: servers under test and load generators."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.loadgen import BEARER_ENV

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # not resolved: the venv's bin, not the base interpreter's
_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """A configuration could not be started or measured; the message says why."""


@dataclass
class Server:
    """One running server under test."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path | None = None
    failure: str = ""
    ready_seconds: float = 0.0
    idle_rss_mib: float = 0.0

    @property
    def target(self) -> str:
        """The address the load generator dials."""
        return f"127.0.0.1:{self.port}"


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the harness is SIGKILLed, the kernel
    # kills its servers too instead of leaving them bound to ports and burning CPU.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: Sequence[str], env: dict[str, str] | None, stdout: Any, stderr: Any) -> Any:
    """Start a child in its own process group that dies with the harness."""
    return subprocess.Popen(
        list(argv),
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        # Own process group: Ctrl-C in the terminal reaches only the harness, which then
        # stops every child in order (and the group kill catches workers).
        start_new_session=True,
        # preexec_fn is only unsafe in a threaded parent; the harness never starts threads.
        preexec_fn=_die_with_parent,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
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


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nobody holds right now."""
    # Bound without SO_REUSEADDR/SO_REUSEPORT, so the kernel hands out a port nobody holds.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """Return the child's next stdout line; BenchError if none comes within timeout."""
    if process.stdout is None:
        raise BenchError("the child was not started with stdout=PIPE")
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise BenchError(f"no output within {timeout:.0f} s")
    return process.stdout.readline().decode().strip()


def tail(path: Path, lines: int = 15) -> str:
    """Return the last lines of a log file, or '' if it cannot be read."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def token_env(token: str) -> dict[str, str]:
    """The environment for a load generator sending `token`."""
    # In the environment, not argv: other users of this shared machine can read argv in ps.
    return {**os.environ, BEARER_ENV: token}


def run_json(
    argv: Sequence[str], env: dict[str, str] | None, timeout: float, *, raw: bool = False
) -> Any:
    """Run a command to completion; return its stdout parsed as JSON (or as text if raw)."""
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
    text = done.stdout.decode()
    return text if raw else json.loads(text)


def start_bare(
    name: str, uvloop: bool, extra: Sequence[str] = (), python: str = sys.executable
) -> Server:
    """Start `python -m benchmarks.bare_server` (plus extra flags) and wait until it listens."""
    argv = [python, "-m", "benchmarks.bare_server", "--port", "0"]
    if uvloop:
        argv.append("--uvloop")
    argv += extra
    started = time.monotonic()
    process = spawn(argv, None, subprocess.PIPE, None)
    try:
        line = read_line(process, 30.0)
        if not line.startswith("LISTENING "):
            raise BenchError(f"{name}: unexpected output {line!r} (exit {process.poll()})")
        return Server(
            name=name,
            process=process,
            port=int(line.split()[1]),
            ready_seconds=time.monotonic() - started,
        )
    except BaseException:
        stop(process)
        raise


def start_full(
    name: str, env: dict[str, str], workdir: Path, workers: int, bin_dir: Path = BIN
) -> Server:
    """Start `userservice serve` with env (plus a fresh port) and wait until it listens."""
    port = free_port()
    env = {**env, "USERSERVICE_LISTEN_ADDRESS": f"127.0.0.1:{port}"}
    log_path = workdir / f"{name}.log"
    argv = [str(bin_dir / "userservice"), "serve"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = spawn(argv, env, log, log)
    server = Server(name=name, process=process, port=port, log_path=log_path)
    try:
        deadline = started + 60.0
        while True:
            if process.poll() is not None:
                raise BenchError(f"userservice serve exited {process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline:
                raise BenchError("userservice serve did not listen within 60 s")
            time.sleep(0.05)
        server.ready_seconds = time.monotonic() - started
        return server
    except BaseException as error:
        stop(process)
        if isinstance(error, BenchError):
            raise BenchError(f"{error}\n--- server log tail ---\n{tail(log_path)}") from None
        raise

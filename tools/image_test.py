"""Build the Dockerfile with podman and run the image the way Kubernetes runs it.

`make image-test` installs podman, runc and mmdebstrap, then runs this. No container registry is
reachable from CI, so the Dockerfile's base image is a stand-in: a Debian tree of this machine's
release (its python3 is the 3.11 the official image carries) made with mmdebstrap from the
machine's own apt sources, imported under the base image's name. A real build pulls the official
image instead. The stand-in is kept in podman's storage and as a tarball under CACHE_DIR, so later
runs skip making it.

The image then runs read-only, as its numeric non-root user, with every capability dropped and
no-new-privileges, on the host network (no CNI setup needed) and a named volume, and must: report
SERVING, serve a created user, stop on `podman stop` (SIGTERM to PID 1) with exit code 0 within
the grace period, and serve the same user again after a restart on the same volume.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
CACHE_DIR = Path(os.environ.get("USERSERVICE_IMAGE_CACHE", "/var/cache/userservice-image-test"))
# crun fails on this machine's cgroup layout; runc works.
PODMAN = ("podman", "--runtime", "runc")
# podman's defaults (taken from the host's hard limits) are too high for this machine's
# sandbox, and both build and run fail without lower ones.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
STAND_IN_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "passwd")
STAND_IN_LABEL = "userservice.stand-in"
IMAGE = "localhost/userservice:image-test"
UID = "10001"
# The Deployment's terminationGracePeriodSeconds: `podman stop` waits this long before SIGKILL.
GRACE_SECONDS = 30
READY_SECONDS = 60.0


def run(
    args: Sequence[str],
    *,
    capture_output: bool = False,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command, echoing it; a failure ends the test with the command's output."""
    print("+", " ".join(args), flush=True)
    result = subprocess.run(args, text=True, capture_output=capture_output, env=env, check=False)
    if check and result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "")
        raise SystemExit(f"{' '.join(args[:3])} ... exited {result.returncode}\n{output}")
    return result


def base_image() -> str:
    """Return the Dockerfile's default base image, fully qualified as podman stores it."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    if match is None:
        raise SystemExit("Dockerfile has no ARG PYTHON_IMAGE=...")
    name = match.group(1)
    return name if "/" in name else f"docker.io/library/{name}"


def debian_codename() -> str:
    """Return this machine's Debian release codename (bookworm, trixie, ...)."""
    fields = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    return fields["VERSION_CODENAME"].strip('"')


def apt_sources() -> list[str]:
    """Return the machine's apt source files; mmdebstrap copies each into the new tree."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    return [
        str(path)
        for path in candidates
        if path.suffix in {".list", ".sources"} and path.is_file() and path.read_text().strip()
    ]


def stand_in_key(codename: str) -> str:
    """Name the stand-in's contents, so a changed package list makes a new one."""
    return f"debian-{codename}-" + "-".join(STAND_IN_PACKAGES)


def image_label(image: str, label: str) -> str | None:
    """Return one label of a local image, or None if the image is not there."""
    found = subprocess.run([*PODMAN, "image", "exists", image], check=False)
    if found.returncode != 0:
        return None
    out = run(
        [*PODMAN, "image", "inspect", "--format", "{{json .Labels}}", image], capture_output=True
    ).stdout
    labels = json.loads(out) or {}
    return str(labels.get(label, ""))


def ensure_stand_in(image: str) -> None:
    """Make the base image available: the real one if present, else the cached stand-in."""
    codename = debian_codename()
    key = stand_in_key(codename)
    label = image_label(image, STAND_IN_LABEL)
    if label == key:
        print(f"stand-in {image} ({key}) already in podman storage", flush=True)
        return
    if label == "":
        print(f"{image} is a real image (no {STAND_IN_LABEL} label): using it", flush=True)
        return
    tarball = CACHE_DIR / f"{key}.tar"
    if not tarball.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        run(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=minbase",
                "--include=" + ",".join(STAND_IN_PACKAGES),
                # A slim image: no documentation or apt lists.
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--aptopt=Acquire::Languages none",
                "--customize-hook=rm -rf $1/var/lib/apt/lists/*",
                "--format=tar",
                codename,
                str(partial),
                *apt_sources(),
            ]
        )
        partial.rename(tarball)
    run(
        [
            *PODMAN,
            "import",
            "--change",
            f"LABEL {STAND_IN_LABEL}={key}",
            "--change",
            'CMD ["python3"]',
            str(tarball),
            image,
        ]
    )


def build() -> None:
    """Build the Dockerfile as it is, on the host network with the host's CA certificates."""
    run(
        [
            *PODMAN,
            "build",
            "--pull=never",
            "--network",
            "host",
            *ULIMITS,
            "--volume",
            "/etc/ssl/certs:/etc/ssl/certs:ro",
            "--tag",
            IMAGE,
            str(ROOT),
        ]
    )


def free_port() -> int:
    """Return a loopback TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(name: str, volume: str, port: int, env: dict[str, str]) -> None:
    """Start the image detached, locked down as the Deployment runs it."""
    run(
        [
            *PODMAN,
            "run",
            "--detach",
            "--name",
            name,
            "--read-only",
            "--user",
            f"{UID}:{UID}",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--network",
            "host",
            *ULIMITS,
            "--volume",
            f"{volume}:/var/lib/userservice",
            "--env",
            f"USERSERVICE_LISTEN_ADDRESS=127.0.0.1:{port}",
            "--env",
            "USERSERVICE_METRICS_ADDRESS=",
            # Taken from this process's environment, so the key never shows in a command line.
            "--env",
            "USERSERVICE_AUTH_JWT_SECRET",
            "--env",
            "USERSERVICE_AUTH_ISSUER",
            "--env",
            "USERSERVICE_AUTH_AUDIENCE",
            "--env",
            "USERSERVICE_SHUTDOWN_DRAIN_SECONDS=1",
            "--env",
            "USERSERVICE_SHUTDOWN_GRACE_SECONDS=5",
            IMAGE,
        ],
        env=env,
    )


def wait_serving(name: str, port: int) -> None:
    """Poll grpc.health.v1 Check until SERVING, failing early if the container exits."""
    deadline = time.monotonic() + READY_SECONDS
    last = ""
    while time.monotonic() < deadline:
        state = subprocess.run(
            [*PODMAN, "inspect", "--format", "{{.State.Status}}", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if state not in {"running", "created"}:
            logs = run([*PODMAN, "logs", name], capture_output=True, check=False)
            raise SystemExit(f"container {name} is {state}:\n{logs.stdout}{logs.stderr}")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2
                )
        except grpc.RpcError as error:
            last = f"{error.code().name}: {error.details()}"
        else:
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                print(f"{name}: SERVING", flush=True)
                return
        time.sleep(0.2)
    raise SystemExit(f"{name} not SERVING within {READY_SECONDS} s: {last}")


def cli(port: int, env: dict[str, str], *args: str) -> dict[str, object]:
    """Call the server through the operator CLI and return its JSON answer."""
    out = run(
        [
            str(VENV_BIN / "userservice"),
            "users",
            "--address",
            f"127.0.0.1:{port}",
            *args,
        ],
        capture_output=True,
        env=env,
    ).stdout
    answer: dict[str, object] = json.loads(out)
    return answer


def stop(name: str) -> None:
    """podman stop (SIGTERM to PID 1); require exit code 0 well within the grace period."""
    began = time.monotonic()
    run([*PODMAN, "stop", "--time", str(GRACE_SECONDS), name])
    took = time.monotonic() - began
    code = run(
        [*PODMAN, "inspect", "--format", "{{.State.ExitCode}}", name], capture_output=True
    ).stdout.strip()
    print(f"{name}: stopped in {took:.1f} s with exit code {code}", flush=True)
    if code != "0" or took >= GRACE_SECONDS:
        logs = run([*PODMAN, "logs", name], capture_output=True, check=False)
        raise SystemExit(f"{name} exited {code} after {took:.1f} s:\n{logs.stdout}{logs.stderr}")


def check_container(name: str) -> None:
    """PID 1 is dumb-init and the server runs as the numeric non-root user."""
    pid1 = run([*PODMAN, "exec", name, "cat", "/proc/1/cmdline"], capture_output=True).stdout.split(
        "\0"
    )
    if not pid1[0].endswith("dumb-init"):
        raise SystemExit(f"PID 1 is {pid1!r}, not dumb-init")
    ids = run([*PODMAN, "exec", name, "id", "-u"], capture_output=True).stdout.strip()
    if ids != UID:
        raise SystemExit(f"running as uid {ids}, not {UID}")


def exercise() -> None:
    """Run the image twice on one volume and check what a Deployment relies on."""
    suffix = secrets.token_hex(4)
    volume = f"userservice-image-test-{suffix}"
    first, second = f"userservice-it1-{suffix}", f"userservice-it2-{suffix}"
    secret = secrets.token_urlsafe(48)
    # Outside development the issuer and audience are required; the token carries the same.
    env = {
        **os.environ,
        "USERSERVICE_AUTH_JWT_SECRET": secret,
        "USERSERVICE_AUTH_ISSUER": "https://issuer.image-test.invalid",
        "USERSERVICE_AUTH_AUDIENCE": "userservice",
    }
    token = run(
        [
            str(VENV_BIN / "userservice"),
            "token",
            "--subject",
            "image-test",
            "--scopes",
            "users.read users.write",
            "--ttl",
            "10m",
        ],
        capture_output=True,
        env=env,
    ).stdout.strip()
    env["USERSERVICE_CLI_TOKEN"] = token
    run([*PODMAN, "volume", "create", volume], capture_output=True)
    try:
        port = free_port()
        start(first, volume, port, env)
        wait_serving(first, port)
        check_container(first)
        created = cli(port, env, "create", "--email", "ada@example.com", "--display-name", "Ada")
        fetched = cli(port, env, "get", str(created["id"]))
        if fetched != created:
            raise SystemExit(f"GetUser returned {fetched}, created {created}")
        stop(first)
        port = free_port()
        start(second, volume, port, env)
        wait_serving(second, port)
        again = cli(port, env, "get", str(created["id"]))
        if again != created:
            raise SystemExit(f"after the restart GetUser returned {again}, created {created}")
        stop(second)
        print(
            "image-test: SERVING, user created and read, exit 0 on stop, user kept across restart"
        )
    finally:
        for name in (first, second):
            subprocess.run([*PODMAN, "rm", "--force", name], capture_output=True, check=False)
        subprocess.run(
            [*PODMAN, "volume", "rm", "--force", volume], capture_output=True, check=False
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Make the base, build, run the checks; --no-build reuses the last built image."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--no-build", action="store_true", help="reuse the last built image")
    options = parser.parse_args(argv)
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run `make image-test`, which installs it")
    began = time.monotonic()
    if not options.no_build:
        ensure_stand_in(base_image())
        build()
    exercise()
    print(f"image-test: {time.monotonic() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The server, split by job: wiring (Settings to components), lifecycle (the Application),
process (signals, the event loop, `--workers N`), channel (gRPC options and credentials),
sqlite_lock (what a parent holds for its workers) and workers (the supervisor).
"""

from __future__ import annotations

from userservice.policy import SERVICE_NAME
from userservice.server.errors import StartupError
from userservice.server.lifecycle import Application
from userservice.server.process import run, serve

__all__ = ["SERVICE_NAME", "Application", "StartupError", "run", "serve"]

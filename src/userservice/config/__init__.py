"""Service configuration: one Settings value built from flags and USERSERVICE_* variables.

settings.py holds every setting with its default and help; validation.py the rules they must
keep; loading.py reads them from the environment and the command line. Only the server's
wiring (and the command line) reads Settings: every component takes its own option type.
"""

from __future__ import annotations

from userservice.config.loading import add_arguments, load_settings, setting_names
from userservice.config.settings import (
    DEV_JWT_SECRET,
    ENV_PREFIX,
    ConfigError,
    Settings,
    env_name,
    previous_secrets,
    replica_scan_limit,
)
from userservice.config.validation import load_key_file

__all__ = [
    "DEV_JWT_SECRET",
    "ENV_PREFIX",
    "ConfigError",
    "Settings",
    "add_arguments",
    "env_name",
    "load_key_file",
    "load_settings",
    "previous_secrets",
    "replica_scan_limit",
    "setting_names",
]

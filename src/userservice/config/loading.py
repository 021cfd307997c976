"""Loading the settings: defaults, then USERSERVICE_* variables, then command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from userservice.config.settings import ConfigError, Settings, env_name


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{env_name(name)} must be true or false, got {raw!r}")


def _convert(name: str, kind: Any, raw: str) -> Any:
    if kind in (bool, "bool"):
        return _parse_bool(name, raw)
    converter = {"int": int, "float": float, "str": str}.get(str(kind), kind)
    try:
        return converter(raw)
    except ValueError:
        raise ConfigError(
            f"{env_name(name)}: {raw!r} is not a valid {converter.__name__}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --flag per setting; flags win over the environment."""
    for item in fields(Settings):
        flag = "--" + item.name.replace("_", "-")
        help_text = f"{item.metadata['help']} (env {env_name(item.name)}, default {item.default!r})"
        parser.add_argument(flag, dest=item.name, default=None, metavar="VALUE", help=help_text)


def load_settings(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    require_auth: bool = True,
) -> Settings:
    """Build and validate Settings: defaults, then environment, then explicit overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in fields(Settings):
        raw = environ.get(env_name(item.name))
        if raw is not None:
            values[item.name] = _convert(item.name, item.type, raw)
        override = (overrides or {}).get(item.name)
        if override is not None:
            values[item.name] = (
                _convert(item.name, item.type, override) if isinstance(override, str) else override
            )
    return dataclasses.replace(Settings(), **values).validate(require_auth=require_auth)


def setting_names() -> Sequence[str]:
    """Return every environment variable name the service reads."""
    return [env_name(item.name) for item in fields(Settings)]

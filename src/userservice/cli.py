"""The `userservice` command: serve, migrate, token, users."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from userservice.config import ConfigError, Settings, add_arguments, load_settings
from userservice.logs import configure_logging
from userservice.operator_cli import add_users_command, run_users

log = logging.getLogger("userservice.cli")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_ttl(text: str) -> float:
    unit = text[-1:].lower()
    try:
        seconds = float(text[:-1]) * _TTL_UNITS[unit] if unit in _TTL_UNITS else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use 90s, 15m, 1h)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="userservice", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the gRPC API until SIGTERM/SIGINT")
    add_arguments(serve)
    migrate = commands.add_parser("migrate", help="apply pending schema migrations and exit")
    add_arguments(migrate)
    token = commands.add_parser("token", help="mint a development JWT (HS256, configured secret)")
    add_arguments(token)
    token.add_argument("--subject", required=True, help="the sub claim (the principal)")
    token.add_argument(
        "--scopes", default="users.read", help='space-separated, e.g. "users.read users.write"'
    )
    token.add_argument("--ttl", type=_parse_ttl, default=3600.0, help="lifetime: 90s, 15m, 1h")
    add_users_command(commands)
    return parser


def _settings(arguments: argparse.Namespace) -> Settings:
    names = set(Settings.__dataclass_fields__)
    overrides = {k: v for k, v in vars(arguments).items() if k in names and v is not None}
    return load_settings(overrides=overrides, require_auth=arguments.command != "migrate")


def _run_migrate(settings: Settings) -> int:
    from userservice.server.wiring import migrate
    from userservice.storage import storage_failure

    try:
        applied = migrate(settings)
    except Exception as error:
        line = storage_failure(error)
        if line is None:
            raise
        log.debug("migration failed", exc_info=True)
        print(f"userservice: cannot migrate: {line}", file=sys.stderr)
        return 1
    log.info("migrations applied", extra={"applied": applied})
    return 0


def _stop_before_start(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    # Until serve() installs its own, these make SIGTERM/SIGINT stop a starting server
    # cleanly, also as PID 1 (where a signal without a handler is ignored).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_before_start)
    arguments = build_parser().parse_args(argv)
    if arguments.command == "users":
        return run_users(arguments)
    try:
        settings = _settings(arguments)
    except ConfigError as error:
        print(f"userservice: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if arguments.command == "token":
        if not settings.auth_jwt_secret:
            print("userservice: token needs USERSERVICE_AUTH_JWT_SECRET (HS256)", file=sys.stderr)
            return 2
        if arguments.ttl > settings.auth_max_token_lifetime_seconds:
            # The server would refuse such a token: say so now rather than at the first call.
            print(
                "userservice: --ttl exceeds USERSERVICE_AUTH_MAX_TOKEN_LIFETIME_SECONDS "
                f"({settings.auth_max_token_lifetime_seconds:.0f} s)",
                file=sys.stderr,
            )
            return 2
        from userservice.interceptors.auth import mint_token

        print(
            mint_token(
                settings.auth_jwt_secret,
                arguments.subject,
                arguments.scopes.split(),
                arguments.ttl,
                issuer=settings.auth_issuer,
                audience=settings.auth_audience,
            )
        )
        return 0
    if arguments.command == "migrate":
        return _run_migrate(settings)
    from userservice.server import run

    if settings.auth_allow_any_issuer_audience.strip() and not (
        settings.auth_issuer and settings.auth_audience
    ):
        log.warning(
            "tokens are not required to name this service's issuer and audience",
            extra={"reason": settings.auth_allow_any_issuer_audience.strip()},
        )
    if settings.dev:
        log.warning(
            "development run: mint a token with `make token` or "
            "`userservice token --subject you --scopes 'users.read users.write' --ttl 1h`"
        )
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())

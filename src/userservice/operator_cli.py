"""`userservice users …`: the operator CLI, calling a running server through UserServiceClient.

Output is proto3 JSON, one object per line (streams too). The exit code follows the gRPC code
of a failed call as grpcurl's does: 64 + the code (NOT_FOUND → 69); 1 for a local failure (an
unreadable file), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import IO, Any

import grpc
from tqdm import tqdm

from user.v1 import user_pb2
from user.v1 import user_service_pb2 as pb
from userservice.client import UserServiceClient, UserServiceError
from userservice.user_files import (
    FORMATS,
    UserFileError,
    UserWriter,
    format_of,
    read_users,
    to_json,
)

ENV_PREFIX = "USERSERVICE_CLI_"
EXIT_LOCAL_FAILURE = 1
GRPC_EXIT_BASE = 64
_CONNECTION_FLAGS: dict[str, tuple[str, str]] = {
    # flag: (environment suffix, help)
    "address": ("ADDRESS", "server target: host:port, dns:///name:port (default localhost:50051)"),
    "token": ("TOKEN", "bearer token (mint one with `userservice token`)"),
    "token_file": (
        "TOKEN_FILE",
        "file holding the bearer token, re-read when it changes (e.g. a Kubernetes projected "
        "service-account token); instead of --token",
    ),
    "ca_file": ("CA_FILE", "CA bundle to verify the server (enables TLS)"),
    "cert_file": ("CERT_FILE", "client certificate for mTLS (PEM)"),
    "key_file": ("KEY_FILE", "client private key for mTLS (PEM)"),
    "timeout": ("TIMEOUT", "deadline of each unary call in seconds (default 10)"),
}


def add_users_command(commands: Any) -> None:
    """Register `users` and its subcommands on the top-level subparsers."""
    users = commands.add_parser("users", help="call a running server: create, get, list, …")
    for name, (suffix, help_text) in _CONNECTION_FLAGS.items():
        users.add_argument(
            "--" + name.replace("_", "-"), dest=name, help=f"{help_text} (env {ENV_PREFIX}{suffix})"
        )
    users.add_argument(
        "--tls",
        action="store_true",
        default=None,
        help=f"TLS with system roots (env {ENV_PREFIX}TLS)",
    )
    users.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    actions = users.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create", help="create a user (with only users.write: your own, for the token's subject)"
    )
    _user_fields(create, required=True)
    create.add_argument(
        "--request-id", default="", help="idempotency key (UUID); random if omitted"
    )
    actions.add_parser("get", help="get one user").add_argument("id")
    listing = actions.add_parser("list", help="list users, one JSON object per line")
    listing.add_argument("--filter", default="")
    listing.add_argument("--page-size", type=int, default=100)
    update = actions.add_parser("update", help="change the given fields of a user")
    update.add_argument("id")
    _user_fields(update, required=False)
    update.add_argument("--etag", default="", help="only if the user still has this etag")
    delete = actions.add_parser("delete", help="delete a user")
    delete.add_argument("id")
    delete.add_argument("--etag", default="", help="only if the user still has this etag")
    importing = actions.add_parser("import", help="create users from a CSV or JSONL file")
    importing.add_argument("file", help="path, or - for stdin (then give --format)")
    importing.add_argument("--format", choices=FORMATS)
    exporting = actions.add_parser("export", help="write users to a CSV or JSONL file")
    exporting.add_argument("file", help="path, or - for stdout (then give --format)")
    exporting.add_argument("--format", choices=FORMATS)
    exporting.add_argument("--filter", default="")
    watch = actions.add_parser("watch", help="print change events as they happen")
    watch.add_argument("--after-sequence", type=int, default=None)
    purge = actions.add_parser(
        "purge",
        help="delete every user matching a filter (users.admin), printing the operation's "
        "progress until it ends",
    )
    purge.add_argument("--filter", required=True, help="which users (ListUsers' filter syntax)")
    purge.add_argument(
        "--detach", action="store_true", help="print the started operation and return at once"
    )
    purge.add_argument(
        "--wait-seconds", type=float, default=None, help="give up waiting after this long"
    )
    operation = actions.add_parser(
        "operation", help="print a long-running operation's state; --cancel asks it to stop"
    )
    operation.add_argument("name", help="operations/<id>, as purge printed it")
    operation.add_argument("--cancel", action="store_true")


def _user_fields(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--email", required=required)
    parser.add_argument("--display-name", required=required)
    parser.add_argument(
        "--role", choices=[role.name for role in user_pb2.UserRole.DESCRIPTOR.values if role.number]
    )
    parser.add_argument(
        "--subject",
        help='identity-provider subject the user belongs to (users.admin; "" clears it)',
    )


def _option(arguments: argparse.Namespace, name: str, default: str = "") -> str:
    value = getattr(arguments, name, None)
    if value is None:
        value = os.environ.get(ENV_PREFIX + _CONNECTION_FLAGS[name][0], default)
    return str(value)


class _UsageError(Exception):
    """The command line (or its environment) is inconsistent: exit 2."""


def _token_options(arguments: argparse.Namespace) -> tuple[str, str]:
    """Return (token, token file): flags win over the environment, one of the two at most."""
    given = (arguments.token or "", arguments.token_file or "")
    if not any(given):
        given = (
            os.environ.get(ENV_PREFIX + "TOKEN", ""),
            os.environ.get(ENV_PREFIX + "TOKEN_FILE", ""),
        )
    if all(given):
        raise _UsageError("give --token or --token-file, not both")
    return given


def _client(arguments: argparse.Namespace) -> UserServiceClient:
    tls = arguments.tls or os.environ.get(ENV_PREFIX + "TLS", "").lower() in {"1", "true", "yes"}
    token, token_file = _token_options(arguments)
    return UserServiceClient(
        _option(arguments, "address", "localhost:50051"),
        token=token,
        token_file=token_file or None,
        tls=tls,
        root_certificates=_option(arguments, "ca_file") or None,
        client_certificate=_option(arguments, "cert_file") or None,
        client_key=_option(arguments, "key_file") or None,
        timeout=float(_option(arguments, "timeout", "10")),
    )


def _progress(arguments: argparse.Namespace, total: int | None, unit: str) -> tqdm[Any]:
    """Return a progress bar on stderr, disabled unless stderr is a terminal."""
    enabled = not arguments.no_progress and sys.stderr.isatty()
    return tqdm(total=total, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def _open(path: str, mode: str, stdio: IO[str]) -> Iterator[IO[str]]:
    if path == "-":
        yield stdio
        return
    with open(path, mode, newline="", encoding="utf-8") as stream:
        yield stream


def _print(message: object) -> None:
    print(to_json(message), flush=True)


async def _run(arguments: argparse.Namespace) -> int:
    action = arguments.action
    async with _client(arguments) as client:
        if action == "create":
            role = user_pb2.UserRole.Value(arguments.role) if arguments.role else 0
            _print(
                await client.create_user(
                    arguments.email,
                    arguments.display_name,
                    role,  # type: ignore[arg-type]
                    request_id=arguments.request_id,
                    subject=arguments.subject or "",
                )
            )
        elif action == "get":
            _print(await client.get_user(arguments.id))
        elif action == "list":
            async for user in client.iter_users(
                filter=arguments.filter, page_size=arguments.page_size
            ):
                _print(user)
        elif action == "update":
            changes = {
                "email": arguments.email,
                "display_name": arguments.display_name,
                "role": user_pb2.UserRole.Value(arguments.role) if arguments.role else None,
                "subject": arguments.subject,
            }
            given = {field: value for field, value in changes.items() if value is not None}
            if not given:
                print(
                    "userservice users update: give at least one field to change", file=sys.stderr
                )
                return 2
            user = user_pb2.User(id=arguments.id, etag=arguments.etag, **given)
            _print(await client.update_user(user, sorted(given)))
        elif action == "delete":
            await client.delete_user(arguments.id, etag=arguments.etag)
        elif action == "import":
            return await _import(client, arguments)
        elif action == "export":
            await _export(client, arguments)
        elif action == "watch":
            async for event in client.watch_users(after_sequence=arguments.after_sequence):
                _print(event)
        elif action == "purge":
            return await _purge(client, arguments)
        elif action == "operation":
            handle = await client.purge_operation(arguments.name)
            if arguments.cancel:
                await handle.cancel()
                await handle.refresh()
            _print(handle.operation)
    return 0


async def _purge(client: UserServiceClient, arguments: argparse.Namespace) -> int:
    """Start a purge and print the operation each time its progress moves, then its end."""
    operation = await client.purge_users(arguments.filter)
    _print(operation.operation)
    if arguments.detach:
        return 0
    printed = [operation.metadata.purged_count]
    with _progress(arguments, None, "user") as bar:

        def progressed(metadata: pb.PurgeUsersMetadata) -> None:
            bar.total = metadata.matched_count or None
            bar.update(metadata.purged_count - bar.n)
            if metadata.purged_count != printed[-1]:
                printed.append(metadata.purged_count)
                _print(operation.operation)

        try:
            await operation.wait(arguments.wait_seconds, on_progress=progressed)
        except TimeoutError as error:
            print(f"userservice users purge: {error}", file=sys.stderr)
            return GRPC_EXIT_BASE + grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        except UserServiceError as error:
            # The operation ended with an error (CANCELLED after a cancel): it is the output.
            _print(operation.operation)
            print(f"userservice users purge: {error}", file=sys.stderr)
            return GRPC_EXIT_BASE + error.code.value[0]
    _print(operation.operation)
    return 0


async def _import(client: UserServiceClient, arguments: argparse.Namespace) -> int:
    file_format = format_of(arguments.file, arguments.format)
    with _open(arguments.file, "r", sys.stdin) as stream, _progress(arguments, None, "user") as bar:

        async def users() -> AsyncIterator[user_pb2.User]:
            for user in read_users(stream, file_format):
                bar.update()
                yield user

        result = await client.import_users(users())
    _print(result)
    if result.rejections:
        return GRPC_EXIT_BASE + result.rejections[0].status.code
    return 0


async def _export(client: UserServiceClient, arguments: argparse.Namespace) -> None:
    file_format = format_of(arguments.file, arguments.format)
    total = (await client.list_users(page_size=1, filter=arguments.filter)).total_size
    with (
        _open(arguments.file, "w", sys.stdout) as stream,
        _progress(arguments, total, "user") as bar,
    ):
        writer = UserWriter(stream, file_format)
        async for user in client.stream_users(filter=arguments.filter):
            writer.write(user)
            bar.update()


def run_users(arguments: argparse.Namespace) -> int:
    """Run a `users` subcommand; return the exit code (64 + the gRPC code on failure)."""
    try:
        return asyncio.run(_run(arguments))
    except UserServiceError as error:
        print(f"userservice users {arguments.action}: {error}", file=sys.stderr)
        for violation in error.violations:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return GRPC_EXIT_BASE + error.code.value[0]
    except (UserFileError, OSError) as error:
        print(f"userservice users {arguments.action}: {error}", file=sys.stderr)
        return EXIT_LOCAL_FAILURE
    except _UsageError as error:
        print(f"userservice users {arguments.action}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return GRPC_EXIT_BASE + 1

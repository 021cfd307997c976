"""Users in files: CSV and JSON Lines (proto3 JSON, one User per line) for import and export."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from typing import IO

from google.protobuf import json_format

from user.v1 import user_pb2

FORMATS = ("csv", "jsonl")
CSV_COLUMNS = (
    "id",
    "email",
    "display_name",
    "role",
    "create_time",
    "update_time",
    "etag",
    "subject",
)
# What a create accepts; the other columns are written by export and ignored by import.
IMPORTED_COLUMNS = ("email", "display_name", "role", "subject")


# A spreadsheet reads a cell starting with one of these as a formula (OWASP, CSV injection):
# export neutralises such a cell with a leading quote, which spreadsheets show as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CELL_ESCAPE = "'"


def neutralise_cell(value: str) -> str:
    """Return a CSV cell a spreadsheet shows as text: a formula start gets a leading quote.

    A value that already starts with the quote gets one more, so restore_cell() can tell the
    two apart and every value comes back exactly.
    """
    if value.startswith((*FORMULA_STARTS, CELL_ESCAPE)):
        return CELL_ESCAPE + value
    return value


def restore_cell(cell: str) -> str:
    """Undo neutralise_cell(): drop the quote it put before a formula start or a quote.

    A quote before anything else was not put there by an export, so it stays.
    """
    if cell.startswith(CELL_ESCAPE) and cell[1:].startswith((*FORMULA_STARTS, CELL_ESCAPE)):
        return cell[1:]
    return cell


class UserFileError(ValueError):
    """A line of an import file cannot be read as a User."""


def format_of(path: str, explicit: str | None) -> str:
    """Return the file format: the explicit one, else from the extension."""
    if explicit:
        return explicit
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix in FORMATS:
        return suffix
    if suffix == "json" or suffix == "ndjson":
        return "jsonl"
    raise UserFileError(f"cannot tell the format of {path!r}: pass --format csv or jsonl")


def to_json(message: object) -> str:
    """Return a message as one line of proto3 JSON."""
    return json_format.MessageToJson(message, indent=None)  # type: ignore[arg-type]


def read_users(stream: IO[str], file_format: str) -> Iterator[user_pb2.User]:
    """Yield the Users of a CSV (with a header row) or JSON Lines file, to create."""
    if file_format == "csv":
        reader = csv.DictReader(stream)
        missing = {"email", "display_name"} - set(reader.fieldnames or ())
        if missing:
            raise UserFileError(f"CSV header lacks {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            role = restore_cell(row.get("role") or "").strip() or "USER_ROLE_UNSPECIFIED"
            try:
                role_value = user_pb2.UserRole.Value(role)
            except ValueError:
                raise UserFileError(f"line {line}: unknown role {role!r}") from None
            yield user_pb2.User(
                email=restore_cell(row["email"] or ""),
                display_name=restore_cell(row["display_name"] or ""),
                role=role_value,
                subject=restore_cell(row.get("subject") or ""),
            )
        return
    for line, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        user = user_pb2.User()
        try:
            json_format.Parse(text, user)
        except json_format.ParseError as error:
            raise UserFileError(f"line {line}: {error}") from None
        yield user_pb2.User(
            email=user.email, display_name=user.display_name, role=user.role, subject=user.subject
        )


class UserWriter:
    """Write Users as CSV (header first) or JSON Lines."""

    def __init__(self, stream: IO[str], file_format: str) -> None:
        """Start the file (the CSV header)."""
        self._stream = stream
        self._csv: csv.DictWriter[str] | None = None
        if file_format == "csv":
            self._csv = csv.DictWriter(stream, fieldnames=CSV_COLUMNS)
            self._csv.writeheader()

    def write(self, user: user_pb2.User) -> None:
        """Write one user."""
        if self._csv is None:
            self._stream.write(to_json(user) + "\n")
            return
        as_json = json.loads(json_format.MessageToJson(user, preserving_proto_field_name=True))
        self._csv.writerow(
            {column: neutralise_cell(str(as_json.get(column, ""))) for column in CSV_COLUMNS}
        )

    def write_all(self, users: Iterable[user_pb2.User]) -> None:
        """Write every user."""
        for user in users:
            self.write(user)

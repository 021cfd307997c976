"""The ListUsers/StreamUsers filter language (an AIP-160 subset), parsed into a UserFilter."""

from __future__ import annotations

import re
from dataclasses import replace

from userservice.domain.errors import InvalidArgumentError
from userservice.domain.model import Role, UserFilter

MAX_FILTER_LENGTH = 1024
_TOKEN_RE = re.compile(
    r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<op>!=|=|:)|(?P<word>[A-Za-z0-9_.@+-]+))'
)
_ROLE_PREFIX = "USER_ROLE_"


def _invalid(description: str) -> InvalidArgumentError:
    return InvalidArgumentError.single("filter", description)


def _tokens(text: str) -> list[tuple[str, str]]:
    position, found = 0, []
    while position < len(text):
        if text[position:].isspace():
            break
        match = _TOKEN_RE.match(text, position)
        if match is None:
            raise _invalid(f"unexpected character at offset {position}")
        kind = match.lastgroup or ""
        value = match.group(kind)
        if kind == "string":
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        found.append((kind, value))
        position = match.end()
    return found


def _role(value: str) -> Role:
    name = value.upper().removeprefix(_ROLE_PREFIX)
    try:
        return Role[name]
    except KeyError:
        raise _invalid(f"unknown role {value!r}") from None


def parse_filter(text: str) -> UserFilter:
    """Parse 'field op value' terms joined by AND; raise InvalidArgumentError on bad syntax."""
    if len(text) > MAX_FILTER_LENGTH:
        raise _invalid(f"must be at most {MAX_FILTER_LENGTH} characters")
    tokens = _tokens(text)
    result = UserFilter()
    index = 0
    while index < len(tokens):
        if index > 0:
            if tokens[index] != ("word", "AND"):
                raise _invalid("terms must be joined by AND")
            index += 1
        term = tokens[index : index + 3]
        if len(term) != 3 or term[0][0] != "word" or term[1][0] != "op" or term[2][0] == "op":
            raise _invalid("expected a term like: field = value")
        (_, field), (_, op), (_, value) = term
        result = _apply(result, field, op, value)
        index += 3
    return result


def _apply(current: UserFilter, field: str, op: str, value: str) -> UserFilter:
    if field == "role" and op == "=":
        return replace(current, role=_role(value))
    if field == "role" and op == "!=":
        return replace(current, role_not=_role(value))
    if field == "email" and op == "=":
        return replace(current, email_equals=value.lower())
    if field == "email" and op == ":":
        return replace(current, email_contains=value.lower())
    if field == "display_name" and op == ":":
        return replace(current, display_name_contains=value.lower())
    raise _invalid(f"unsupported term '{field} {op}': use role =|!=, email =|:, display_name :")


def _quoted(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def format_filter(user_filter: UserFilter) -> str:
    """Return the filter as canonical filter text: one term per set field, in a fixed order.

    parse_filter(format_filter(f)) == f for every parsed filter whose text fits
    MAX_FILTER_LENGTH: values are quoted and escaped, roles spelled USER_ROLE_<NAME>.
    """
    terms = []
    if user_filter.role is not None:
        terms.append(f"role = {_ROLE_PREFIX}{user_filter.role.name}")
    if user_filter.role_not is not None:
        terms.append(f"role != {_ROLE_PREFIX}{user_filter.role_not.name}")
    for field, op, value in (
        ("email", "=", user_filter.email_equals),
        ("email", ":", user_filter.email_contains),
        ("display_name", ":", user_filter.display_name_contains),
    ):
        if value is not None:
            terms.append(f"{field} {op} {_quoted(value)}")
    return " AND ".join(terms)


def canonical_filter(user_filter: UserFilter) -> str:
    """Return a stable text form of a parsed filter, to bind page tokens to it."""
    return repr(user_filter)

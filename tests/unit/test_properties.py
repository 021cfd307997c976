"""Properties of the pure domain parts, over generated input (hypothesis) rather than examples.

Derandomized (the same examples every run, no example database written), so a failure in CI
is a failure on every machine.
"""

from __future__ import annotations

import base64
import unicodedata
from collections.abc import Callable
from typing import TypeVar

import email_validator
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from userservice.domain.errors import (
    MAX_REPORTED_VIOLATIONS,
    FieldViolation,
    InvalidArgumentError,
    Reason,
)
from userservice.domain.filtering import (
    MAX_FILTER_LENGTH,
    canonical_filter,
    format_filter,
    parse_filter,
)
from userservice.domain.model import Role, UserFilter
from userservice.domain.pagination import PagePosition, PageTokenCodec
from userservice.domain.updates import MUTABLE_FIELDS
from userservice.domain.updates import changes_from_mask as _changes_from_mask
from userservice.domain.validation import (
    MAX_DISPLAY_NAME_LENGTH,
    MAX_EMAIL_LENGTH,
    UserInput,
    check_display_name,
    check_email,
    plain_email,
)

T = TypeVar("T")
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)

# Text with the characters that matter here well represented: quotes, backslashes, operators,
# whitespace of every kind, controls, combining marks, other scripts, astral characters.
hostile_text = st.text(
    st.one_of(
        st.sampled_from(list('"\\ =!:@._+-\t\n\r\x00\x0b\u00a0\u2028\u200b\u202e\ufeff')),
        st.sampled_from(list("aZ09éßİ\u0131\ufb00\u0301語\u0430\u0440🙂")),
        st.characters(codec="utf-8"),
    ),
    max_size=60,
)
roles = st.sampled_from(list(Role))
field_values = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
filters = st.builds(
    UserFilter,
    role=st.none() | roles,
    role_not=st.none() | roles,
    email_equals=st.none() | field_values.map(str.lower),
    email_contains=st.none() | field_values.map(str.lower),
    display_name_contains=st.none() | field_values.map(str.lower),
)
terms = st.one_of(
    st.builds("role = {}".format, st.sampled_from(["ADMIN", "USER_ROLE_VIEWER", "editor", "X"])),
    st.builds("role != {}".format, st.sampled_from(["VIEWER", "USER_ROLE_ADMIN"])),
    st.builds('email = "{}"'.format, hostile_text),
    st.builds("email : {}".format, st.from_regex(r"[A-Za-z0-9_.@+-]{1,20}", fullmatch=True)),
    st.builds('display_name : "{}"'.format, hostile_text),
    hostile_text,
)
filter_texts = st.lists(terms, max_size=5).map(" AND ".join) | hostile_text


def _raised(call: Callable[[], T]) -> tuple[T | None, InvalidArgumentError | None]:
    """Return call()'s result, or the InvalidArgumentError it raised (anything else escapes)."""
    try:
        return call(), None
    except InvalidArgumentError as error:
        return None, error


def _parsed_or_invalid(text: str) -> UserFilter | None:
    parsed, error = _raised(lambda: parse_filter(text))
    if error is not None:
        assert error.reason is Reason.INVALID_FIELD
        assert {violation.field for violation in error.violations} == {"filter"}
    return parsed


@PROPERTY
@given(filter_texts)
def test_any_filter_text_parses_or_is_an_invalid_filter_error(text: str) -> None:
    _parsed_or_invalid(text)


@PROPERTY
@given(filter_texts)
def test_parse_format_parse_is_stable(text: str) -> None:
    parsed = _parsed_or_invalid(text)
    assume(parsed is not None)
    assert parsed is not None
    canonical = format_filter(parsed)
    assume(len(canonical) <= MAX_FILTER_LENGTH)
    assert parse_filter(canonical) == parsed
    assert format_filter(parse_filter(canonical)) == canonical


@PROPERTY
@given(filters)
def test_every_filter_has_a_text_form_that_parses_back_to_it(user_filter: UserFilter) -> None:
    text = format_filter(user_filter)
    assert parse_filter(text) == user_filter
    assert canonical_filter(parse_filter(text)) == canonical_filter(user_filter)


# -- page tokens ------------------------------------------------------------------------

CODEC = PageTokenCodec(b"k" * 32)
ids = st.uuids().map(str)
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _segments(token: str) -> tuple[bytes, bytes]:
    body, _, mac = token.partition(".")
    return (
        base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)),
        base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)),
    )


@st.composite
def mutated(draw: st.DrawFn, token: str) -> str:
    """Return token changed in one of the ways an attacker or a broken client would."""
    how = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "append", "swap"]))
    position = draw(st.integers(0, len(token) - 1))
    char = draw(st.sampled_from(list(B64_ALPHABET + ".=é\x00 ")))
    if how == "replace":
        return token[:position] + char + token[position + 1 :]
    if how == "insert":
        return token[:position] + char + token[position:]
    if how == "delete":
        return token[:position] + token[position + 1 :]
    if how == "truncate":
        return token[:position]
    if how == "append":
        return token + char
    body, _, mac = token.partition(".")
    return f"{mac}.{body}"


@PROPERTY
@given(ids, st.text(max_size=40), st.integers(0, 2**31 - 1), st.data())
def test_a_mutated_page_token_is_rejected_never_read_as_another_position(
    after_id: str, filter_text: str, total: int, data: st.DataObject
) -> None:
    token = CODEC.encode(after_id, filter_text, total)
    assert CODEC.decode(token, filter_text) == PagePosition(after_id, total)
    changed = data.draw(mutated(token))
    assume(changed != token)
    resumed, error = _raised(lambda: CODEC.decode(changed, filter_text))
    if error is not None:
        assert error.reason is Reason.INVALID_PAGE_TOKEN
        return
    # Accepted only as another spelling of the same bytes (base64's unused low bits):
    # the very same signed position, never a different one.
    assert resumed == PagePosition(after_id, total)
    assert _segments(changed) == _segments(token)


@PROPERTY
@given(ids, st.text(max_size=40), st.text(max_size=40))
def test_a_token_is_bound_to_its_filter(after_id: str, issued_for: str, used_with: str) -> None:
    assume(issued_for != used_with)
    token = CODEC.encode(after_id, issued_for, 1)
    with pytest.raises(InvalidArgumentError) as raised:
        CODEC.decode(token, used_with)
    assert raised.value.reason is Reason.INVALID_PAGE_TOKEN


# -- field masks ------------------------------------------------------------------------

paths = st.one_of(
    st.sampled_from([*MUTABLE_FIELDS, "*", "id", "etag", "create_time", "update_time", ""]),
    hostile_text,
)


@PROPERTY
@given(st.lists(paths, max_size=60), hostile_text, hostile_text, st.integers(-5, 10))
def test_a_mask_updates_only_the_fields_it_names_or_is_rejected_boundedly(
    mask: list[str], email: str, display_name: str, role: int
) -> None:
    user = UserInput(email=email, display_name=display_name, role=role)
    changes, error = _raised(lambda: _changes_from_mask(user, mask))
    if error is not None:
        assert error.violations
        assert len(error.reported) <= MAX_REPORTED_VIOLATIONS
        assert {v.field for v in error.violations} <= {
            "update_mask",
            *(f"user.{f}" for f in MUTABLE_FIELDS),
        }
        return
    assert changes is not None
    named = set(MUTABLE_FIELDS) if mask == ["*"] else set(mask)
    if not mask:
        named = {"email", "display_name", "role"}
    assert named <= set(MUTABLE_FIELDS)
    for name in MUTABLE_FIELDS:
        if name not in named:
            assert getattr(changes, name) is None


# -- e-mail and display name ------------------------------------------------------------

emails = st.one_of(
    st.emails(),
    st.builds("{}@{}".format, hostile_text, hostile_text),
    st.builds("{}@example.com".format, st.text(max_size=300)),
    hostile_text,
)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(char) in {"Cc", "Cf", "Cs"} for char in text)


@PROPERTY
@given(emails)
def test_an_email_is_normalised_once_or_rejected_with_a_reason(email: str) -> None:
    violations: list[FieldViolation] = []
    normalised = check_email(email, "user.email", violations)
    if violations:
        assert normalised == ""
        assert [v.field for v in violations] == ["user.email"]
        InvalidArgumentError(violations)  # a bounded error can always be built from them
        return
    assert 0 < len(normalised) <= MAX_EMAIL_LENGTH
    assert "@" in normalised
    assert not _has_control(normalised)
    again: list[FieldViolation] = []
    assert check_email(normalised, "user.email", again) == normalised
    assert again == []


# Addresses on and around the edges of the plain form: every character the dot-atom and the
# labels allow, and the words and lengths its exceptions are about.
_ATOM_CHARS = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_plain_words = st.sampled_from(
    ["info", "SALES", "Postmaster", "xn--", "xn--bcher-kva", "ab--c", "localhost", "local",
     "TEST", "invalid", "onion", "arpa", "example", "com", "c0m", "1", "-", ".", "..", "@", "é"]
)  # fmt: skip
_plain_parts = st.lists(
    st.one_of(st.text(_ATOM_CHARS, min_size=1, max_size=12), _plain_words), min_size=1, max_size=4
)
_labels = st.one_of(
    st.text("abzAZ09-", min_size=1, max_size=8),
    st.text("aZ9", min_size=60, max_size=66),
    _plain_words,
)
plain_shaped_emails = st.one_of(
    st.builds(
        "{}@{}".format,
        _plain_parts.map(".".join),
        st.lists(_labels, min_size=1, max_size=5).map(".".join),
    ),
    st.builds(
        "{}@{}.com".format,
        st.text(_ATOM_CHARS, min_size=150, max_size=200),
        st.text("ab", max_size=80),
    ),
    st.emails(),
    emails,
)


@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(plain_shaped_emails)
def test_the_plain_email_fast_path_agrees_with_email_validator(email: str) -> None:
    fast = plain_email(email)
    if fast is None:
        return
    try:
        expected = validate_email(email, check_deliverability=False).normalized
    except EmailNotValidError as error:
        pytest.fail(f"{email!r}: the fast path accepts what email-validator rejects: {error}")
    assert fast == expected


def test_the_plain_email_fast_path_takes_the_common_addresses() -> None:
    for email in ("ada@example.com", "Bench-7@Bench.Example", "o'neil+tag@mail.co.uk"):
        assert plain_email(email) == validate_email(email, check_deliverability=False).normalized
    for left_to_the_library in ("info@x.org", "a@xn--bcher-kva.de", "a@b.c1", "a@host.test"):
        assert plain_email(left_to_the_library) is None


def test_the_plain_email_fast_path_follows_changes_to_the_special_use_names() -> None:
    names = email_validator.SPECIAL_USE_DOMAIN_NAMES
    assert plain_email("a@corp.example.net") == "a@corp.example.net"
    names.append("example.net")
    try:
        assert plain_email("a@corp.example.net") is None
        assert plain_email("a@example.net") is None
        assert plain_email("a@myexample.net") == "a@myexample.net"
    finally:
        names.remove("example.net")
    assert plain_email("a@corp.example.net") == "a@corp.example.net"


@PROPERTY
@given(st.one_of(hostile_text, st.text(min_size=90, max_size=130)))
def test_a_display_name_is_trimmed_and_clean_or_rejected(name: str) -> None:
    violations: list[FieldViolation] = []
    trimmed = check_display_name(name, "user.display_name", violations)
    if violations:
        assert [v.field for v in violations] == ["user.display_name"]
        return
    assert trimmed == trimmed.strip()
    assert 0 < len(trimmed) <= MAX_DISPLAY_NAME_LENGTH
    assert not _has_control(trimmed)
    again: list[FieldViolation] = []
    assert check_display_name(trimmed, "user.display_name", again) == trimmed
    assert again == []

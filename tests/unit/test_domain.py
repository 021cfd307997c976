"""Pure domain rules: filter language, page tokens, validation and ids (no I/O involved)."""

from __future__ import annotations

import pytest

from userservice.domain.errors import InvalidArgumentError, Reason
from userservice.domain.filtering import canonical_filter, parse_filter
from userservice.domain.ids import is_valid_id, new_user_id
from userservice.domain.model import Role, User, UserChanges, UserFilter
from userservice.domain.pagination import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    PagePosition,
    PageTokenCodec,
    effective_page_size,
)
from userservice.domain.validation import UserInput, check_request_id, validate_new_user


def test_filter_terms_combine_with_and() -> None:
    parsed = parse_filter('role = USER_ROLE_ADMIN AND email : "Example.COM" AND display_name : ada')
    assert parsed == UserFilter(
        role=Role.ADMIN, email_contains="example.com", display_name_contains="ada"
    )
    assert parse_filter("  ") == UserFilter()
    assert parse_filter('email = "a\\"b@x.io"').email_equals == 'a"b@x.io'


@pytest.mark.parametrize(
    "text",
    [
        "role",
        "role = ",
        "role == ADMIN",
        "role = ADMIN OR role = VIEWER",
        "name = x",
        "role = GOD",
        "x" * 2000,
        "email = a b",
    ],
)
def test_filter_syntax_errors_name_the_filter_field(text: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_filter(text)
    assert [v.field for v in caught.value.violations] == ["filter"]


def test_page_tokens_round_trip_and_reject_tampering() -> None:
    codec = PageTokenCodec(b"k" * 32)
    key = canonical_filter(UserFilter(role=Role.ADMIN))
    token = codec.encode("some-id", key, 42)
    assert codec.decode(token, key) == PagePosition("some-id", 42)
    for bad in (token[:-2] + "AA", "x" + token, "garbage", token + ".x"):
        with pytest.raises(InvalidArgumentError) as caught:
            codec.decode(bad, key)
        assert caught.value.reason == Reason.INVALID_PAGE_TOKEN
    with pytest.raises(InvalidArgumentError):
        codec.decode(token, canonical_filter(UserFilter()))
    with pytest.raises(InvalidArgumentError):
        PageTokenCodec(b"other-key" * 4).decode(token, key)


def test_page_size_default_maximum_and_negative() -> None:
    assert effective_page_size(0) == DEFAULT_PAGE_SIZE
    assert effective_page_size(5) == 5
    assert effective_page_size(10**6) == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgumentError):
        effective_page_size(-1)


def test_validation_reports_every_bad_field_at_once() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        validate_new_user(UserInput(email="nope", display_name=" ", role=9))
    assert [v.field for v in caught.value.violations] == [
        "user.email",
        "user.display_name",
        "user.role",
    ]
    valid = validate_new_user(UserInput(email="Ada@Example.com", display_name=" Ada "))
    assert valid.display_name == "Ada"
    assert valid.role == Role.VIEWER
    assert valid.email.lower() == "ada@example.com"


def test_request_ids_are_uuids_in_canonical_form() -> None:
    assert check_request_id("") is None
    assert (
        check_request_id("6F9619FF-8B86-D011-B42D-00CF4FC964FF")
        == "6f9619ff-8b86-d011-b42d-00cf4fc964ff"
    )
    with pytest.raises(InvalidArgumentError):
        check_request_id("not-a-uuid")


def test_user_ids_are_time_ordered_uuid7() -> None:
    ids = [new_user_id() for _ in range(200)]
    assert all(is_valid_id(i) and i[14] == "7" for i in ids)
    assert len(set(ids)) == 200
    assert not is_valid_id("ABCDEF00-0000-7000-8000-000000000000")


def test_a_change_is_a_new_revision_whose_update_time_moves_forward() -> None:
    user = User("id", "a@x.io", "Ann", Role.VIEWER, 1_000, 5_000, 3)
    renamed = user.changed(UserChanges(display_name="Anna"), now_us=9_000)
    assert (renamed.display_name, renamed.email, renamed.role) == ("Anna", "a@x.io", Role.VIEWER)
    assert (renamed.revision, renamed.update_time_us, renamed.create_time_us) == (4, 9_000, 1_000)
    assert renamed.etag != user.etag
    # A clock that stepped back still yields a later update_time.
    assert user.changed(UserChanges(role=Role.ADMIN), now_us=10).update_time_us == 5_001


def test_ids_of_one_process_sort_in_creation_order_within_a_millisecond() -> None:
    import uuid

    ids = [new_user_id() for _ in range(20_000)]  # many share a millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
    stamps = [u.int >> 80 for u in parsed]
    assert len(set(stamps)) < len(stamps)  # the counter, not the clock, ordered them

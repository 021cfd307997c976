"""An update's field mask: which fields it names, and their new values validated."""

from __future__ import annotations

from collections.abc import Sequence

from userservice.domain.errors import FieldViolation, InvalidArgumentError
from userservice.domain.model import UserChanges
from userservice.domain.validation import (
    UserInput,
    check_display_name,
    check_email,
    check_role,
    check_subject,
)

MUTABLE_FIELDS = ("email", "display_name", "role", "subject")
IMMUTABLE_FIELDS = frozenset({"id", "create_time", "update_time", "etag"})


def changes_from_mask(user: UserInput, mask_paths: Sequence[str]) -> UserChanges:
    """Return the validated changes the mask names; INVALID_ARGUMENT if it names none or a bad one.

    "*" names every mutable field; an empty mask names the fields the request sets.
    """
    paths = list(mask_paths)
    if paths == ["*"]:
        paths = list(MUTABLE_FIELDS)
    elif not paths:
        paths = [
            name
            for name, is_set in (
                ("email", bool(user.email)),
                ("display_name", bool(user.display_name)),
                ("role", user.role != 0),
                ("subject", bool(user.subject)),
            )
            if is_set
        ]
        if not paths:
            raise InvalidArgumentError.single("update_mask", "names no field to update")
    violations: list[FieldViolation] = []
    for path in paths:
        if path in IMMUTABLE_FIELDS:
            violations.append(
                FieldViolation("update_mask", f"'{path}' is output only or immutable")
            )
        elif path not in MUTABLE_FIELDS:
            violations.append(FieldViolation("update_mask", f"unknown field path '{path}'"))
    if violations:
        raise InvalidArgumentError(violations)
    email = check_email(user.email, "user.email", violations) if "email" in paths else None
    display_name = (
        check_display_name(user.display_name, "user.display_name", violations)
        if "display_name" in paths
        else None
    )
    role = check_role(user.role, "user.role", violations, default=None) if "role" in paths else None
    subject = (
        check_subject(user.subject, "user.subject", violations) if "subject" in paths else None
    )
    if violations:
        raise InvalidArgumentError(violations)
    return UserChanges(email=email, display_name=display_name, role=role, subject=subject)

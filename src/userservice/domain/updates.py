"""An update's field mask: which fields it names, and their new values validated."""

from __future__ import annotations

from collections.abc import Sequence

from userservice.domain.errors import FieldViolation, InvalidArgumentError
from userservice.domain.model import UserChanges
from userservice.domain.validation import UPDATE_CHECKS, UserInput

MUTABLE_FIELDS = tuple(UPDATE_CHECKS)
IMMUTABLE_FIELDS = frozenset({"id", "create_time", "update_time", "etag"})


def changes_from_mask(user: UserInput, mask_paths: Sequence[str]) -> UserChanges:
    """Return the validated changes the mask names; INVALID_ARGUMENT if it names none or a bad one.

    "*" names every mutable field; an empty mask names the fields the request sets.
    """
    paths = list(mask_paths)
    if paths == ["*"]:
        paths = list(MUTABLE_FIELDS)
    elif not paths:
        # Set means not the proto3 default: "" for a string, 0 (UNSPECIFIED) for the role.
        paths = [name for name in MUTABLE_FIELDS if getattr(user, name)]
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
    changes = {
        name: check(getattr(user, name), f"user.{name}", violations)
        for name, check in UPDATE_CHECKS.items()
        if name in paths
    }
    if violations:
        raise InvalidArgumentError(violations)
    return UserChanges(**changes)

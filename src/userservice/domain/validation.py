"""Input validation: turns raw caller input into validated domain values or field violations."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import email_validator
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import ATEXT, CASE_INSENSITIVE_MAILBOX_NAMES

from userservice.domain.errors import FieldViolation, InvalidArgumentError
from userservice.domain.ids import is_valid_id
from userservice.domain.model import NewUser, Role

MAX_EMAIL_LENGTH = 254
MAX_DISPLAY_NAME_LENGTH = 100
MAX_SUBJECT_LENGTH = 255
ROLE_UNSPECIFIED = 0
NOT_A_USER_ID = "must be a user id (a lower-case UUID)"


# The plain form almost every address has: an ASCII dot-atom, one "@", then two or more
# RFC 1123 labels of at most 63 characters. For these email-validator's rules reduce to the
# checks in plain_email(), which give its verdict and normalisation without its
# per-character Unicode work; anything else is left to it.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_EMAIL = re.compile(
    rf"(?P<local>[{ATEXT}]+(?:\.[{ATEXT}]+)*)@(?P<domain>{_LABEL}(?:\.{_LABEL})+)", re.ASCII
)
_CASE_INSENSITIVE_MAILBOXES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


def plain_email(email: str) -> str | None:
    """Return email-validator's normalised form of a plain ASCII address, or None to ask it.

    None means only "not decided here": the address may still be valid. A string returned
    is exactly what ``validate_email(email, check_deliverability=False).normalized`` gives
    (tests/unit/test_properties.py checks the two agree).
    """
    if len(email) > MAX_EMAIL_LENGTH:
        return None
    match = _PLAIN_EMAIL.fullmatch(email)
    if match is None:
        return None
    local, domain = match["local"], match["domain"].lower()
    # Left to the library: mailbox names it lower-cases (RFC 2142), labels with "--" (its
    # Punycode and R-LDH rules), top-level domains not ending in a letter, special-use names.
    if (
        local.lower() in _CASE_INSENSITIVE_MAILBOXES
        or "--" in domain
        or not domain[-1].isalpha()
        or _special_use(domain)
    ):
        return None
    return f"{local}@{domain}"


# The library lets its users change its list of special-use names, so the list is read per
# call; the set and suffixes derived from it are rebuilt whenever it differs from the last.
_special: list[tuple[tuple[str, ...], frozenset[str], tuple[str, ...]]] = [((), frozenset(), ())]


def _special_use(domain: str) -> bool:
    """Tell whether domain is, or is under, one of email-validator's special-use names."""
    names = tuple(email_validator.SPECIAL_USE_DOMAIN_NAMES)
    seen, exact, suffixes = _special[0]
    if names != seen:
        exact, suffixes = frozenset(names), tuple("." + name for name in names)
        _special[0] = (names, exact, suffixes)
    return domain in exact or domain.endswith(suffixes)


@dataclass(frozen=True, slots=True)
class UserInput:
    """User fields as the caller sent them, before validation (role is the raw enum number)."""

    email: str = ""
    display_name: str = ""
    role: int = ROLE_UNSPECIFIED
    subject: str = ""


def check_email(email: str, field: str, violations: list[FieldViolation]) -> str:
    """Return the normalised email, or record why it is invalid."""
    if not email:
        violations.append(FieldViolation(field, "is required"))
        return ""
    if len(email) > MAX_EMAIL_LENGTH:
        violations.append(FieldViolation(field, f"must be at most {MAX_EMAIL_LENGTH} characters"))
        return ""
    plain = plain_email(email)
    if plain is not None:
        return plain
    try:
        return validate_email(email, check_deliverability=False).normalized
    except EmailNotValidError as error:
        violations.append(FieldViolation(field, f"is not a valid email address: {error}"))
        return ""


def check_display_name(name: str, field: str, violations: list[FieldViolation]) -> str:
    """Return the trimmed display name, or record why it is invalid."""
    trimmed = name.strip()
    if not trimmed:
        violations.append(FieldViolation(field, "is required"))
    elif len(trimmed) > MAX_DISPLAY_NAME_LENGTH:
        violations.append(
            FieldViolation(field, f"must be at most {MAX_DISPLAY_NAME_LENGTH} characters")
        )
    # Printable ASCII has no Cc or Cf character: only other text is looked at per character.
    elif not (trimmed.isascii() and trimmed.isprintable()) and any(
        unicodedata.category(char) in {"Cc", "Cf"} for char in trimmed
    ):
        violations.append(FieldViolation(field, "must not contain control characters"))
    return trimmed


def check_subject(subject: str, field: str, violations: list[FieldViolation]) -> str:
    """Return the subject as given ("" for none), or record why it is invalid.

    Not trimmed or folded: it must equal a token's sub exactly to match it.
    """
    if len(subject) > MAX_SUBJECT_LENGTH:
        violations.append(FieldViolation(field, f"must be at most {MAX_SUBJECT_LENGTH} characters"))
    elif not subject.isprintable():
        violations.append(FieldViolation(field, "must not contain control characters"))
    return subject


def check_role(
    raw: int, field: str, violations: list[FieldViolation], *, default: Role | None
) -> Role:
    """Return the role for a raw enum number (default for UNSPECIFIED), or record a violation."""
    if raw == ROLE_UNSPECIFIED and default is not None:
        return default
    try:
        return Role(raw)
    except ValueError:
        violations.append(
            FieldViolation(field, f"must be a known UserRole other than UNSPECIFIED, got {raw}")
        )
        return Role.VIEWER


def _changed_role(raw: int, field: str, violations: list[FieldViolation]) -> Role:
    """Return the role an update names: UNSPECIFIED has no default there, it is refused."""
    return check_role(raw, field, violations, default=None)


# The fields an update may change (what update_mask may name), each with the check of its new
# value, in the order their violations are listed; domain/updates.py applies it.
UPDATE_CHECKS: Final[Mapping[str, Callable[[Any, str, list[FieldViolation]], Any]]] = {
    "email": check_email,
    "display_name": check_display_name,
    "role": _changed_role,
    "subject": check_subject,
}


def validate_new_user(user: UserInput, prefix: str = "user") -> NewUser:
    """Validate a user to create; raise InvalidArgumentError listing every bad field."""
    violations: list[FieldViolation] = []
    email = check_email(user.email, f"{prefix}.email", violations)
    display_name = check_display_name(user.display_name, f"{prefix}.display_name", violations)
    role = check_role(user.role, f"{prefix}.role", violations, default=Role.VIEWER)
    subject = check_subject(user.subject, f"{prefix}.subject", violations)
    if violations:
        raise InvalidArgumentError(violations)
    return NewUser(email=email, display_name=display_name, role=role, subject=subject)


def check_user_id(user_id: str, field: str) -> str:
    """Return the id if it has the UUID form, else raise InvalidArgumentError."""
    if not user_id:
        raise InvalidArgumentError.single(field, "is required")
    if not is_valid_id(user_id):
        raise InvalidArgumentError.single(field, NOT_A_USER_ID)
    return user_id


_REQUEST_ID_RE = re.compile(r"[0-9a-fA-F-]{32,36}")


def check_request_id(request_id: str) -> str | None:
    """Return the canonical request id (a UUID, AIP-155), None when unset, or raise."""
    if not request_id:
        return None
    try:
        if not _REQUEST_ID_RE.fullmatch(request_id):
            raise ValueError(request_id)
        return str(uuid.UUID(request_id))
    except ValueError:
        raise InvalidArgumentError.single("request_id", "must be a UUID") from None


def fingerprint(user: NewUser) -> str:
    """Return a digest of what a create asked for, to tell a retry from a reuse of its key."""
    material = f"{user.email.lower()}\x00{user.display_name}\x00{int(user.role)}"
    if user.subject:
        # Only when set, so keys recorded before subjects existed still match their retries.
        material += f"\x00{user.subject}"
    return hashlib.sha256(material.encode()).hexdigest()

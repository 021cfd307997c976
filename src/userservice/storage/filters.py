"""ListUsers filters compiled to SQL once for both stores; a Dialect supplies the spelling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from userservice.domain.model import UserFilter, email_key, search_key


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one database spells a bound parameter and an exact substring test."""

    placeholder: Callable[[int], str]
    """The text of the n-th (1-based) bound parameter."""
    contains: Callable[[str, str], str]
    """The condition "column contains parameter", exactly as Python's `in` (no folding)."""
    role_type: str = ""
    """A cast appended to role parameters ("" when the driver infers it)."""


@dataclass(frozen=True, slots=True)
class CompiledFilter:
    """WHERE conditions (joined with AND) and the values they bind, in order."""

    conditions: list[str]
    params: list[object]

    def where(self, *extra: str) -> str:
        """Return ' WHERE ...' for these conditions plus extra ones, or '' for none."""
        conditions = [*self.conditions, *extra]
        return f" WHERE {' AND '.join(conditions)}" if conditions else ""


def compile_filter(user_filter: UserFilter, dialect: Dialect) -> CompiledFilter:
    """Translate a parsed filter into conditions on the users table; values stay parameters."""
    compiled = CompiledFilter([], [])

    def param(value: object) -> str:
        compiled.params.append(value)
        return dialect.placeholder(len(compiled.params))

    if user_filter.role is not None:
        compiled.conditions.append(f"role = {param(int(user_filter.role))}{dialect.role_type}")
    if user_filter.role_not is not None:
        compiled.conditions.append(f"role <> {param(int(user_filter.role_not))}{dialect.role_type}")
    if user_filter.email_equals is not None:
        compiled.conditions.append(
            f"email_normalized = {param(email_key(user_filter.email_equals))}"
        )
    # Substrings are matched on keys the domain computed when the row was written, with a
    # plain substring test: no LIKE (whose case rules differ by database) and no collation
    # decides, so both stores give the rows UserFilter.matches keeps.
    if user_filter.email_contains is not None:
        fragment = param(email_key(user_filter.email_contains))
        compiled.conditions.append(dialect.contains("email_normalized", fragment))
    if user_filter.display_name_contains is not None:
        fragment = param(search_key(user_filter.display_name_contains))
        compiled.conditions.append(dialect.contains("display_name_key", fragment))
    return compiled

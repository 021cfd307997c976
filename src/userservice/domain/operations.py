"""Long-running operations (AIP-151): the stored record, its rules and the store's protocol.

An operation is a row the store keeps (both stores, migration 0005), so any replica answers
for it and it outlives the process that started it. The replica running one holds a lease
on it and renews it between batches; a replica that finds a lease expired (its runner died)
takes the operation over and resumes it. What an operation does is its kind's business
(userservice.domain.purge); this module knows only the record and who may see it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Protocol

from userservice.domain.errors import (
    DomainError,
    InvalidArgumentError,
    OperationCancelledError,
    OperationFailedError,
    OperationNotFoundError,
    Reason,
)
from userservice.domain.ids import new_user_id
from userservice.domain.model import Caller

OPERATIONS_COLLECTION: Final = "operations"
NAME_PREFIX: Final = f"{OPERATIONS_COLLECTION}/"
_NAME_RE: Final = re.compile(
    r"operations/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)


@dataclass(frozen=True, slots=True)
class Operation:
    """One stored operation; request, metadata and result are its kind's JSON documents."""

    name: str
    kind: str
    owner: str
    request: str
    metadata: str
    done: bool
    result: str | None
    error: str | None
    cancel_requested: bool
    lease_owner: str
    lease_expiry_us: int
    create_time_us: int
    update_time_us: int

    def visible_to(self, caller: Caller) -> bool:
        """Tell whether caller may see (cancel, delete) this operation: its creator or an admin."""
        return caller.admin or (bool(caller.subject) and caller.subject == self.owner)

    def failure(self) -> DomainError | None:
        """Return the error a finished operation ended with, None if it succeeded or runs."""
        if self.error is None:
            return None
        stored = json.loads(self.error)
        if stored.get("reason") == Reason.OPERATION_CANCELLED:
            return OperationCancelledError(str(stored.get("message", "")))
        return OperationFailedError(str(stored.get("message", "")))


def new_operation_name() -> str:
    """Return a fresh operation name; names sort in creation order like user ids."""
    return NAME_PREFIX + new_user_id()


def check_operation_name(name: str) -> str:
    """Return name if it is an operation's name, else raise OperationNotFoundError.

    NOT_FOUND rather than INVALID_ARGUMENT: a name this service never issues names no
    operation, and the answer must not differ from that of someone else's operation.
    """
    if _NAME_RE.fullmatch(name) is None:
        raise OperationNotFoundError(name)
    return name


def error_document(error: DomainError) -> str:
    """Return the stored form of the error an operation ends with."""
    return dump({"reason": str(error.reason), "message": error.message})


def dump(document: dict[str, Any]) -> str:
    """Return a document's stored JSON text."""
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


def parse_done_filter(text: str) -> bool | None:
    """Parse ListOperations' filter: empty, ``done = true`` or ``done = false``."""
    words = text.replace("=", " = ").split()
    if not words:
        return None
    if len(words) == 3 and words[:2] == ["done", "="] and words[2] in ("true", "false"):
        return words[2] == "true"
    raise InvalidArgumentError.single("filter", 'must be empty, "done = true" or "done = false"')


class OperationRepository(Protocol):
    """Durable operations, keyed by name; every write is one statement or one transaction.

    A runner's writes (renew, finish) name the lease owner and change nothing once another
    replica holds the lease, so two replicas never both finish one operation.
    """

    async def create_operation(self, operation: Operation) -> None:
        """Insert a new operation."""
        ...

    async def get_operation(self, name: str) -> Operation | None:
        """Return the operation with this name, or None."""
        ...

    async def list_operations(
        self, owner: str | None, done: bool | None, after_name: str | None, limit: int
    ) -> list[Operation]:
        """Return up to limit operations with name > after_name in name order.

        Only owner's when owner is not None; only those whose done equals done when it
        is not None.
        """
        ...

    async def renew_operation(
        self, name: str, lease_owner: str, metadata: str, lease_expiry_us: int, now_us: int
    ) -> Operation | None:
        """Store progress and extend the lease; None (nothing written) if not lease_owner's.

        The operation returned carries cancel_requested as another replica may have set it.
        """
        ...

    async def finish_operation(
        self,
        name: str,
        lease_owner: str,
        metadata: str,
        result: str | None,
        error: str | None,
        now_us: int,
    ) -> bool:
        """Mark the operation done with its result or error; False if not lease_owner's."""
        ...

    async def cancel_operation(self, name: str, now_us: int) -> None:
        """Set cancel_requested on the operation if it is not done."""
        ...

    async def delete_operation(self, name: str) -> bool:
        """Delete the operation if it is done; False if it was not (or does not exist)."""
        ...

    async def claim_operations(
        self, lease_owner: str, now_us: int, lease_expiry_us: int, limit: int
    ) -> list[Operation]:
        """Take over up to limit unfinished operations whose lease expired before now_us.

        Atomic per operation: two replicas claiming at once never both get one.
        """
        ...

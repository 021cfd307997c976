"""Conversions between user.v1 protobuf messages and domain values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import google.longrunning.operations_proto_pb2 as operations_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.timestamp_pb2 import Timestamp

from user.v1 import user_pb2, user_service_pb2
from userservice.domain.longrunning import PURGE_USERS, PurgeProgress, purged_count
from userservice.domain.model import Role, User, UserEvent, WatchProgress
from userservice.domain.operations import Operation
from userservice.domain.validation import UserInput
from userservice.transport.errors import status_proto


def timestamp(micros: int) -> Timestamp:
    """Return the protobuf Timestamp for integer microseconds since the epoch."""
    seconds, remainder = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=remainder * 1_000)


# Resolved once: converting the enum per user costs more than the lookup.
_WIRE_ROLES: Final = {role: user_pb2.UserRole.ValueType(role) for role in Role}


def fill_user(target: user_pb2.User, user: User) -> None:
    """Write the wire form of a stored user into target (a field of the response, in place).

    Half the cost of building a User and passing it to the response's constructor, which
    copies it (and each Timestamp into it) once more, on every read.
    """
    target.id = user.id
    target.email = user.email
    target.display_name = user.display_name
    target.role = _WIRE_ROLES[user.role]
    seconds, micros = divmod(user.create_time_us, 1_000_000)
    created = target.create_time
    created.seconds = seconds
    created.nanos = micros * 1_000
    seconds, micros = divmod(user.update_time_us, 1_000_000)
    updated = target.update_time
    updated.seconds = seconds
    updated.nanos = micros * 1_000
    target.etag = user.etag
    if user.subject:  # a new message's field is already empty
        target.subject = user.subject


def fill_users(
    target: RepeatedCompositeFieldContainer[user_pb2.User], users: Iterable[User]
) -> None:
    """Append the wire form of each user to target (a repeated field of the response)."""
    add = target.add
    for user in users:
        fill_user(add(), user)


def user_input(message: user_pb2.User) -> UserInput:
    """Return the caller-supplied fields of a User message, unvalidated."""
    return UserInput(
        email=message.email,
        display_name=message.display_name,
        role=message.role,
        subject=message.subject,
    )


def event_to_proto(event: UserEvent | WatchProgress) -> user_service_pb2.WatchUsersResponse:
    """Return the wire form of a change event or a progress marker."""
    if isinstance(event, WatchProgress):
        return user_service_pb2.WatchUsersResponse(
            progress=user_service_pb2.WatchProgress(latest_sequence=event.latest_sequence)
        )
    response = user_service_pb2.WatchUsersResponse(
        sequence=event.sequence,
        type=user_pb2.UserEventType.ValueType(event.type),
        event_time=timestamp(event.event_time_us),
    )
    fill_user(response.user, event.user)
    return response


def operation_proto(operation: Operation) -> operations_pb2.Operation:
    """Return the google.longrunning.Operation for a stored operation."""
    message = operations_pb2.Operation(name=operation.name, done=operation.done)
    if operation.kind == PURGE_USERS:
        progress = PurgeProgress.parse(operation.metadata)
        message.metadata.Pack(
            user_service_pb2.PurgeUsersMetadata(
                matched_count=progress.matched_count,
                purged_count=progress.purged_count,
                start_time=timestamp(progress.start_time_us),
                update_time=timestamp(progress.update_time_us),
            )
        )
    if operation.done:
        failure = operation.failure()
        if failure is not None:
            message.error.CopyFrom(status_proto(failure))
        elif operation.kind == PURGE_USERS:
            message.response.Pack(
                user_service_pb2.PurgeUsersResponse(purged_count=purged_count(operation) or 0)
            )
    return message

"""Conversions between user.v1 protobuf messages and domain values."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from user.v1 import user_pb2, user_service_pb2
from userservice.domain.model import User, UserEvent, WatchProgress
from userservice.domain.validation import UserInput


def timestamp(micros: int) -> Timestamp:
    """Return the protobuf Timestamp for integer microseconds since the epoch."""
    seconds, remainder = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=remainder * 1_000)


def user_to_proto(user: User) -> user_pb2.User:
    """Return the wire form of a stored user."""
    return user_pb2.User(
        id=user.id,
        email=user.email,
        display_name=user.display_name,
        role=user_pb2.UserRole.ValueType(user.role),
        create_time=timestamp(user.create_time_us),
        update_time=timestamp(user.update_time_us),
        etag=user.etag,
    )


def user_input(message: user_pb2.User) -> UserInput:
    """Return the caller-supplied fields of a User message, unvalidated."""
    return UserInput(email=message.email, display_name=message.display_name, role=message.role)


def event_to_proto(event: UserEvent | WatchProgress) -> user_service_pb2.WatchUsersResponse:
    """Return the wire form of a change event or a progress marker."""
    if isinstance(event, WatchProgress):
        return user_service_pb2.WatchUsersResponse(
            progress=user_service_pb2.WatchProgress(latest_sequence=event.latest_sequence)
        )
    return user_service_pb2.WatchUsersResponse(
        sequence=event.sequence,
        type=user_pb2.UserEventType.ValueType(event.type),
        user=user_to_proto(event.user),
        event_time=timestamp(event.event_time_us),
    )

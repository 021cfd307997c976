"""Rich error statuses (google.rpc.Status with ErrorInfo): built for aborts, read back for logs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple, NoReturn, TypeAlias

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import Counter

from userservice.domain.errors import ERROR_DOMAIN
from userservice.interceptors.handlers import Context
from userservice.metrics import REFUSALS
from userservice.rpc_context import with_request_id

DETAILS_KEY: Final = "grpc-status-details-bin"

Metadata: TypeAlias = tuple[tuple[str, str | bytes], ...]


class Rejection(NamedTuple):
    """A complete error status, built once and sent with abort(), which counts it as a refusal."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: Metadata
    refusals: Counter

    async def abort(self, context: Context) -> NoReturn:
        """Count the refusal, then end the call with this status (raises, as context.abort does)."""
        self.refusals.inc()
        await context.abort(self.code, self.message, with_request_id(self.trailing_metadata))
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def rejection(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *,
    info: Mapping[str, str] | None = None,
    details: Sequence[Message] = (),
    headers: Sequence[tuple[str, str]] = (),
) -> Rejection:
    """Build a refusal carrying ErrorInfo(reason), further details and plain trailing headers.

    Its abort() counts ``userservice_refusals_total{reason}``: auth, admission and the rate
    limit build theirs here, so every refusal of theirs is counted by its reason.
    """
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=info or {})
    )
    for detail in details:
        status.details.add().Pack(detail)
    converted = rpc_status.to_status(status)
    return Rejection(
        code, message, (*headers, *converted.trailing_metadata), REFUSALS.labels(reason)
    )


def error_reason(trailing_metadata: Iterable[Any] | None) -> str | None:
    """Return the ErrorInfo reason in a call's status details, if it carries one."""
    for key, value in trailing_metadata or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return str(info.reason)
    return None

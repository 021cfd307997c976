"""Long-running operations on the client: a handle to poll, wait for and cancel one."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import google.longrunning.operations_proto_pb2 as operations_pb2
import grpc
from google.protobuf import empty_pb2

from user.v1 import user_service_pb2 as pb
from userservice.client.errors import from_status
from userservice.policy import OPERATIONS_SERVICE_NAME

UnaryRunner = Callable[[Callable[..., Awaitable[Any]], object, float | None], Awaitable[Any]]
"""Runs one unary call as the client does (token, deadline, RetryInfo); see UserServiceClient."""

FIRST_WAIT_SECONDS = 0.5
"""The first WaitOperation asks the server to hold on this long; each next one twice as long."""
MAX_WAIT_SECONDS = 10.0
"""What one WaitOperation waits at most: progress is reported between them."""


class OperationsStub:
    """The google.longrunning.Operations calls over a channel, typed (the wheel's stub is not)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        """Bind the five methods to channel."""

        def unary(method: str, request: Any, response: Any) -> Any:
            return channel.unary_unary(
                f"/{OPERATIONS_SERVICE_NAME}/{method}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )

        self.GetOperation = unary(
            "GetOperation", operations_pb2.GetOperationRequest, operations_pb2.Operation
        )
        self.ListOperations = unary(
            "ListOperations",
            operations_pb2.ListOperationsRequest,
            operations_pb2.ListOperationsResponse,
        )
        self.WaitOperation = unary(
            "WaitOperation", operations_pb2.WaitOperationRequest, operations_pb2.Operation
        )
        self.CancelOperation = unary(
            "CancelOperation", operations_pb2.CancelOperationRequest, empty_pb2.Empty
        )
        self.DeleteOperation = unary(
            "DeleteOperation", operations_pb2.DeleteOperationRequest, empty_pb2.Empty
        )


class PurgeOperation:
    """A PurgeUsers operation: its latest state, and wait(), refresh(), cancel(), delete()."""

    def __init__(
        self, stub: OperationsStub, run: UnaryRunner, operation: operations_pb2.Operation
    ) -> None:
        """Track operation, calling through run (the client's unary path)."""
        self._stub = stub
        self._run = run
        self.operation = operation

    @property
    def name(self) -> str:
        """The operation's name, ``operations/<id>``."""
        return self.operation.name

    @property
    def done(self) -> bool:
        """Whether the operation has finished (successfully, with an error or cancelled)."""
        return self.operation.done

    @property
    def metadata(self) -> pb.PurgeUsersMetadata:
        """The progress as of the latest state fetched."""
        metadata = pb.PurgeUsersMetadata()
        self.operation.metadata.Unpack(metadata)
        return metadata

    def result(self) -> pb.PurgeUsersResponse:
        """Return a finished purge's result, or raise its error (OperationCancelledError)."""
        if not self.operation.done:
            raise ValueError(f"operation {self.name} has not finished")
        if self.operation.HasField("error"):
            raise from_status(self.operation.error)
        response = pb.PurgeUsersResponse()
        self.operation.response.Unpack(response)
        return response

    async def refresh(self) -> operations_pb2.Operation:
        """Fetch the latest state (GetOperation)."""
        request = operations_pb2.GetOperationRequest(name=self.name)
        self.operation = await self._run(self._stub.GetOperation, request, None)
        return self.operation

    async def wait(
        self,
        timeout: float | None = None,
        *,
        on_progress: Callable[[pb.PurgeUsersMetadata], None] | None = None,
    ) -> pb.PurgeUsersResponse:
        """Wait until the purge ends and return its result, or raise its error.

        Each WaitOperation asks the server to hold on a little longer than the last one
        (FIRST_WAIT_SECONDS doubling to MAX_WAIT_SECONDS), so a long purge costs few calls
        and on_progress still hears of it between them. Raises TimeoutError when timeout
        seconds pass first (the operation keeps running; cancel() stops it).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = FIRST_WAIT_SECONDS
        while not self.operation.done:
            if on_progress is not None:
                on_progress(self.metadata)
            hold = interval
            if deadline is not None:
                hold = min(hold, deadline - time.monotonic())
                if hold <= 0:
                    raise TimeoutError(f"operation {self.name} did not finish within {timeout} s")
            request = operations_pb2.WaitOperationRequest(name=self.name)
            request.timeout.FromNanoseconds(int(hold * 1e9))
            # The call's own deadline leaves the server room to answer after holding on.
            self.operation = await self._run(self._stub.WaitOperation, request, hold + 5.0)
            interval = min(interval * 2, MAX_WAIT_SECONDS)
        if on_progress is not None:
            on_progress(self.metadata)
        return self.result()

    async def cancel(self) -> None:
        """Ask the purge to stop after its current batch; it then ends CANCELLED."""
        request = operations_pb2.CancelOperationRequest(name=self.name)
        await self._run(self._stub.CancelOperation, request, None)

    async def delete(self) -> None:
        """Forget the finished operation (FailedPreconditionError while it runs)."""
        request = operations_pb2.DeleteOperationRequest(name=self.name)
        await self._run(self._stub.DeleteOperation, request, None)

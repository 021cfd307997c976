"""user.v1.UserService over grpc.aio: each method maps protobuf to domain and delegates."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

import google.longrunning.operations_proto_pb2 as operations_pb2
import grpc

from user.v1 import user_service_pb2 as pb
from user.v1 import user_service_pb2_grpc as pb_grpc
from userservice.domain.deadlines import bind_time_remaining, unbind_time_remaining
from userservice.domain.errors import DomainError, ShuttingDownError, StorageUnavailableError
from userservice.domain.longrunning import OperationService
from userservice.domain.model import Caller
from userservice.domain.service import UserService
from userservice.domain.validation import UserInput
from userservice.interceptors.auth import ADMIN
from userservice.rpc_context import PRINCIPAL, SCOPES
from userservice.transport.errors import abort_with_domain_error, status_proto
from userservice.transport.mapping import (
    event_to_proto,
    fill_user,
    fill_users,
    operation_proto,
    user_input,
)

Context = grpc.aio.ServicerContext[Any, Any]
_Method = TypeVar("_Method", bound=Callable[..., Any])


def maps_domain_errors(method: _Method) -> _Method:
    """End a unary call with the mapped status when the domain raises (streams: DomainErrors)."""

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Context) -> Any:
        # The store bounds its waits (a pool connection) by what is left of the deadline,
        # so an overloaded call still ends with the status that says why.
        bound = bind_time_remaining(context.time_remaining)
        try:
            return await method(self, request, context)
        except DomainError as error:
            await abort_with_domain_error(context, error)
        finally:
            unbind_time_remaining(bound)

    return cast(_Method, unary_wrapper)


class DomainErrors:
    """What maps_domain_errors does, as a block inside a streaming method's generator.

    A decorator around an async generator has to be a generator too, re-yielding every
    message: one resumption more per message of a 100k-user export. The block costs once
    per call.
    """

    __slots__ = ("_bound", "_context")

    def __init__(self, context: Context) -> None:
        """Map the domain errors raised inside the block to the call's status."""
        self._context = context

    async def __aenter__(self) -> None:
        """Bind the call's remaining time for the store."""
        self._bound = bind_time_remaining(self._context.time_remaining)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: Any
    ) -> None:
        """End the call with the mapped status if the block raised a DomainError."""
        try:
            if isinstance(error, DomainError):
                await abort_with_domain_error(self._context, error)
        finally:
            unbind_time_remaining(self._bound)


def current_caller() -> Caller:
    """Return the Caller the auth interceptor established for this call (no one if none ran)."""
    return Caller(PRINCIPAL.get() or "", admin=ADMIN in SCOPES.get())


class UserServiceServicer(pb_grpc.UserServiceServicer):
    """The transport for UserService; business rules live in the domain service."""

    def __init__(self, service: UserService, operations: OperationService) -> None:
        self._service = service
        self._operations = operations

    @maps_domain_errors
    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Context
    ) -> pb.CreateUserResponse:
        """Create a user."""
        user = await self._service.create_user(
            current_caller(), user_input(request.user), request.request_id
        )
        response = pb.CreateUserResponse()
        fill_user(response.user, user)
        return response

    @maps_domain_errors
    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.GetUserResponse:
        """Return one user."""
        response = pb.GetUserResponse()
        fill_user(response.user, await self._service.get_user(request.id))
        return response

    @maps_domain_errors
    async def BatchGetUsers(
        self, request: pb.BatchGetUsersRequest, context: Context
    ) -> pb.BatchGetUsersResponse:
        """Return the users found and the ids not found."""
        users, missing = await self._service.batch_get_users(list(request.ids))
        response = pb.BatchGetUsersResponse(not_found_ids=missing)
        fill_users(response.users, users)
        return response

    @maps_domain_errors
    async def ListUsers(
        self, request: pb.ListUsersRequest, context: Context
    ) -> pb.ListUsersResponse:
        """Return one page of users."""
        page = await self._service.list_users(
            request.page_size, request.page_token, request.filter, principal=PRINCIPAL.get()
        )
        response = pb.ListUsersResponse(
            next_page_token=page.next_page_token, total_size=page.total_size
        )
        fill_users(response.users, page.users)
        return response

    @maps_domain_errors
    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: Context
    ) -> pb.UpdateUserResponse:
        """Apply a masked update."""
        user = await self._service.update_user(
            current_caller(),
            request.user.id,
            user_input(request.user),
            list(request.update_mask.paths),
            request.user.etag,
        )
        response = pb.UpdateUserResponse()
        fill_user(response.user, user)
        return response

    @maps_domain_errors
    async def DeleteUser(
        self, request: pb.DeleteUserRequest, context: Context
    ) -> pb.DeleteUserResponse:
        """Delete a user."""
        await self._service.delete_user(current_caller(), request.id, request.etag)
        return pb.DeleteUserResponse()

    async def StreamUsers(
        self, request: pb.StreamUsersRequest, context: Context
    ) -> AsyncIterator[pb.StreamUsersResponse]:
        """Export every matching user."""
        batches = self._service.stream_user_batches(request.filter, principal=PRINCIPAL.get())
        # Closed at once however the call ends, so its scan stops counting then.
        async with DomainErrors(context), contextlib.aclosing(batches):
            async for batch in batches:
                for user in batch:
                    response = pb.StreamUsersResponse()
                    fill_user(response.user, user)
                    yield response

    @maps_domain_errors
    async def ImportUsers(
        self, request_iterator: AsyncIterator[pb.ImportUsersRequest], context: Context
    ) -> pb.ImportUsersResponse:
        """Bulk-create users from the client stream."""
        result = await self._service.import_users(_user_inputs(request_iterator))
        return pb.ImportUsersResponse(
            created_count=result.created_count,
            rejected_count=result.rejected_count,
            rejections=[
                pb.ImportUsersRejection(index=index, status=status_proto(error))
                for index, error in result.rejections
            ],
        )

    async def WatchUsers(
        self, request: pb.WatchUsersRequest, context: Context
    ) -> AsyncIterator[pb.WatchUsersResponse]:
        """Replay events after a sequence, then follow live ones, with progress when idle."""
        after = request.after_sequence if request.HasField("after_sequence") else None
        # No event may come for a long time: the client still sees the watch
        # established at once because the request-id layer sends every stream's initial
        # metadata (x-request-id) when it starts; unary calls get it in the trailers only.
        async with DomainErrors(context):
            async for event in self._service.watch_users(after):
                yield event_to_proto(event)

    async def SyncUsers(
        self, request_iterator: AsyncIterator[pb.SyncUsersRequest], context: Context
    ) -> AsyncIterator[pb.SyncUsersResponse]:
        """Upsert each message as it arrives and answer it in order.

        The next request is read only after the previous answer was handed to
        gRPC, so a client that stops reading stops the server reading too:
        HTTP/2 flow control bounds what either side buffers.
        """
        async with DomainErrors(context):
            index = 0
            async for request in request_iterator:
                yield await self._sync_one(index, request)
                index += 1

    @maps_domain_errors
    async def PurgeUsers(
        self, request: pb.PurgeUsersRequest, context: Context
    ) -> operations_pb2.Operation:
        """Start deleting the matching users; answer with the operation at once."""
        operation = await self._operations.purge_users(current_caller(), request.filter)
        return operation_proto(operation)

    async def _sync_one(self, index: int, request: pb.SyncUsersRequest) -> pb.SyncUsersResponse:
        try:
            outcome, user = await self._service.sync_user(user_input(request.user))
        except DomainError as error:
            if isinstance(error, _STREAM_ENDING_ERRORS):
                raise
            return pb.SyncUsersResponse(
                index=index, outcome=pb.SYNC_OUTCOME_FAILED, status=status_proto(error)
            )
        response = pb.SyncUsersResponse(index=index, outcome=pb.SyncOutcome.ValueType(outcome))
        fill_user(response.user, user)
        return response


# Failures of the service itself rather than of one item end the whole stream.
_STREAM_ENDING_ERRORS = (StorageUnavailableError, ShuttingDownError)


async def _user_inputs(requests: AsyncIterator[pb.ImportUsersRequest]) -> AsyncIterator[UserInput]:
    async for request in requests:
        yield user_input(request.user)
    # grpc.aio ends the request stream the same way for a half-close and for a client's
    # cancel; the cancel itself reaches this task one event-loop turn later. Yielding
    # once lets it land here, as CancelledError, before the final batch is committed.
    await asyncio.sleep(0)


def register(server: grpc.aio.Server, service: UserService, operations: OperationService) -> None:
    """Add the UserService servicer to a server."""
    pb_grpc.add_UserServiceServicer_to_server(UserServiceServicer(service, operations), server)

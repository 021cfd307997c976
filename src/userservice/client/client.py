"""UserServiceClient: a typed async client over the generated stub, on one reused channel."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import google.longrunning.operations_proto_pb2 as operations_pb2
import grpc
from google.protobuf import field_mask_pb2

from user.v1 import user_pb2, user_service_pb2_grpc
from user.v1 import user_service_pb2 as pb
from userservice.client.errors import from_rpc_error
from userservice.client.operations import OperationsStub, PurgeOperation
from userservice.client.propagation import propagation_interceptors
from userservice.client.retries import (
    WATCH_RESUME_ATTEMPTS,
    retry_delay,
    watch_resume_delay,
    watch_resume_point,
)
from userservice.client.service_config import MAX_ATTEMPTS, channel_options
from userservice.client.tokens import TOKEN_ENDED_REASONS, TokenFile, TokenSource
from userservice.rpc_context import INCOMING_CALL

T = TypeVar("T")
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_STREAM_TIMEOUT_SECONDS = 300.0
Metadata: TypeAlias = tuple[tuple[str, str], ...]


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class UserServiceClient:
    """Call user.v1.UserService; every failure raises a UserServiceError subclass.

    The channel is created on first use, inside the running event loop, and reused by every
    call until close(). `target` takes any gRPC name: `host:port`, `dns:///svc:50051`
    (every address, balanced round_robin), `ipv4:10.0.0.1:50051,10.0.0.2:50051`.

    `token` is a fixed bearer token, or a token source: a callable (plain or async)
    returning the current token, asked before every call and every resumed stream.
    `token_file` names a file holding the token, re-read when it changes (`TokenFile`).

    `propagate` (for a client used inside a service's handlers) installs the propagation
    interceptors (``userservice.client.propagation``): each call gets what is left of the
    incoming call's deadline, its x-request-id and trace context, and ends with it.
    `interceptors` are more grpc.aio client interceptors, after those.

    `channels` > 1 opens a pool of that many channels, each on its own connection (a local
    subchannel pool: grpc otherwise shares one connection per address among the channels of
    a process), and spreads calls over them round robin. One HTTP/2 connection carries at
    most the server's MAX_CONCURRENT_STREAMS calls at once (commonly 100 to 256; more wait
    for a free stream, queued in the client), and its calls share one TCP flow window and
    one I/O thread's work: a pool is for a client keeping more than that many streams open
    (watchers, imports) or pushing enough throughput to saturate one connection.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | TokenSource = "",
        token_file: str | Path | None = None,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        client_certificate: str | Path | None = None,
        client_key: str | Path | None = None,
        server_name_override: str = "",
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT_SECONDS,
        health_check: bool = True,
        extra_options: Sequence[tuple[str, Any]] = (),
        propagate: bool = False,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        channels: int = 1,
    ) -> None:
        """Configure the client; nothing connects until the first call."""
        self.target = target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        if token_file is not None:
            if token:
                raise ValueError("give token or token_file, not both")
            token = TokenFile(token_file)
        self._token = token if isinstance(token, str) else ""
        self._token_source = None if isinstance(token, str) else token
        self._tls = tls or bool(root_certificates or client_certificate)
        # A fixed token is a call credential on TLS; plaintext channels cannot carry those,
        # so there it rides as metadata.
        self._fixed_metadata: Metadata = (
            (("authorization", f"Bearer {self._token}"),) if self._token and not self._tls else ()
        )
        self._root_certificates = _read(root_certificates)
        self._client_certificate = _read(client_certificate)
        self._client_key = _read(client_key)
        options = channel_options(health_check=health_check)
        if server_name_override:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        if channels < 1:
            raise ValueError("channels must be at least 1")
        if channels > 1:
            options.append(("grpc.use_local_subchannel_pool", 1))
        self._options = [*options, *extra_options]
        self._propagate = propagate
        self._interceptors = [
            *(propagation_interceptors() if propagate else ()),
            *interceptors,
        ]
        self.channel_count = channels
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: Iterator[user_service_pb2_grpc.UserServiceAsyncStub] | None = None
        self._operations: OperationsStub | None = None

    async def __aenter__(self) -> UserServiceClient:
        """Return self; the channel closes on exit."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the channel."""
        await self.close()

    async def close(self) -> None:
        """Close the channels (in-flight calls are cancelled)."""
        channels, self._channels, self._stubs = self._channels, [], None
        self._operations = None
        for channel in channels:
            await channel.close()

    @property
    def stub(self) -> user_service_pb2_grpc.UserServiceAsyncStub:
        """Return a generated stub: the next channel's of the pool, opening them on first use."""
        if self._stubs is None:
            self._channels = [self._open_channel() for _ in range(self.channel_count)]
            self._stubs = itertools.cycle(
                [user_service_pb2_grpc.UserServiceStub(channel) for channel in self._channels]
            )
        return next(self._stubs)

    @property
    def operations(self) -> OperationsStub:
        """Return the google.longrunning.Operations stub over the shared channel."""
        if self._operations is None:
            self.stub  # noqa: B018 (opens the channels once)
            self._operations = OperationsStub(self._channels[0])
        return self._operations

    def _open_channel(self) -> grpc.aio.Channel:
        interceptors = self._interceptors or None
        if not self._tls:
            return grpc.aio.insecure_channel(
                self.target, options=self._options, interceptors=interceptors
            )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._root_certificates,
            private_key=self._client_key,
            certificate_chain=self._client_certificate,
        )
        if self._token:
            # Call credentials: grpc attaches the token to every call, TLS-only by design.
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self._token)
            )
        return grpc.aio.secure_channel(
            self.target, credentials, options=self._options, interceptors=interceptors
        )

    async def _authorization(self) -> tuple[str, Metadata]:
        """Return the token for the next call and the metadata that carries it."""
        source = self._token_source
        if source is None:
            return self._token, self._fixed_metadata
        token = source()
        if inspect.isawaitable(token):
            token = await token
        # A source's token always rides as per-call metadata: call credentials are fixed.
        return token, ((("authorization", f"Bearer {token}"),) if token else ())

    async def _metadata(self) -> Metadata:
        return (await self._authorization())[1]

    async def _unary(
        self,
        call: Callable[..., Awaitable[T]],
        request: object,
        *,
        retry_unavailable: bool = False,
        timeout: float | None = None,
    ) -> T:
        """Run one unary call under one deadline, waiting out RetryInfo on RESOURCE_EXHAUSTED.

        UNAVAILABLE is retried here only when retry_unavailable (a write carrying an etag);
        for the other methods grpc core already retried it per the service config.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        incoming = INCOMING_CALL.get() if self._propagate else None
        if incoming is not None:
            # No retry is worth waiting for past the deadline of the call this one serves.
            deadline = min(deadline, incoming.deadline or deadline)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            remaining = deadline - time.monotonic()
            try:
                metadata = await self._metadata()
                return await call(request, timeout=remaining, metadata=metadata)
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            delay = retry_delay(error, attempt, retry_unavailable)
            if delay is None or attempt == MAX_ATTEMPTS or time.monotonic() + delay >= deadline:
                raise error
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def create_user(
        self,
        email: str,
        display_name: str,
        role: user_pb2.UserRole.ValueType = user_pb2.USER_ROLE_UNSPECIFIED,
        *,
        request_id: str = "",
        subject: str = "",
    ) -> user_pb2.User:
        """Create a user; a request_id is always sent, so the call is safe to retry.

        With only users.write this creates the caller's own user (leave role and subject
        unset: the subject becomes the token's sub); users.admin may name any subject.
        """
        request = pb.CreateUserRequest(
            user=user_pb2.User(email=email, display_name=display_name, role=role, subject=subject),
            request_id=request_id or str(uuid.uuid4()),
        )
        response = await self._unary(self.stub.CreateUser, request)
        return response.user

    async def get_user(self, user_id: str) -> user_pb2.User:
        """Return one user."""
        response = await self._unary(self.stub.GetUser, pb.GetUserRequest(id=user_id))
        return response.user

    async def batch_get_users(self, ids: Sequence[str]) -> pb.BatchGetUsersResponse:
        """Return the users found (request order) and the ids not found."""
        return await self._unary(self.stub.BatchGetUsers, pb.BatchGetUsersRequest(ids=ids))

    async def list_users(
        self, *, page_size: int = 0, page_token: str = "", filter: str = ""
    ) -> pb.ListUsersResponse:
        """Return one page of users."""
        request = pb.ListUsersRequest(page_size=page_size, page_token=page_token, filter=filter)
        return await self._unary(self.stub.ListUsers, request)

    async def iter_users(
        self, *, filter: str = "", page_size: int = 100
    ) -> AsyncIterator[user_pb2.User]:
        """Yield every user matching filter, page after page."""
        token = ""
        while True:
            page = await self.list_users(page_size=page_size, page_token=token, filter=filter)
            for user in page.users:
                yield user
            token = page.next_page_token
            if not token:
                return

    async def update_user(
        self, user: user_pb2.User, update_mask: Sequence[str] = ()
    ) -> user_pb2.User:
        """Update the fields in update_mask (all when empty); retried only with user.etag."""
        request = pb.UpdateUserRequest(
            user=user, update_mask=field_mask_pb2.FieldMask(paths=list(update_mask))
        )
        if not update_mask:
            request.ClearField("update_mask")
        response = await self._unary(
            self.stub.UpdateUser, request, retry_unavailable=bool(user.etag)
        )
        return response.user

    async def delete_user(self, user_id: str, *, etag: str = "") -> None:
        """Delete a user; retried on UNAVAILABLE only with an etag."""
        request = pb.DeleteUserRequest(id=user_id, etag=etag)
        await self._unary(self.stub.DeleteUser, request, retry_unavailable=bool(etag))

    async def purge_users(self, filter: str) -> PurgeOperation:
        """Start deleting the users matching filter; return a handle to wait() on or cancel()."""
        operation = await self._unary(self.stub.PurgeUsers, pb.PurgeUsersRequest(filter=filter))
        return PurgeOperation(self.operations, self._run_unary, operation)

    async def purge_operation(self, name: str) -> PurgeOperation:
        """Return a handle to an existing PurgeUsers operation, with its latest state."""
        handle = PurgeOperation(
            self.operations, self._run_unary, operations_pb2.Operation(name=name)
        )
        await handle.refresh()
        return handle

    async def _run_unary(
        self, call: Callable[..., Awaitable[Any]], request: object, timeout: float | None
    ) -> Any:
        return await self._unary(call, request, timeout=timeout)

    async def stream_users(self, *, filter: str = "") -> AsyncIterator[user_pb2.User]:
        """Yield every user matching filter from one server stream."""
        call = self.stub.StreamUsers(
            pb.StreamUsersRequest(filter=filter),
            timeout=self.stream_timeout,
            metadata=await self._metadata(),
        )
        try:
            async for response in call:
                yield response.user
        except grpc.aio.AioRpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None

    async def import_users(
        self, users: Iterable[user_pb2.User] | AsyncIterable[user_pb2.User]
    ) -> pb.ImportUsersResponse:
        """Stream users to ImportUsers; returns the counts and per-item rejections."""

        async def requests() -> AsyncIterator[pb.ImportUsersRequest]:
            if isinstance(users, AsyncIterable):
                async for user in users:
                    yield pb.ImportUsersRequest(user=user)
            else:
                for user in users:
                    yield pb.ImportUsersRequest(user=user)

        metadata = await self._metadata()
        try:
            return await self.stub.ImportUsers(
                requests(), timeout=self.stream_timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as rpc_error:
            raise from_rpc_error(rpc_error) from None

    async def watch_users(
        self, *, after_sequence: int | None = None, resume: bool = True
    ) -> AsyncIterator[pb.WatchUsersResponse]:
        """Yield change events; when the stream ends with a resume point, resume from it.

        The stream has no deadline (keepalive finds dead connections). With resume, an end
        that leaves a resume point reconnects after the last sequence sent, so no event is
        missed or repeated: any UNAVAILABLE (a replica shutting down or gone, the store
        unreachable) and any other end whose ErrorInfo names `last_sequence` (as a server
        names it on every end of a watch it can be resumed from), except the codes no retry
        can fix (OUT_OF_RANGE: history gone, INVALID_ARGUMENT, PERMISSION_DENIED, ...). So does
        the end of the stream's token (the server ends a stream when its token expires or its
        signing key is withdrawn) once the token source has a different token; with the same
        token again (a fixed token, or a source not yet refreshed) that UNAUTHENTICATED is
        raised. Resumes back off; WATCH_RESUME_ATTEMPTS in a row that deliver nothing raise
        the last error.
        """
        last = after_sequence
        token, metadata = await self._authorization()
        failures = 0
        while True:
            request = (
                pb.WatchUsersRequest()
                if last is None
                else pb.WatchUsersRequest(after_sequence=last)
            )
            call = self.stub.WatchUsers(request, metadata=metadata)
            try:
                async for event in call:
                    # A progress marker has sequence 0: its latest_sequence is the position.
                    last = (
                        event.progress.latest_sequence
                        if event.HasField("progress")
                        else event.sequence
                    )
                    failures = 0
                    yield event
                return
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                if not resume:
                    raise error from None
                failures += 1
                if failures > WATCH_RESUME_ATTEMPTS:
                    raise error from None
                if error.code == grpc.StatusCode.UNAUTHENTICATED:
                    if error.reason not in TOKEN_ENDED_REASONS:
                        raise error from None
                    used, (token, metadata) = token, await self._authorization()
                    if token == used:
                        raise error from None
                    # The token was good when this stream opened: a fresh one resumes it.
                    continue
                point = watch_resume_point(error)
                if point is None:
                    raise error from None
                if point.last_sequence is not None:
                    last = point.last_sequence
            finally:
                call.cancel()
            await asyncio.sleep(watch_resume_delay(failures))
            token, metadata = await self._authorization()

"""google.longrunning.Operations over grpc.aio, and the wire form of a stored operation.

The service's proto is googleapis' (the pinned googleapis-common-protos wheel); its handlers
are registered here the way generated code registers ours, with the wheel's typed messages.
"""

from __future__ import annotations

from typing import Any

import google.longrunning.operations_proto_pb2 as operations_pb2
import grpc
from google.protobuf import empty_pb2

from userservice.domain.longrunning import OperationService
from userservice.policy import OPERATIONS_SERVICE_NAME
from userservice.transport.mapping import operation_proto
from userservice.transport.servicer import Context, current_caller, maps_domain_errors

# What WaitOperation leaves of the call's deadline for its answer (and a busy event loop): a fifth
# of it, 0.2 s to 1 s.
_DEADLINE_MARGIN_SHARE = 0.2
_MIN_MARGIN_SECONDS = 0.2


class OperationsServicer:
    """The transport for google.longrunning.Operations; the rules are OperationService's."""

    def __init__(self, operations: OperationService) -> None:
        self._operations = operations

    @maps_domain_errors
    async def GetOperation(
        self, request: operations_pb2.GetOperationRequest, context: Context
    ) -> operations_pb2.Operation:
        """Return an operation's latest state."""
        return operation_proto(await self._operations.get(current_caller(), request.name))

    @maps_domain_errors
    async def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: Context
    ) -> operations_pb2.ListOperationsResponse:
        """Return one page of the caller's operations (every operation for an admin)."""
        page = await self._operations.list(
            current_caller(), request.name, request.filter, request.page_size, request.page_token
        )
        return operations_pb2.ListOperationsResponse(
            operations=[operation_proto(operation) for operation in page.operations],
            next_page_token=page.next_page_token,
        )

    @maps_domain_errors
    async def DeleteOperation(
        self, request: operations_pb2.DeleteOperationRequest, context: Context
    ) -> empty_pb2.Empty:
        """Forget a finished operation."""
        await self._operations.delete(current_caller(), request.name)
        return empty_pb2.Empty()

    @maps_domain_errors
    async def CancelOperation(
        self, request: operations_pb2.CancelOperationRequest, context: Context
    ) -> empty_pb2.Empty:
        """Ask an operation to stop; it ends with code CANCELLED."""
        await self._operations.cancel(current_caller(), request.name)
        return empty_pb2.Empty()

    @maps_domain_errors
    async def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: Context
    ) -> operations_pb2.Operation:
        """Return the operation once done, or as it is when the timeout or deadline comes."""
        # Seconds and nanos as they are: ToTimedelta() overflows on a Duration out of range.
        timeout = (
            request.timeout.seconds + request.timeout.nanos / 1e9
            if request.HasField("timeout")
            else None
        )
        remaining = context.time_remaining()
        if remaining is not None and (timeout is None or timeout >= 0):
            # Answer just before the deadline: the caller then gets the operation, not
            # DEADLINE_EXCEEDED. (A negative timeout is the domain's INVALID_ARGUMENT.)
            margin = min(max(remaining * _DEADLINE_MARGIN_SHARE, _MIN_MARGIN_SECONDS), 1.0)
            bound = max(remaining - margin, 0.0)
            timeout = bound if timeout is None else min(timeout, bound)
        operation = await self._operations.wait(current_caller(), request.name, timeout)
        return operation_proto(operation)


def register_operations(server: Any, operations: OperationService) -> None:
    """Add the google.longrunning.Operations service to a server (or the chain's registrar)."""
    servicer = OperationsServicer(operations)

    def unary(method: Any, request: Any, response: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )

    handlers = {
        "GetOperation": unary(
            servicer.GetOperation, operations_pb2.GetOperationRequest, operations_pb2.Operation
        ),
        "ListOperations": unary(
            servicer.ListOperations,
            operations_pb2.ListOperationsRequest,
            operations_pb2.ListOperationsResponse,
        ),
        "DeleteOperation": unary(
            servicer.DeleteOperation, operations_pb2.DeleteOperationRequest, empty_pb2.Empty
        ),
        "CancelOperation": unary(
            servicer.CancelOperation, operations_pb2.CancelOperationRequest, empty_pb2.Empty
        ),
        "WaitOperation": unary(
            servicer.WaitOperation, operations_pb2.WaitOperationRequest, operations_pb2.Operation
        ),
    }
    generic = grpc.method_handlers_generic_handler(OPERATIONS_SERVICE_NAME, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(OPERATIONS_SERVICE_NAME, handlers)

"""Per-method policy, declared once in the proto and read here from the generated descriptors.

Every UserService method carries a ``(user.v1.method_policy)`` option
(proto/user/v1/options.proto): the scope its token needs, whether it is public, what it
costs against the rate limit, and the request field that makes a replay safe. Auth, the
rate limiter, the client's retry policy and the tests all read ``METHODS``; none keeps a
table of its own, so adding an rpc edits only the proto. A method without the option is
absent from ``METHODS``, and the auth interceptor refuses it (fail closed). A policy that
contradicts itself stops the import, and with it the server's start. The one service whose
proto is not ours, google.longrunning.Operations, gets its policies from a table here
(OPERATIONS_SCOPES): the same MethodPolicy, enforced the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import google.longrunning.operations_proto_pb2 as operations_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions

from user.v1 import options_pb2, user_service_pb2

# The replays grpc core may send on its own: the call changes nothing, or the same change again.
_SAFE_LEVELS: Final = frozenset({MethodOptions.NO_SIDE_EFFECTS, MethodOptions.IDEMPOTENT})


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    """What the server enforces for one method, as its proto option declares it."""

    name: str
    path: str
    scope: str
    public: bool
    cost: float
    scan_cost: float
    message_cost: float
    idempotent: bool
    idempotency_key: str
    client_streaming: bool
    server_streaming: bool

    @property
    def retryable(self) -> bool:
        """Tell whether a client (one that always fills idempotency_key) may replay the call."""
        return self.idempotent or bool(self.idempotency_key)


def method_path(method: MethodDescriptor) -> str:
    """Return the method's gRPC path, ``/package.Service/Method``."""
    return f"/{method.containing_service.full_name}/{method.name}"


def policy_of(method: MethodDescriptor) -> MethodPolicy | None:
    """Return the method's declared policy, or None when it has no method_policy option.

    Raises ValueError when the option contradicts itself or the method.
    """
    options = method.GetOptions()
    if not options.HasExtension(options_pb2.method_policy):
        return None
    declared = options.Extensions[options_pb2.method_policy]
    path = method_path(method)
    if declared.public == bool(declared.scope):
        raise ValueError(f"{path}: method_policy needs exactly one of scope and public")
    if min(declared.cost, declared.scan_cost, declared.message_cost) < 0:
        raise ValueError(f"{path}: method_policy costs cannot be negative")
    if declared.message_cost and not method.client_streaming:
        raise ValueError(f"{path}: message_cost applies only to client-streaming methods")
    key = declared.idempotency_key
    if key and key not in method.input_type.fields_by_name:
        raise ValueError(f"{path}: idempotency_key {key!r} is not a field of the request")
    return MethodPolicy(
        name=method.name,
        path=path,
        scope=declared.scope,
        public=declared.public,
        cost=declared.cost or 1.0,
        scan_cost=declared.scan_cost,
        message_cost=declared.message_cost,
        idempotent=options.idempotency_level in _SAFE_LEVELS,
        idempotency_key=key,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


def read_policies(service: ServiceDescriptor) -> dict[str, MethodPolicy]:
    """Return the policy of each of service's methods that declares one, keyed by gRPC path."""
    policies = {}
    for method in service.methods:
        policy = policy_of(method)
        if policy is not None:
            policies[policy.path] = policy
    return policies


def declared_policies(
    service: ServiceDescriptor, scopes: Mapping[str, str]
) -> dict[str, MethodPolicy]:
    """Return policies for a service whose proto is not ours: a scope per method name.

    Every such method is taken as idempotent (a replay is safe), as the google.longrunning
    methods are: reads, and a cancel or delete that changes nothing the second time.
    Raises ValueError unless scopes names exactly the service's methods.
    """
    if set(scopes) != set(service.methods_by_name):
        raise ValueError(f"{service.full_name}: scopes must name exactly its methods")
    policies = {}
    for method in service.methods:
        path = method_path(method)
        policies[path] = MethodPolicy(
            name=method.name,
            path=path,
            scope=scopes[method.name],
            public=False,
            cost=1.0,
            scan_cost=0.0,
            message_cost=0.0,
            idempotent=True,
            idempotency_key="",
            client_streaming=method.client_streaming,
            server_streaming=method.server_streaming,
        )
    return policies


# The proto file declares one service: its name is read here and nowhere spelled out.
(SERVICE,) = user_service_pb2.DESCRIPTOR.services_by_name.values()
SERVICE_NAME: Final = SERVICE.full_name
OPERATIONS_SERVICE: Final = operations_pb2.DESCRIPTOR.services_by_name["Operations"]
OPERATIONS_SERVICE_NAME: Final = OPERATIONS_SERVICE.full_name
# google.longrunning.Operations is googleapis' proto, which cannot carry our method_policy
# option, so its policy is this table. users.read is enough to ask: the domain shows a caller
# only the operations it started (an admin all of them), and only admins start any.
OPERATIONS_SCOPES: Final[Mapping[str, str]] = {
    "GetOperation": "users.read",
    "ListOperations": "users.read",
    "WaitOperation": "users.read",
    "CancelOperation": "users.read",
    "DeleteOperation": "users.read",
}
USER_METHODS: Final[Mapping[str, MethodPolicy]] = read_policies(SERVICE)
OPERATIONS_METHODS: Final[Mapping[str, MethodPolicy]] = declared_policies(
    OPERATIONS_SERVICE, OPERATIONS_SCOPES
)
METHODS: Final[Mapping[str, MethodPolicy]] = {**USER_METHODS, **OPERATIONS_METHODS}

"""Per-method policy: declared in the proto, read from its descriptors, enforced as declared."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from helpers.interceptor_harness import serve, settings
from helpers.tokens import ALL_SCOPES, token

from user.v1 import options_pb2
from userservice.client.service_config import service_config
from userservice.interceptors.auth import AuthInterceptor
from userservice.interceptors.chain import PUBLIC_METHODS, InterceptorChain
from userservice.interceptors.matcher import MethodMatcher
from userservice.interceptors.recovery import RecoveryInterceptor
from userservice.policy import (
    OPERATIONS_SERVICE,
    OPERATIONS_SERVICE_NAME,
    SERVICE,
    SERVICE_NAME,
    USER_METHODS,
    MethodPolicy,
    read_policies,
)
from userservice.server.wiring import verifier_from_settings

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_SAFE_LEVELS = (
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
)


def _service(
    package: str, methods: dict[str, dict[str, Any] | None], *, client_streaming: bool = False
) -> ServiceDescriptor:
    """Return a service declared in a pool of its own: its methods, each with the policy given.

    A None policy leaves the method without the option. The request has one field, request_id.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (descriptor_pb2, options_pb2):
        dependency = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(dependency)
        pool.Add(dependency)
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{package.replace('.', '/')}/probe.proto",
        package=package,
        syntax="proto3",
        dependency=[options_pb2.DESCRIPTOR.name],
    )
    request = file.message_type.add(name="ProbeRequest")
    request.field.add(name="request_id", number=1, type=_STRING, label=_OPTIONAL)
    file.message_type.add(name="ProbeResponse")
    service = file.service.add(name="UserService")
    for name, policy in methods.items():
        method = service.method.add(
            name=name,
            input_type=f".{package}.ProbeRequest",
            output_type=f".{package}.ProbeResponse",
            client_streaming=client_streaming,
        )
        if policy is not None:
            method.options.Extensions[options_pb2.method_policy].CopyFrom(
                options_pb2.MethodPolicy(**policy)
            )
    pool.Add(file)
    return pool.FindServiceByName(f"{package}.UserService")


async def _auth_only(policies: dict[str, MethodPolicy]) -> InterceptorChain:
    """Return a chain of recovery and auth, enforcing policies instead of the service's."""
    verifier = verifier_from_settings(settings())
    await verifier.keys.start()
    auth = AuthInterceptor(verifier, MethodMatcher(PUBLIC_METHODS), policies)
    return InterceptorChain([RecoveryInterceptor(), auth], [verifier.keys.aclose])


@pytest.mark.asyncio
async def test_a_method_without_the_option_is_refused_and_a_public_one_needs_no_token() -> None:
    # The harness serves the UserService method names; here they are declared in a descriptor
    # where GetUser has no policy, ListUsers needs users.read and BatchGetUsers is public.
    declared = _service(
        SERVICE_NAME.rpartition(".")[0],
        {"GetUser": None, "ListUsers": {"scope": "users.read"}, "BatchGetUsers": {"public": True}},
    )
    policies = read_policies(declared)
    assert sorted(policy.name for policy in policies.values()) == ["BatchGetUsers", "ListUsers"]
    async with serve(settings(), await _auth_only(policies)) as harness:
        refused = await harness.call("GetUser", b"x", token=token(scopes=ALL_SCOPES))
        listed = await harness.call("ListUsers", b"x", token=token(scopes=["users.read"]))
        anonymous = await harness.call("BatchGetUsers", b"x")
        unscoped = await harness.call("ListUsers", b"x", token=token(scopes=["users.write"]))
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert refused.reason == "METHOD_NOT_PERMITTED"
    assert listed.code is grpc.StatusCode.OK
    assert anonymous.code is grpc.StatusCode.OK
    assert unscoped.code is grpc.StatusCode.PERMISSION_DENIED
    assert unscoped.reason == "SCOPE_MISSING"


@pytest.mark.parametrize(
    ("policy", "client_streaming", "complaint"),
    [
        ({}, False, "exactly one of scope and public"),
        ({"scope": "users.read", "public": True}, False, "exactly one of scope and public"),
        ({"scope": "users.read", "cost": -1}, False, "cannot be negative"),
        ({"scope": "users.read", "message_cost": 1}, False, "only to client-streaming"),
        ({"scope": "users.read", "idempotency_key": "etag"}, False, "not a field"),
    ],
)
def test_a_policy_that_contradicts_itself_stops_the_start(
    policy: dict[str, Any], client_streaming: bool, complaint: str
) -> None:
    declared = _service("policytest.v1", {"Probe": policy}, client_streaming=client_streaming)
    with pytest.raises(ValueError, match=complaint):
        read_policies(declared)


def test_a_consistent_policy_is_read_as_declared() -> None:
    policy = {
        "scope": "users.admin",
        "cost": 20,
        "message_cost": 1,
        "idempotency_key": "request_id",
    }
    declared = _service("policytest.v1", {"Probe": policy}, client_streaming=True)
    (read,) = read_policies(declared).values()
    assert (read.path, read.scope, read.public) == (
        "/policytest.v1.UserService/Probe",
        "users.admin",
        False,
    )
    assert (read.cost, read.scan_cost, read.message_cost) == (20.0, 0.0, 1.0)
    assert read.retryable
    assert not read.idempotent
    # No declared cost means the price of one call.
    (plain,) = read_policies(_service("policytest.v2", {"Probe": {"scope": "x"}})).values()
    assert plain.cost == 1.0


def test_the_client_retries_exactly_the_methods_the_proto_says_are_safe_to_replay() -> None:
    safe = set()
    for method in SERVICE.methods:
        options = method.GetOptions()
        declared = options.Extensions[options_pb2.method_policy]
        if options.idempotency_level in _SAFE_LEVELS or declared.idempotency_key:
            safe.add((SERVICE_NAME, method.name))
    # The reads, and CreateUser through its request_id; writes without a key are not replayed.
    names = {name for _, name in safe}
    assert {"GetUser", "ListUsers", "WatchUsers", "CreateUser"} <= names
    assert not {"UpdateUser", "DeleteUser", "ImportUsers", "SyncUsers", "PurgeUsers"} & names
    # Every google.longrunning.Operations method is safe to replay (policy.OPERATIONS_SCOPES).
    safe |= {(OPERATIONS_SERVICE_NAME, method.name) for method in OPERATIONS_SERVICE.methods}
    configs = json.loads(json.dumps(service_config()))["methodConfig"]
    retried = {
        (name["service"], name["method"])
        for config in configs
        if "retryPolicy" in config
        for name in config["name"]
    }
    configured = {
        (name["service"], name["method"]) for config in configs for name in config["name"]
    }
    assert retried == safe
    assert configured == {(SERVICE_NAME, method.name) for method in SERVICE.methods} | {
        (OPERATIONS_SERVICE_NAME, method.name) for method in OPERATIONS_SERVICE.methods
    }


@pytest.mark.asyncio
# The harness serves UserService's methods; test_operations covers the Operations service's.
@pytest.mark.parametrize("policy", list(USER_METHODS.values()), ids=lambda policy: policy.name)
async def test_each_method_costs_what_its_policy_declares(policy: MethodPolicy) -> None:
    # Three messages for a client stream: the first is in the opening cost, two pay their own.
    messages = [b"a", b"b", b"c"] if policy.client_streaming else [b"a"]
    charged = policy.cost + (len(messages) - 1) * policy.message_cost
    # One token more than the call takes: one GetUser after it passes, the next is refused.
    config = settings(rate_limit_rps=0.001, rate_limit_burst=charged + 1)
    async with serve(config) as harness:
        alice = token("alice")
        assert (await harness.call(policy.name, *messages, token=alice)).code is grpc.StatusCode.OK
        assert (await harness.call("GetUser", b"x", token=alice)).code is grpc.StatusCode.OK
        over = await harness.call("GetUser", b"x", token=alice)
    assert over.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert over.reason == "RATE_LIMITED"

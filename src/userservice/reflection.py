"""Server reflection under both grpc.reflection.v1 and grpc.reflection.v1alpha.

grpcio-reflection only ships v1alpha, while current grpcurl, Postman and grpcui ask for v1
first. The two protocols are the same messages under another package name (identical wire
format), so one servicer answers both: v1 is a second method handler over the v1alpha
messages, and a renamed copy of the v1alpha file descriptor lets reflection describe v1 too.
"""

from __future__ import annotations

from collections.abc import Sequence

# Imported for its side effect: google.rpc.ErrorInfo, BadRequest and RetryInfo must be in
# the descriptor pool reflection serves, so grpcurl decodes the details of a failed call.
import google.rpc.error_details_pb2 as error_details_pb2
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
ERROR_DETAIL_TYPES = tuple(
    error_details_pb2.DESCRIPTOR.message_types_by_name[name].full_name
    for name in ("ErrorInfo", "BadRequest", "RetryInfo", "ResourceInfo")
)
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add grpc/reflection/v1/reflection.proto, renamed from v1alpha, to pool (once)."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    old_package = reflection_pb2.DESCRIPTOR.package
    file_proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file_proto)
    file_proto.name = _V1_FILE
    file_proto.package = V1_PACKAGE
    for message in file_proto.message_type:
        for field in message.field:
            if field.type_name.startswith(f".{old_package}."):
                field.type_name = field.type_name.replace(old_package, V1_PACKAGE, 1)
    for service in file_proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old_package, V1_PACKAGE, 1)
            method.output_type = method.output_type.replace(old_package, V1_PACKAGE, 1)
    pool.Add(file_proto)


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve reflection (v1 and v1alpha) for service_names and the error detail types."""
    _register_v1_descriptor(descriptor_pool.Default())
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler})
            for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
        ]
    )

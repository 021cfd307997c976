"""OpenTelemetry tracing: the provider from OTEL_*, a server span per RPC, storage child spans.

Imported only when tracing is on (see ``tracing.py``). The server span follows the rpc
semantic conventions (name ``package.Service/Method``, kind SERVER, ``rpc.system``,
``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``, ``network.peer.*``) and continues
the caller's W3C ``traceparent`` (any propagator in OTEL_PROPAGATORS, read from the call's
metadata). The layer runs just inside recovery, so the span sees the code each call really
ends with, and outside the access log, which writes the span's trace and span ids.

Why not opentelemetry-instrumentation-grpc's ``aio_server_interceptor``: it is a separate
grpc.aio interceptor that rebuilds the method handler on every call (what chain.py composes
away), its streaming wrapper iterates the behaviour as an async generator, so writer-style
handlers (``context.write``, as every behaviour in our chain is normalised to) break under
it, and it learns the status only from ``abort``/``set_code`` on its own context proxy, so a
code set below it or recovery's INTERNAL is not what its span records.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from userservice.domain.errors import DomainError
from userservice.interceptors.handlers import Behaviour, Context, WrappingInterceptor
from userservice.interceptors.matcher import MethodMatcher
from userservice.interceptors.recovery import final_code
from userservice.observability.errors import TracingUnavailableError
from userservice.observability.storage import SpanFactory
from userservice.rpc_context import TRACE_LOG_FIELDS, invocation_metadata

DEFAULT_SERVICE_NAME: Final = "userservice"
_OK: Final = grpc.StatusCode.OK
# The rpc semantic conventions mark a server span as an error only for these codes: the
# others (NOT_FOUND, INVALID_ARGUMENT, ...) are the caller's mistake, not the server's.
_SERVER_ERRORS: Final = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class _MetadataGetter(Getter[Sequence[Any]]):
    """Reads propagation headers (traceparent, tracestate, baggage) from invocation metadata."""

    def get(self, carrier: Sequence[Any], key: str) -> list[str] | None:
        values = [item[1] for item in carrier if item[0] == key and isinstance(item[1], str)]
        return values or None

    def keys(self, carrier: Sequence[Any]) -> list[str]:
        return [item[0] for item in carrier]


_GETTER: Final = _MetadataGetter()


def _peer_attributes(peer: str) -> dict[str, Any]:
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    host, _, port = address.rpartition(":")
    return {"network.peer.address": host.strip("[]"), "network.peer.port": int(port or 0)}


class TracingInterceptor(WrappingInterceptor):
    """Runs each call in a SERVER span continuing the caller's trace; skips methods in skip."""

    def __init__(self, tracer: trace.Tracer, skip: MethodMatcher) -> None:
        """Trace every method but those matching skip (the health probes)."""
        super().__init__()
        self._tracer = tracer
        self._skip = skip

    def wrap(self, method: str, kind: str, behaviour: Behaviour) -> Behaviour | None:
        """Return behaviour inside a server span (None for skipped methods)."""
        if self._skip.matches(method):
            return None
        name = method.lstrip("/")
        service, _, rpc_method = name.partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc_method}
        tracer = self._tracer

        async def traced(request: Any, context: Context) -> Any:
            parent = propagate.extract(invocation_metadata(context), getter=_GETTER)
            span = tracer.start_span(name, parent, SpanKind.SERVER, attributes)
            if span.is_recording():
                span.set_attributes(_peer_attributes(context.peer()))
            ids = span.get_span_context()
            TRACE_LOG_FIELDS.set(
                f',"trace_id":"{ids.trace_id:032x}","span_id":"{ids.span_id:016x}"'
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            code = _OK
            try:
                response = await behaviour(request, context)
                code = context.code() or _OK
                return response
            except BaseException as error:
                code = final_code(context, error)
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and not isinstance(
                    error, grpc.aio.AbortError
                ):
                    span.record_exception(error)
                raise
            finally:
                otel_context.detach(token)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, code.name))
                span.end()

        return traced


@dataclass(eq=False)
class Tracing:
    """A tracer provider and what the service builds from it."""

    provider: TracerProvider

    @property
    def tracer(self) -> trace.Tracer:
        """The service's tracer."""
        return self.provider.get_tracer("userservice")

    def interceptor(self, skip: MethodMatcher) -> TracingInterceptor:
        """Return the chain layer that opens a server span per call."""
        return TracingInterceptor(self.tracer, skip)

    def storage_spans(self, db_system: str) -> SpanFactory:
        """Return a span factory for storage operations: children of the current call's span.

        Outside a recorded call (the health monitor's pings, the change-feed pump) it opens
        nothing: a root span per background query would only bury the calls' traces.
        """
        tracer = self.tracer

        def storage_span(operation: str) -> contextlib.AbstractContextManager[object] | None:
            if not trace.get_current_span().is_recording():
                return None
            return _storage_span(tracer, operation, db_system)

        return storage_span

    async def aclose(self) -> None:
        """Export what is pending and stop the exporters (off the event loop: it may block)."""
        await asyncio.to_thread(self.provider.shutdown)


@contextlib.contextmanager
def _storage_span(tracer: trace.Tracer, operation: str, db_system: str) -> Iterator[object]:
    attributes = {"db.system.name": db_system, "db.operation.name": operation}
    with tracer.start_as_current_span(
        f"UserRepository.{operation}",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except DomainError:
            raise  # an outcome the domain expects (a taken email, a stale etag), not a failure
        except Exception as error:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise


def _resource(environ: Mapping[str, str], service_version: str) -> Resource:
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES (and OTEL_SERVICE_NAME) from the process
    # environment; without a service.name there, it is unknown_service, replaced by ours.
    attributes: dict[str, str] = {SERVICE_VERSION: service_version}
    if environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = environ["OTEL_SERVICE_NAME"]
    resource = Resource.create(attributes)
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    # Each exporter reads its OTEL_EXPORTER_OTLP_* settings (endpoint, headers, TLS) itself.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter()
    raise TracingUnavailableError(f"unsupported OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}")


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = [
        name.strip().lower()
        for name in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")
        if name.strip()
    ]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            exporters.append(_otlp_exporter(environ))
        elif name == "console":
            exporters.append(ConsoleSpanExporter(out=sys.stdout))
        elif name != "none":
            raise TracingUnavailableError(
                f"unsupported OTEL_TRACES_EXPORTER {name!r} (otlp, console or none)"
            )
    return exporters


def from_environment(
    environ: Mapping[str, str], service_version: str, exporter: SpanExporter | None = None
) -> Tracing:
    """Build tracing from OTEL_*; an explicit exporter (tests) is used instead, synchronously.

    The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on) and the
    batch processors' limits from OTEL_BSP_*, as the SDK reads them.
    """
    provider = TracerProvider(resource=_resource(environ, service_version))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for each in _exporters(environ):
            provider.add_span_processor(BatchSpanProcessor(each))
    return Tracing(provider)

"""Whether the standard OTEL_* environment asks for traces, and loading the tracing extra.

This module imports nothing from OpenTelemetry: with tracing off, the service never
imports it (and need not have it installed), so the per-call cost is what it was.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from userservice.observability.errors import TracingUnavailableError as TracingUnavailableError

if TYPE_CHECKING:
    from userservice.observability.otel import Tracing


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Return whether environ turns tracing on.

    On with ``OTEL_TRACES_EXPORTER`` set to anything but ``none``, or with an OTLP endpoint
    and no exporter named (OTLP is then implied); off by default, unlike the OpenTelemetry
    SDK's own default of ``otlp``, so that a service with no collector exports nothing.
    ``OTEL_SDK_DISABLED=true`` wins over both.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return any(environ.get(name) for name in endpoints)


def start_tracing(environ: Mapping[str, str], service_version: str) -> Tracing | None:
    """Return configured tracing when environ asks for it, else None (importing nothing)."""
    if not tracing_requested(environ):
        return None
    try:
        otel = importlib.import_module("userservice.observability.otel")
    except ImportError as error:
        raise TracingUnavailableError(
            f"OTEL_* asks for traces but OpenTelemetry is not installed ({error.name}):"
            " install 'userservice[otel]'"
        ) from error
    tracing: Tracing = otel.from_environment(environ, service_version)
    return tracing

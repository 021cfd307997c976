"""The error both the tracing switch (tracing.py) and the OpenTelemetry wiring (otel.py) raise."""

from __future__ import annotations


class TracingUnavailableError(RuntimeError):
    """Traces were asked for, but the extra is missing or the OTEL_* settings are invalid."""

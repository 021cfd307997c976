"""Observability beyond the interceptors: storage metrics and spans, optional OpenTelemetry."""

"""The access log: one JSON line per RPC at completion, with its final code."""

from __future__ import annotations

from userservice.interceptors.logging.interceptor import AccessLogInterceptor
from userservice.interceptors.logging.line import LOGGER_NAME
from userservice.interceptors.logging.sink import BufferedStderr

__all__ = ["LOGGER_NAME", "AccessLogInterceptor", "BufferedStderr"]

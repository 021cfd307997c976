"""Method matching by exact name or prefix, without regular expressions."""

from __future__ import annotations

from collections.abc import Iterable


class MethodMatcher:
    """Match full method names (/package.Service/Method) against patterns.

    A pattern is an exact method name, or a prefix ending in ``*``: ``grpc.health.v1.Health/*``
    matches every Health method and ``grpc.reflection.*`` every reflection version. The
    leading slash is optional. Interceptors consult it once per method, when they wrap it.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        """Compile the patterns into an exact-name set and a prefix tuple."""
        exact: set[str] = set()
        prefixes: list[str] = []
        for pattern in patterns:
            normalised = pattern if pattern.startswith("/") else "/" + pattern
            if normalised.endswith("*"):
                prefixes.append(normalised[:-1])
            else:
                exact.add(normalised)
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)

    def matches(self, method: str) -> bool:
        """Return whether method matches any pattern."""
        return method in self._exact or method.startswith(self._prefixes)

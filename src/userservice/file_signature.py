"""A file's identity and version, to notice that a watched file was replaced or rewritten."""

from __future__ import annotations

import os

FileSignature = tuple[int, int, int, int]


def file_signature(path: str) -> FileSignature:
    """Return path's device, inode, size and modification time; raise OSError if unreadable.

    stat follows symlinks: a Kubernetes volume update swaps the ..data link, which changes
    the inode seen here even when size and mtime happen to match.
    """
    status = os.stat(path)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)

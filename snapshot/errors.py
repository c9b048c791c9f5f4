"""The one error type of the snapshot package: bad input, never a bug."""

from __future__ import annotations


class SnapshotError(Exception):
    """A snapshot, a source model or a remote copy is missing, corrupted or unsupported.

    The message is one line that names the file and the problem, so a CLI can print it as is.
    """

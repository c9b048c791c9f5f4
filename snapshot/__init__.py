"""Snapshots: a model in its serving dtype and layout, checked, and loadable without transformers.

The modules are imported on demand; importing this package pulls in nothing heavy.
"""

from snapshot.errors import SnapshotError

__all__ = ["SnapshotError"]

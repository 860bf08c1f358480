"""Where stage outputs live: the ``Store`` interface and its implementations, chosen by ``open_store``.

``store:`` in the config names it: a directory today (``LocalStore``). Every stage, the chain and the
flow reach outputs, side caches, digests of inputs and their own scratch files through a ``Store``;
nothing else builds a path from ``cfg.store``. Adding a backend is one class (docs/store.md). A stage builds
in a local work directory whatever the backend, so that directory's verification record (``work_hashes``,
``remember_hashes``) is the local store's.
"""

from __future__ import annotations

from .base import Store, disk_full, disk_full_error
from .local import LocalStore, remember_hashes, work_hashes


def open_store(root: str) -> Store:
    """The store ``root`` names."""
    return LocalStore(root)


__all__ = ["Store", "LocalStore", "open_store", "disk_full", "disk_full_error", "remember_hashes", "work_hashes"]

"""Where stage outputs live: the ``Store`` interface and its implementations, chosen by ``open_store``.

``store:`` in the config names it: a directory (``LocalStore``), ``s3://bucket/prefix`` or ``gs://bucket/prefix``
(``ObjectStore``, object.py, on the bucket class ``BUCKETS`` names for the scheme: S3, MinIO and any S3-compatible
server; Google Cloud Storage; credentials from the environment). Every stage, the chain and the
flow reach outputs, side caches, digests of inputs and their own scratch files through a ``Store``;
nothing else builds a path from ``cfg.store``. Adding a backend is one class (docs/store.md). A stage builds
in a local work directory whatever the backend, so that directory's verification record (``work_hashes``,
``remember_hashes``) is the local store's.
"""

from __future__ import annotations

import re

from dmd_core.errors import InputError, shown

from .base import Store, disk_full, disk_full_error
from .bucket import Bucket
from .gcs import GcsBucket
from .local import LocalStore, remember_hashes, work_hashes

# URL scheme -> the bucket class an object store on it uses (neither imports its client library until a store is
# opened): another object storage service is one such class and one line here (docs/store.md, "Adding a backend")
BUCKETS = {"s3": Bucket, "s3a": Bucket, "gs": GcsBucket, "gcs": GcsBucket}

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def open_store(root: str) -> Store:
    """The store ``root`` names: ``s3://`` or ``gs://bucket/prefix`` is an object store, ``file://DIR`` or a path a directory."""
    scheme = _URL.match(root)
    if scheme is None:
        return LocalStore(root)
    name = scheme.group(1).lower()
    if name == "file":
        return LocalStore(root[len(scheme.group(0)) :])
    if name in BUCKETS:
        from .object import ObjectStore

        return ObjectStore(root, BUCKETS[name])
    raise InputError(
        f"store {shown(root)}: no store for {name}:// URLs. Fix: a directory, s3://BUCKET/PREFIX (AWS S3, MinIO or any "
        "S3-compatible server) or gs://BUCKET/PREFIX (Google Cloud Storage; README: the store on object storage)."
    )


__all__ = ["Store", "LocalStore", "open_store", "disk_full", "disk_full_error", "remember_hashes", "work_hashes"]

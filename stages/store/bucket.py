"""The few object-storage operations the object store needs, on S3 and S3-compatible servers (s3fs).

Besides plain transfers, the store needs conditional writes: a create that fails when the object exists
(``If-None-Match: *``) and a replace or delete that fails unless the object is still the version read
(``If-Match: <etag>``). AWS S3, MinIO and moto's server honour both; ``check`` refuses a server that
silently ignores them. Credentials and the endpoint come from botocore's usual environment
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for MinIO and
other S3-compatible servers, ``AWS_DEFAULT_REGION``), never from the pipeline config.

Every bucket class (this one, gcs.py's ``GcsBucket``) counts its transfers in ``TRANSFERRED`` and checks
itself with ``check_bucket``.
"""

from __future__ import annotations

import os
import uuid
from typing import Callable

from dmd_core.errors import InputError, shown

from ..files import log_at_exit

TRANSFER_LOG = "DMD_TRANSFER_LOG"  # a file each process appends "<pid> <bytes downloaded> <bytes uploaded>" to at exit (tests)


class _Transferred:
    """Bytes this process has moved to and from object storage."""

    down = 0
    up = 0


TRANSFERRED = _Transferred()


log_at_exit(TRANSFER_LOG, lambda: [TRANSFERRED.down, TRANSFERRED.up])


def s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind ``exc`` (s3fs translates ClientError into OSError and keeps it as the cause)."""
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", "")) or None
    return None


def _precondition_failed(exc: BaseException) -> bool:
    # 409 ConditionalRequestConflict: S3's answer to two conditional writes of one key at the same moment
    return isinstance(exc, FileExistsError) or s3_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def _missing(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or s3_code(exc) in ("NoSuchKey", "404")


class BucketNames:
    """What every bucket class shares: objects below ``<scheme>://<bucket>/<prefix>`` named by paths relative to
    the prefix, and the conditional create and replace spelled with the service's own precondition
    (``IF_ABSENT``: the condition of a create; ``IF_VERSION``: the parameter that names the version to replace)."""

    IF_ABSENT: dict[str, str] = {}
    IF_VERSION = ""

    def __init__(self, url: str):
        self.url = url
        self.bucket, _, prefix = url.split("://", 1)[1].partition("/")
        self.prefix = prefix.strip("/")
        self.base = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix and rel else self.prefix or rel

    def put(self, rel: str, data: bytes, **condition: str) -> str | None:
        raise NotImplementedError

    def create(self, rel: str, data: bytes) -> str | None:
        """Create the object only if it does not exist; its version, or None when it exists."""
        return self.put(rel, data, **self.IF_ABSENT)

    def replace(self, rel: str, data: bytes, version: str) -> str | None:
        """Overwrite the object only if it is still ``version``; the new version, or None (changed or gone)."""
        return self.put(rel, data, **{self.IF_VERSION: version})


class Bucket(BucketNames):
    """Objects below ``s3://<bucket>/<prefix>``; versions are ETags."""

    IF_ABSENT = {"IfNoneMatch": "*"}
    IF_VERSION = "IfMatch"

    def __init__(self, url: str):
        try:
            import s3fs
        except ImportError:
            raise InputError(
                f"store {shown(url)} needs s3fs, which is not installed. Fix: pip install 'dmd-pipeline[s3]' (or pip install s3fs)."
            ) from None
        super().__init__(url)
        # No listing cache: another process's publish must be seen at once. The endpoint is passed, not left to
        # botocore's environment lookup, because s3fs reuses an instance made with the same arguments: one made
        # before AWS_ENDPOINT_URL changed would keep talking to the old server.
        self.fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=False, endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)

    # ---- small objects
    def read(self, rel: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, read in one request; None when absent."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(rel))
            async with resp["Body"] as body:
                data = await body.read()
            return data, resp["ETag"]

        try:
            return sync(self.fs.loop, get)
        except Exception as e:
            if _missing(e):
                return None
            raise

    def put(self, rel: str, data: bytes, **condition: str) -> str | None:
        """Write ``data``; returns the new ETag, or None when a condition (IfNoneMatch, IfMatch) failed."""
        try:
            resp = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(rel), Body=data, **condition)
        except Exception as e:
            if condition and (_precondition_failed(e) or (_missing(e) and "IfMatch" in condition)):
                return None
            raise
        TRANSFERRED.up += len(data)
        return resp["ETag"]

    def delete_if(self, rel: str, etag: str) -> bool:
        """Delete the object only if it is still version ``etag``; False when it changed or is gone."""
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self._key(rel), IfMatch=etag)
            return True
        except Exception as e:
            if _precondition_failed(e) or _missing(e):
                return False
            if s3_code(e) not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                raise
        # a server without conditional deletes: compare, then delete (a narrow race, on release only)
        got = self.read(rel)
        if got is None or got[1] != etag:
            return False
        self.delete([rel])
        return True

    # ---- listings and transfers
    def listing(self, rel: str) -> dict[str, tuple[int, str]]:
        """(size, ETag) of every object below the folder ``rel``, by path relative to it."""
        top = self.path(rel).rstrip("/")
        try:
            found = self.fs.find(top, detail=True)
        except FileNotFoundError:
            return {}
        return {name[len(top) + 1 :]: (int(info["size"]), str(info.get("ETag", ""))) for name, info in found.items() if name.startswith(top + "/")}

    def folders(self, rel: str) -> list[str]:
        """Names of the folders directly below ``rel``."""
        try:
            entries = self.fs.ls(self.path(rel), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def exists(self, rel: str) -> bool:
        try:
            self.fs.info(self.path(rel))
            return True
        except FileNotFoundError:
            return False

    def upload(self, pairs: list[tuple[str, str]]) -> None:
        """(local file, relative object path) pairs, uploaded concurrently."""
        if pairs:
            self.fs.put([p for p, _ in pairs], [self.path(r) for _, r in pairs])
            TRANSFERRED.up += sum(os.path.getsize(p) for p, _ in pairs)

    def download_many(self, pairs: list[tuple[str, str]]) -> None:
        """(relative object path, local file) pairs, downloaded concurrently."""
        if pairs:
            self.fs.get([self.path(r) for r, _ in pairs], [p for _, p in pairs])
            TRANSFERRED.down += sum(os.path.getsize(p) for _, p in pairs)

    def copy(self, pairs: list[tuple[str, str]]) -> None:
        """Server-side copies, (from, to) relative paths."""
        if pairs:
            self.fs.copy([self.path(a) for a, _ in pairs], [self.path(b) for _, b in pairs])

    def delete(self, rels: list[str]) -> None:
        if rels:
            try:
                self.fs.rm([self.path(r) for r in rels])
            except FileNotFoundError:
                pass

    # ---- before a run
    def check(self) -> None:
        """Refuse (InputError) a bucket that cannot be reached or written, or a server that ignores conditional
        writes (two builders of one output could then not be kept apart); leaves nothing behind."""
        stale = '"00000000000000000000000000000000"'  # an ETag no object of the probe's bytes has
        honoured_by = "AWS S3, MinIO, or any S3-compatible server that does"
        check_bucket(self, stale, lambda e: (_reason(e), _fix(e)), ignored="If-None-Match / If-Match", honoured_by=honoured_by)


def check_bucket(bucket, stale: str, explain: Callable[[BaseException], tuple[str, str]], ignored: str, honoured_by: str) -> None:
    """A bucket's ``check``: create a probe object twice (the second must fail), replace it with the ``stale``
    version (must fail), delete it. An error becomes one line, ``explain(e)`` giving (what, fix); a server that let
    either write through is refused naming its conditions (``ignored``) and the servers that honour them."""
    probe = f".write-test-{uuid.uuid4().hex}"
    where = f"store {shown(bucket.url)}"
    try:
        first = bucket.create(probe, b"probe")
        try:
            second = bucket.create(probe, b"probe again")
            replaced = bucket.replace(probe, b"x", stale)
        finally:
            bucket.delete([probe])
    except InputError:
        raise
    except Exception as e:
        what, fix = explain(e)
        raise InputError(f"{where} cannot be written: {what.rstrip('.')}. Fix: {fix}") from None
    if first is None or second is not None or replaced is not None:
        raise InputError(
            f"{where}: the server ignores conditional writes ({ignored}), so two builders of one output could not "
            f"be kept apart. Fix: use a server that honours them ({honoured_by})."
        )


def _reason(e: BaseException) -> str:
    code = s3_code(e)
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{code}: {text}" if code and code not in text else text


def _fix(e: BaseException) -> str:
    name, code = type(e).__name__, s3_code(e)
    if "Credentials" in name or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        return "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment; credentials never go in the config."
    if code == "NoSuchBucket" or isinstance(e, FileNotFoundError):
        return "create the bucket first (e.g. `aws s3 mb s3://BUCKET`, or in MinIO's console) or fix its name."
    if isinstance(e, PermissionError) or code == "AccessDenied":
        return "grant these credentials s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on the bucket."
    if "Endpoint" in name or "Connect" in name or isinstance(e, (ConnectionError, TimeoutError)):
        return "check AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000 for a local MinIO) and that the server runs."
    return "check the bucket, the credentials in the environment and AWS_ENDPOINT_URL."

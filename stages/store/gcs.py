"""The object store's bucket on Google Cloud Storage (``store: gs://bucket/prefix``), over gcsfs.

GCS writes conditionally with generation preconditions, not ``If-None-Match`` / ``If-Match``: every write of an
object gives it a new generation number, and a write or delete with ``ifGenerationMatch=<g>`` happens only if
the live object is still generation ``g`` (``ifGenerationMatch=0``: only if there is none); otherwise GCS
answers 412 Precondition Failed. An object's version here is its generation (as a string), the same number in a
listing, in a read (``x-goog-generation``) and in the resource a write returns.

Reads and writes of small objects, listings, copies and deletes are JSON API requests made here, one per object
(a listing one per page, a copy of a large object one per rewrite call); files go up and down through gcsfs's
``put`` / ``get`` (a file above 5 MiB is uploaded resumably). gcsfs's ``GCSFileSystem`` of ``gcsfs.core`` gives
the session, the credentials, the endpoint and the retries. Credentials come from Google's usual environment
(``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``, the metadata server of a VM or
a GKE pod with workload identity), never from the pipeline config; ``STORAGE_EMULATOR_HOST`` names an
emulator, spoken to without credentials, as Google's own clients do.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, Callable

from dmd_core.errors import InputError, shown

from .bucket import TRANSFERRED, BucketNames, check_bucket

EMULATOR = "STORAGE_EMULATOR_HOST"
CONCURRENCY = 32  # requests in flight for deletes and copies of many objects
CREDENTIALS_FIX = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, run `gcloud auth application-default login`, "
    "or run on a VM or GKE pod whose service account (workload identity) has access; credentials never go in the config."
)


def _emulator() -> str | None:
    """The endpoint ``STORAGE_EMULATOR_HOST`` names (``host:port`` means http), or None for Google's."""
    host = os.environ.get(EMULATOR, "").strip()
    if not host or host == "default":  # "default": gcsfs's spelling of unset
        return None
    return host if "://" in host else f"http://{host}"


class GcsBucket(BucketNames):
    """Objects below ``gs://<bucket>/<prefix>``; the same interface as bucket.py's ``Bucket``, with generations as
    versions."""

    IF_ABSENT = {"ifGenerationMatch": "0"}
    IF_VERSION = "ifGenerationMatch"

    def __init__(self, url: str):
        endpoint = _emulator()
        if endpoint is not None:
            # gcsfs >= 2026.3 by default asks the Storage Control API (gRPC) for every bucket's layout, and no
            # emulator answers it: each fsspec open of a gs:// URL (the streamed shards) would wait ~40 s for it
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        try:
            import google.auth.exceptions
            from gcsfs.core import GCSFileSystem
        except ImportError:
            raise InputError(
                f"store {shown(url)} needs gcsfs, which is not installed. Fix: pip install 'dmd-pipeline[gs]' (or pip install gcsfs)."
            ) from None
        super().__init__(url)
        try:
            # The JSON API's class (gcsfs.core), not the registry's default that also speaks gRPC to zonal buckets:
            # every call here is a JSON API request. The endpoint is passed, not left to gcsfs's environment lookup,
            # so that an instance reused for the same arguments talks to the server named now.
            self.fs = GCSFileSystem(token="anon" if endpoint else "google_default", endpoint_url=endpoint, use_listings_cache=False)
        except google.auth.exceptions.GoogleAuthError as e:
            raise InputError(f"store {shown(url)}: no Google credentials ({_first_line(e)}). Fix: {CREDENTIALS_FIX}") from None

    def _folder(self, rel: str) -> str:
        """The name prefix of the objects below the folder ``rel`` ("" for the whole bucket)."""
        key = self._key(rel).strip("/")
        return f"{key}/" if key else ""

    def _run(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, fn)

    # ---- small objects
    def read(self, rel: str) -> tuple[bytes, str] | None:
        """The object's bytes and generation, read in one request (``alt=media`` on the download URL, as Google's
        client reads: the generation comes in its ``x-goog-generation`` header); None when absent."""
        try:
            url = f"{self.fs._location}/download/storage/v1/b/{{}}/o/{{}}"
            headers, data = self.fs.call("GET", url, self.bucket, self._key(rel), alt="media")
        except FileNotFoundError:
            return None
        return data, str(headers["x-goog-generation"])

    def put(self, rel: str, data: bytes, **condition: str) -> str | None:
        """Write ``data`` in one request; returns the new generation, or None when a condition (``ifGenerationMatch``)
        failed."""
        try:
            resource = self.fs.call(
                "POST", f"{self.fs._location}/upload/storage/v1/b/{{}}/o", self.bucket, uploadType="media", name=self._key(rel),
                data=data, headers={"Content-Type": "application/octet-stream"}, json_out=True, **condition,
            )  # fmt: skip
        except FileExistsError:  # gcsfs's translation of 412 Precondition Failed
            if condition:
                return None
            raise
        TRANSFERRED.up += len(data)
        return str(resource["generation"])

    def delete_if(self, rel: str, generation: str) -> bool:
        """Delete the object only if it is still ``generation``; False when it changed or is gone."""
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self._key(rel), ifGenerationMatch=generation)
            return True
        except (FileExistsError, FileNotFoundError):
            return False

    # ---- listings and transfers
    def _list(self, prefix: str, **params: str) -> list[dict]:
        """Every page of ``objects.list`` below ``prefix``: its items and prefixes, as one list of pages."""
        pages, token = [], None
        while True:
            page = self.fs.call("GET", "b/{}/o", self.bucket, prefix=prefix, pageToken=token, json_out=True, **params)
            pages.append(page)
            token = page.get("nextPageToken")
            if not token:
                return pages

    def listing(self, rel: str) -> dict[str, tuple[int, str]]:
        """(size, generation) of every object below the folder ``rel``, by path relative to it."""
        top = self._folder(rel)
        try:
            pages = self._list(top)
        except FileNotFoundError:
            return {}
        items = (item for page in pages for item in page.get("items", []))
        return {i["name"][len(top) :]: (int(i["size"]), str(i["generation"])) for i in items if not i["name"].endswith("/")}

    def folders(self, rel: str) -> list[str]:
        """Names of the folders directly below ``rel``."""
        top = self._folder(rel)
        try:
            pages = self._list(top, delimiter="/")
        except FileNotFoundError:
            return []
        return sorted({p[len(top) :].rstrip("/") for page in pages for p in page.get("prefixes", [])})

    def exists(self, rel: str) -> bool:
        try:
            self.fs.call("GET", "b/{}/o/{}", self.bucket, self._key(rel), json_out=True)
            return True
        except FileNotFoundError:
            return False

    def upload(self, pairs: list[tuple[str, str]]) -> None:
        """(local file, relative object path) pairs, uploaded concurrently (gcsfs: one request up to 5 MiB, resumable
        in 50 MiB chunks above)."""
        if pairs:
            self.fs.put([p for p, _ in pairs], [self.path(r) for _, r in pairs])
            TRANSFERRED.up += sum(os.path.getsize(p) for p, _ in pairs)

    def download_many(self, pairs: list[tuple[str, str]]) -> None:
        """(relative object path, local file) pairs, downloaded concurrently."""
        if pairs:
            self.fs.get([self.path(r) for r, _ in pairs], [p for _, p in pairs])
            TRANSFERRED.down += sum(os.path.getsize(p) for _, p in pairs)

    def copy(self, pairs: list[tuple[str, str]]) -> None:
        """Server-side copies, (from, to) relative paths (``objects.rewrite``, continued while GCS says not done)."""

        async def rewrite(src: str, dst: str) -> None:
            token = None
            while True:
                out = await self.fs._call(
                    "POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}", self.bucket, self._key(src), self.bucket, self._key(dst),
                    rewriteToken=token, headers={"Content-Type": "application/json"}, json_out=True,
                )  # fmt: skip
                if out.get("done"):
                    return
                token = out["rewriteToken"]

        self._each([rewrite(a, b) for a, b in pairs])

    def delete(self, rels: list[str]) -> None:
        """Delete the objects (one request each, concurrently: the same requests on GCS and on an emulator, where
        gcsfs's ``rm`` would batch on one and not the other); absent ones are no error."""

        async def remove(rel: str) -> None:
            try:
                await self.fs._call("DELETE", "b/{}/o/{}", self.bucket, self._key(rel))
            except FileNotFoundError:
                pass

        self._each([remove(r) for r in rels])

    def _each(self, coros: list[Awaitable[None]]) -> None:
        """Run the requests, ``CONCURRENCY`` at a time; the first error is raised once all have ended."""
        if not coros:
            return

        async def run() -> None:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(c: Awaitable[None]) -> None:
                async with gate:
                    await c

            errors = [r for r in await asyncio.gather(*(one(c) for c in coros), return_exceptions=True) if isinstance(r, BaseException)]
            if errors:
                raise errors[0]

        self._run(run)

    # ---- before a run
    def check(self) -> None:
        """Refuse (InputError) a bucket that does not exist or cannot be written with these credentials, or a server
        that ignores generation preconditions; leaves nothing behind."""
        honoured_by = "Google Cloud Storage itself, or an emulator that implements ifGenerationMatch"
        # generation 1 is never a live object's: GCS's are microsecond timestamps
        check_bucket(self, "1", lambda e: (_reason(e), _fix(e)), ignored="ifGenerationMatch", honoured_by=honoured_by)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _status(e: BaseException) -> int | None:
    """The HTTP status behind a gcsfs error (its HttpError carries one; 403 comes as OSError("Forbidden: ..."))."""
    code = getattr(e, "code", None)
    if isinstance(code, int):
        return code
    return 403 if isinstance(e, OSError) and str(e).startswith("Forbidden") else None


def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "the bucket does not exist"
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if _status(e) == 403 and len(lines) > 1:  # gcsfs's 403: "Forbidden: <url>", then GCS's message
        return f"403 Forbidden: {lines[1]}"
    return lines[0] if lines else type(e).__name__


def _fix(e: BaseException) -> str:
    import google.auth.exceptions

    status = _status(e)
    if isinstance(e, google.auth.exceptions.GoogleAuthError) or status == 401:
        return CREDENTIALS_FIX
    if isinstance(e, FileNotFoundError):
        return "create the bucket first (e.g. `gcloud storage buckets create gs://BUCKET`) or fix its name."
    if status == 403:
        return "grant these credentials the Storage Object User role (roles/storage.objectUser) on the bucket."
    if isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in type(e).__name__:
        return f"check {EMULATOR} (unset for Google Cloud Storage; host:port of a running emulator) and the network."
    return f"check the bucket, the Google credentials in the environment and {EMULATOR}."

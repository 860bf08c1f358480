"""A Google Cloud Storage JSON API server on loopback, for tests of the store on ``gs://``: HTTP on 127.0.0.1 and
a free port, objects in memory, reached as any emulator is (``STORAGE_EMULATOR_HOST``); nothing is patched into
gcsfs.

It implements the calls gcsfs and ``stages.store.gcs.GcsBucket`` make, as the JSON API documents them and as
Google's own emulator (googleapis/storage-testbench) evaluates them:

- buckets: get, insert; objects: list (``prefix``, ``delimiter``, ``pageToken``, ``maxResults``: one page holds at
  most that many items and prefixes together), get (metadata, or the bytes with ``alt=media``, also under
  ``/download/...``, with ``Range``), delete, rewrite (``rewriteTo``; an object larger than ``rewrite_chunk`` takes
  several calls, continued by ``rewriteToken``, as GCS does for large objects);
- uploads: ``uploadType=media``, ``multipart`` and ``resumable`` (chunks by ``Content-Range``; 308 with ``Range``
  until the last);
- every object has a generation (a microsecond count, new and larger at every write: GCS's are the write's
  time in microseconds) and a metageneration (1), its size, md5Hash and crc32c (base64, big-endian), as strings
  as the JSON API writes them; a media download carries ``x-goog-generation``, ``x-goog-metageneration`` and
  ``x-goog-hash``;
- preconditions ``ifGenerationMatch`` / ``ifGenerationNotMatch`` / ``ifMetagenerationMatch`` /
  ``ifMetagenerationNotMatch`` (and ``ifSource...`` on rewrite) on reads, writes, deletes: 412 when a Match
  fails (``ifGenerationMatch=0``: the object must not exist), 304 when a NotMatch fails; reading or deleting an
  object that does not exist is 404 whatever the preconditions;
- errors as GCS's JSON (``{"error": {"code", "message", "errors": [{"domain", "reason", "message"}]}}``).

``GcsServer(honour_preconditions=False)`` ignores every precondition (a server ``check`` must refuse);
``forbidden = True`` answers 403 to everything, as GCS does to credentials without the role; ``page_size`` caps
a listing's page below ``maxResults`` (GCS may return fewer entries than asked), to test paging on few objects.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

PRECONDITION_FAILED = "At least one of the pre-conditions you specified did not hold."


class GcsError(Exception):
    def __init__(self, code: int, message: str, reason: str, **extra: str):
        super().__init__(message)
        self.code, self.message, self.reason, self.extra = code, message, reason, extra


def _not_found(message: str) -> GcsError:
    return GcsError(404, message, "notFound")


def _crc32c(data: bytes) -> str:
    import google_crc32c  # gcsfs's dependency; GCS's crc32c is the Castagnoli CRC, big-endian, base64

    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


@dataclass
class Obj:
    name: str
    data: bytes
    generation: int
    content_type: str = "application/octet-stream"
    metageneration: int = 1
    created: float = field(default_factory=time.time)

    def resource(self, bucket: str, base: str) -> dict:
        """The object resource, as ``objects.get`` returns it (int64 fields as strings)."""
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{self.name}/{self.generation}",
            "selfLink": f"{base}/storage/v1/b/{bucket}/o/{quote(self.name, safe='')}",
            "mediaLink": f"{base}/download/storage/v1/b/{bucket}/o/{quote(self.name, safe='')}?generation={self.generation}&alt=media",
            "name": self.name,
            "bucket": bucket,
            "generation": str(self.generation),
            "metageneration": str(self.metageneration),
            "contentType": self.content_type,
            "storageClass": "STANDARD",
            "size": str(len(self.data)),
            "md5Hash": base64.b64encode(hashlib.md5(self.data).digest()).decode(),
            "crc32c": _crc32c(self.data),
            "etag": self.etag,
            "timeCreated": _rfc3339(self.created),
            "updated": _rfc3339(self.created),
            "timeStorageClassUpdated": _rfc3339(self.created),
        }

    @property
    def etag(self) -> str:
        return base64.b64encode(f"{self.generation}/{self.metageneration}".encode()).decode().rstrip("=")


@dataclass
class Upload:
    bucket: str
    name: str
    content_type: str
    conditions: dict[str, str]
    data: bytearray = field(default_factory=bytearray)


class GcsServer:
    """In-memory buckets behind the JSON API (see the module doc); ``url`` once started."""

    def __init__(self, honour_preconditions: bool = True, rewrite_chunk: int = 1 << 20, page_size: int = 1000):
        self.honour_preconditions = honour_preconditions
        self.rewrite_chunk = rewrite_chunk
        self.page_size = page_size  # GCS may return fewer entries than maxResults asks for: a client must follow nextPageToken
        self.forbidden = False
        self.buckets: dict[str, dict[str, Obj]] = {}
        self.uploads: dict[str, Upload] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path and query) of every request, in order
        self._lock = threading.Lock()
        self._last_generation = 0
        self._httpd: ThreadingHTTPServer | None = None
        self.url = ""

    # ---- the state, for tests (the same rules as requests)
    def create_bucket(self, name: str) -> None:
        with self._lock:
            if name in self.buckets:
                raise GcsError(409, "Your previous request to create the named bucket succeeded and you already own it.", "conflict")
            self.buckets[name] = {}

    def objects(self, bucket: str) -> dict[str, bytes]:
        with self._lock:
            return {n: o.data for n, o in sorted(self._bucket(bucket).items())}

    def put(self, bucket: str, name: str, data: bytes, **conditions: str) -> Obj:
        with self._lock:
            return self._write(bucket, name, data, "application/octet-stream", conditions)

    def delete(self, bucket: str, name: str, **conditions: str) -> None:
        with self._lock:
            self._object(bucket, name, conditions)
            del self.buckets[bucket][name]

    def generation(self, bucket: str, name: str) -> int:
        with self._lock:
            return self._object(bucket, name, {}).generation

    # ---- rules
    def _bucket(self, name: str) -> dict[str, Obj]:
        if name not in self.buckets:
            raise _not_found("The specified bucket does not exist.")
        return self.buckets[name]

    def _next_generation(self) -> int:
        self._last_generation = max(time.time_ns() // 1000, self._last_generation + 1)
        return self._last_generation

    def _check(self, current: Obj | None, conditions: dict[str, str]) -> None:
        """Raise 412 / 304 as GCS does when a precondition on ``current`` (None: no live object) fails."""
        if not self.honour_preconditions:
            return
        generation = current.generation if current is not None else None
        metageneration = current.metageneration if current is not None else None
        for kind, actual in (("Generation", generation), ("Metageneration", metageneration)):
            match = conditions.get(f"if{kind}Match")
            if match is not None:
                want = int(match)
                if not ((want == 0 and actual is None) or (want != 0 and want == actual)):
                    raise GcsError(412, PRECONDITION_FAILED, "conditionNotMet", locationType="header", location="If-Match")
            not_match = conditions.get(f"if{kind}NotMatch")
            if not_match is not None:
                want = int(not_match)
                if not ((want == 0 and actual is not None) or (want != 0 and want != actual)):
                    raise GcsError(304, "Not Modified", "notModified")

    def _object(self, bucket: str, name: str, conditions: dict[str, str], generation: str | None = None) -> Obj:
        obj = self._bucket(bucket).get(name)
        if obj is None or (generation not in (None, "", "0") and int(generation) != obj.generation):
            raise _not_found(f"No such object: {bucket}/{name}")
        self._check(obj, conditions)
        return obj

    def _write(self, bucket: str, name: str, data: bytes, content_type: str, conditions: dict[str, str]) -> Obj:
        objects = self._bucket(bucket)
        if not name:
            raise GcsError(400, "Required", "required")
        self._check(objects.get(name), conditions)
        obj = Obj(name, bytes(data), self._next_generation(), content_type or "application/octet-stream")
        objects[name] = obj
        return obj

    # ---- serving
    def start(self) -> str:
        server = self

        class Handler(_Handler):
            gcs = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="gcs-server", daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


CONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch")
SOURCE_CONDITIONS = tuple(c.replace("if", "ifSource", 1) for c in CONDITIONS)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as GCS: aiohttp reuses connections
    disable_nagle_algorithm = True  # headers and body go out in two writes: with Nagle, each response waits ~40 ms for an ACK
    gcs: GcsServer

    def log_message(self, *args) -> None:  # one line per request otherwise
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    # ---- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | list[tuple[str, str]] | None = None,
              content_type: str = "application/json; charset=UTF-8") -> None:  # fmt: skip
        self.send_response(status)
        for k, v in headers.items() if isinstance(headers, dict) else headers or []:
            self.send_header(k, v)
        if status not in (204, 304):
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, json.dumps(doc).encode())

    def _error(self, e: GcsError) -> None:
        if e.code == 304:
            return self._send(304)
        detail = {"message": e.message, "domain": "global", "reason": e.reason, **e.extra}
        self._json(e.code, {"error": {"code": e.code, "message": e.message, "errors": [detail]}})

    def _serve(self, method: str) -> None:
        gcs = self.gcs
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        body = self._body()
        with gcs._lock:
            gcs.requests.append((method, self.path))
        try:
            try:
                if gcs.forbidden:
                    raise GcsError(403, "dmd-test@example.iam.gserviceaccount.com does not have storage.objects.create access to the Google "
                                   "Cloud Storage object. Permission 'storage.objects.create' denied on resource (or it may not exist).", "forbidden")  # fmt: skip
                self._route(method, parts, query, body)
            except GcsError as e:
                self._error(e)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped waiting (gcsfs cancels the slower of two lookups)
            self.close_connection = True

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: bytes) -> None:
        gcs = self.gcs
        conditions = {k: query[k] for k in CONDITIONS if k in query}
        match parts:
            case ["storage", "v1", "b"] if method == "POST":
                name = json.loads(body or b"{}").get("name", "")
                gcs.create_bucket(name)
                return self._json(200, _bucket_resource(name))
            case ["storage", "v1", "b", bucket] if method == "GET":
                with gcs._lock:
                    gcs._bucket(bucket)
                return self._json(200, _bucket_resource(bucket))
            case ["storage", "v1", "b", bucket, "o"] if method == "GET":
                return self._json(200, self._list(bucket, query))
            case ["storage", "v1", "b", bucket, "o", name] | ["download", "storage", "v1", "b", bucket, "o", name] if method == "GET":
                with gcs._lock:
                    obj = gcs._object(bucket, name, conditions, query.get("generation"))
                if query.get("alt") == "media":
                    return self._media(obj)
                if parts[0] == "download":
                    raise _not_found("Not Found")
                return self._json(200, obj.resource(bucket, gcs.url))
            case ["storage", "v1", "b", bucket, "o", name] if method == "DELETE":
                with gcs._lock:
                    gcs._object(bucket, name, conditions, query.get("generation"))
                    del gcs.buckets[bucket][name]
                return self._send(204)
            case ["storage", "v1", "b", src_bucket, "o", src, "rewriteTo", "b", bucket, "o", name] if method == "POST":
                return self._json(200, self._rewrite(src_bucket, src, bucket, name, query, conditions))
            case ["upload", "storage", "v1", "b", bucket, "o"]:
                return self._upload(method, bucket, query, conditions, body)
        raise _not_found("Not Found")

    def _list(self, bucket: str, query: dict[str, str]) -> dict:
        """One page of ``objects.list``: items and prefixes in name order, at most ``maxResults`` of them together."""
        gcs = self.gcs
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        limit = min(max(int(query.get("maxResults") or 1000), 1), gcs.page_size)
        after = base64.urlsafe_b64decode(query["pageToken"]).decode() if query.get("pageToken") else None
        with gcs._lock:
            objects = sorted(gcs._bucket(bucket).items())
        entries: list[tuple[str, Obj | None]] = []  # (name, object) or (prefix, None), in order, each prefix once
        for name, obj in objects:
            if not name.startswith(prefix):
                continue
            cut = name.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                folder = name[: cut + len(delimiter)]
                if not entries or entries[-1][0] != folder:
                    entries.append((folder, None))
            else:
                entries.append((name, obj))
        if after is not None:
            entries = [e for e in entries if e[0] > after]
        page, rest = entries[:limit], entries[limit:]
        out: dict = {"kind": "storage#objects"}
        items = [obj.resource(bucket, gcs.url) for _, obj in page if obj is not None]
        prefixes = [name for name, obj in page if obj is None]
        if prefixes:
            out["prefixes"] = prefixes
        if items:
            out["items"] = items
        if rest:
            out["nextPageToken"] = base64.urlsafe_b64encode(page[-1][0].encode()).decode()
        return out

    def _media(self, obj: Obj) -> None:
        data, status = obj.data, 200
        headers = [("x-goog-generation", str(obj.generation)), ("x-goog-metageneration", str(obj.metageneration)),
                   ("x-goog-hash", f"crc32c={_crc32c(obj.data)}"), ("x-goog-hash", "md5=" + base64.b64encode(hashlib.md5(obj.data).digest()).decode()),
                   ("x-goog-stored-content-length", str(len(obj.data))), ("x-goog-stored-content-encoding", "identity"),
                   ("x-goog-storage-class", "STANDARD"), ("ETag", obj.etag), ("Accept-Ranges", "bytes")]  # fmt: skip
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes=") :].partition("-")
            size = len(obj.data)
            start, end = (max(size - int(last), 0), size - 1) if first == "" else (int(first), min(int(last), size - 1) if last else size - 1)
            if start >= size or start > end:
                raise GcsError(416, "The requested range cannot be satisfied.", "requestedRangeNotSatisfiable")
            data, status = obj.data[start : end + 1], 206
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
        self._send(status, data, headers, content_type=obj.content_type)

    def _rewrite(self, src_bucket: str, src: str, bucket: str, name: str, query: dict[str, str], conditions: dict[str, str]) -> dict:
        """``objects.rewrite``: ``rewrite_chunk`` bytes per call; the destination is written (its preconditions
        checked) by the call that finishes."""
        gcs = self.gcs
        source_conditions = {k.replace("ifSource", "if", 1): query[k] for k in SOURCE_CONDITIONS if k in query}
        with gcs._lock:
            obj = gcs._object(src_bucket, src, source_conditions, query.get("sourceGeneration"))
            gcs._bucket(bucket)
            done = 0
            if query.get("rewriteToken"):
                token = json.loads(base64.urlsafe_b64decode(query["rewriteToken"]))
                if token["generation"] != obj.generation:
                    raise GcsError(400, "The source object changed during the rewrite.", "invalid")
                done = token["done"]
            done = min(done + gcs.rewrite_chunk, len(obj.data))
            out = {"kind": "storage#rewriteResponse", "totalBytesRewritten": str(done), "objectSize": str(len(obj.data))}
            if done < len(obj.data):
                token = {"generation": obj.generation, "done": done}
                return {**out, "done": False, "rewriteToken": base64.urlsafe_b64encode(json.dumps(token).encode()).decode()}
            new = gcs._write(bucket, name, obj.data, obj.content_type, conditions)
            return {**out, "done": True, "resource": new.resource(bucket, gcs.url)}

    def _upload(self, method: str, bucket: str, query: dict[str, str], conditions: dict[str, str], body: bytes) -> None:
        gcs = self.gcs
        kind = query.get("uploadType", "")
        if "upload_id" in query:
            return self._resumable_chunk(method, query["upload_id"], body)
        if method != "POST":
            raise _not_found("Not Found")
        if kind == "media":
            with gcs._lock:
                obj = gcs._write(bucket, query.get("name", ""), body, self.headers.get("Content-Type", ""), conditions)
            return self._json(200, obj.resource(bucket, gcs.url))
        if kind == "multipart":
            meta, content_type, data = _multipart(self.headers.get("Content-Type", ""), body)
            with gcs._lock:
                obj = gcs._write(bucket, meta.get("name") or query.get("name", ""), data, meta.get("contentType") or content_type, conditions)
            return self._json(200, obj.resource(bucket, gcs.url))
        if kind == "resumable":
            meta = json.loads(body) if body else {}
            name = meta.get("name") or query.get("name", "")
            with gcs._lock:
                gcs._bucket(bucket)
                gcs._check(gcs.buckets[bucket].get(name), conditions)
                upload_id = uuid.uuid4().hex
                gcs.uploads[upload_id] = Upload(bucket, name, meta.get("contentType") or self.headers.get("X-Upload-Content-Type", ""), conditions)
            location = f"{gcs.url}/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=resumable&name={quote(name, safe='')}&upload_id={upload_id}"
            return self._send(200, b"", {"Location": location})
        raise GcsError(400, f"Invalid upload type: {kind!r}", "invalid")

    def _resumable_chunk(self, method: str, upload_id: str, body: bytes) -> None:
        """A chunk of a resumable upload (``Content-Range: bytes a-b/total``, ``bytes */total`` to ask or finish,
        ``bytes a-b/*`` while the size is unknown): 308 with the ``Range`` received (no ``Location``: a client
        would follow it) until the last byte, then the object."""
        gcs = self.gcs
        with gcs._lock:
            up = gcs.uploads.get(upload_id)
            if up is None:
                raise _not_found("No such upload")
            if method == "DELETE":
                del gcs.uploads[upload_id]
                return self._send(499)
            spec = self.headers.get("Content-Range", "").removeprefix("bytes ").strip()
            span, _, total = spec.partition("/")
            if span != "*":
                start = int(span.split("-")[0])
                if start != len(up.data):
                    raise GcsError(400, f"Invalid request. The first byte {start} does not follow the {len(up.data)} received.", "invalid")
                up.data += body
            if total not in ("*", "") and len(up.data) >= int(total):
                del gcs.uploads[upload_id]
                obj = gcs._write(up.bucket, up.name, bytes(up.data), up.content_type, up.conditions)
                return self._json(200, obj.resource(up.bucket, gcs.url))
            headers = {"Range": f"bytes=0-{len(up.data) - 1}"} if up.data else {}
        self._send(308, b"", headers)


def _bucket_resource(name: str) -> dict:
    return {"kind": "storage#bucket", "id": name, "name": name, "metageneration": "1", "location": "US", "storageClass": "STANDARD",
            "locationType": "multi-region"}  # fmt: skip


def _multipart(content_type: str, body: bytes) -> tuple[dict, str, bytes]:
    """(metadata, content type, media) of a ``multipart/related`` upload: a JSON part, then the media. Lines may
    end in CRLF or LF (gcsfs writes LF)."""
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";") if p.strip().startswith("boundary=")), "")
    if not boundary:
        raise GcsError(400, "Missing boundary in multipart upload", "invalid")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk[1:] if chunk.startswith(b"\n") else chunk
        crlf, lf = chunk.find(b"\r\n\r\n"), chunk.find(b"\n\n")  # the headers end at the first empty line
        head, content = (chunk[:crlf], chunk[crlf + 4 :]) if crlf >= 0 and (lf < 0 or crlf < lf) else (chunk[:lf], chunk[lf + 2 :])
        content = content[:-2] if content.endswith(b"\r\n") else content[:-1] if content.endswith(b"\n") else content  # the delimiter's line break
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.decode().splitlines()) if k}
        parts.append((headers, content))
    if len(parts) != 2:
        raise GcsError(400, "A multipart upload needs a metadata part and a media part", "invalid")
    return json.loads(parts[0][1] or b"{}"), parts[1][0].get("content-type", ""), parts[1][1]


# ---------------------------------------------------------------- for the tests


@contextlib.contextmanager
def gcs_server(**kw) -> Iterator[tuple[GcsServer, dict[str, str]]]:
    """Start a server; yields it and the environment that points gcsfs (and so the store) at it."""
    server = GcsServer(**kw)
    server.start()
    try:
        yield server, {"STORAGE_EMULATOR_HOST": server.url}
    finally:
        server.stop()


def new_bucket(server: GcsServer) -> str:
    name = f"dmd-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return name

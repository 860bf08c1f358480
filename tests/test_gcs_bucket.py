"""stages/store/gcs.py's ``GcsBucket`` against tests/gcs_server.py (the GCS JSON API on loopback, reached through
STORAGE_EMULATOR_HOST): generations as versions, conditional writes by ``ifGenerationMatch``, paged listings,
transfers, and ``check``'s refusals. The object store's own cases run on gs:// in tests/test_object_store.py."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

import pytest

from gcs_server import GcsServer, gcs_server, new_bucket
from s3_server import environment

from dmd_core.errors import InputError
from stages.store.bucket import TRANSFERRED
from stages.store.gcs import GcsBucket


@pytest.fixture(scope="module")
def server():
    with gcs_server(page_size=3) as (srv, env), environment(env):  # pages of 3: paging shows with a few objects
        yield srv


@pytest.fixture
def bucket(server) -> tuple[GcsServer, str, GcsBucket]:
    name = new_bucket(server)
    return server, name, GcsBucket(f"gs://{name}/runs")


def requests_during(server: GcsServer, fn) -> tuple[object, list[tuple[str, str]]]:
    before = len(server.requests)
    out = fn()
    return out, server.requests[before:]


def test_conditional_writes_by_generation(bucket):
    server, name, b = bucket
    first, sent = requests_during(server, lambda: b.create("lock", b"one"))
    assert len(sent) == 1 and "ifGenerationMatch=0" in sent[0][1]
    assert first == str(server.generation(name, "runs/lock"))
    assert b.create("lock", b"two") is None  # it exists: 412
    got, sent = requests_during(server, lambda: b.read("lock"))
    assert got == (b"one", first) and len(sent) == 1  # bytes and generation in one request
    assert b.listing("") == {"lock": (3, first)}  # the same version in a listing

    assert b.replace("lock", b"stale", "1") is None
    second = b.replace("lock", b"three", first)
    assert second is not None and int(second) > int(first) and b.read("lock") == (b"three", second)
    assert b.replace("lock", b"again", first) is None  # the version it replaced is stale now
    assert b.replace("absent", b"x", first) is None  # no live object: 412, as GCS answers
    assert server.objects(name) == {"runs/lock": b"three"}

    assert b.delete_if("lock", first) is False and b.read("lock") == (b"three", second)
    assert b.delete_if("lock", second) is True and b.read("lock") is None
    assert b.delete_if("lock", second) is False and b.exists("lock") is False
    assert b.put("plain", b"unconditional") is not None and b.put("plain", b"over it") is not None
    assert server.objects(name) == {"runs/plain": b"over it"}


def test_listings_follow_every_page(bucket):
    server, name, b = bucket
    names = ["a/1", "a/2", "b/x/1", "c", "d/1", "e/1", "e/2", "f"]
    for i, n in enumerate(names):
        server.put(name, f"runs/{n}", b"x" * i)
    server.put(name, "other/a/1", b"outside the prefix")
    got, sent = requests_during(server, lambda: b.listing(""))
    assert got == {n: (i, str(server.generation(name, f"runs/{n}"))) for i, n in enumerate(names)}
    assert len(sent) == 3  # 8 objects, pages of 3
    assert b.listing("e") == {"1": (5, str(server.generation(name, "runs/e/1"))), "2": (6, str(server.generation(name, "runs/e/2")))}
    folders, sent = requests_during(server, lambda: b.folders(""))
    assert folders == ["a", "b", "d", "e"] and len(sent) == 2  # 6 entries (4 folders, 2 objects) in pages of 3
    assert b.folders("b") == ["x"] and b.folders("nothing") == [] and b.listing("nothing") == {}
    assert b.exists("c") and not b.exists("a")  # a folder is no object


def test_transfers(bucket, tmp_path):
    """Uploads (one request up to 5 MiB, resumable above), server-side copies (a rewrite that takes several
    calls), downloads and deletes; the transfer counters count the bytes."""
    server, name, b = bucket
    big, small = os.urandom(6 << 20), b"small file\n"
    (tmp_path / "big").write_bytes(big)
    (tmp_path / "small").write_bytes(small)
    up, down = TRANSFERRED.up, TRANSFERRED.down
    _, sent = requests_during(server, lambda: b.upload([(str(tmp_path / "big"), "p/big"), (str(tmp_path / "small"), "p/sub/small")]))
    assert sum("uploadType=resumable" in path for _, path in sent) == 2  # the big file: started, then its one chunk
    assert server.objects(name) == {"runs/p/big": big, "runs/p/sub/small": small}
    assert TRANSFERRED.up - up == len(big) + len(small)

    _, sent = requests_during(server, lambda: b.copy([("p/big", "f/big"), ("p/sub/small", "f/sub/small")]))
    assert sum("rewriteTo" in path for _, path in sent) == 7  # 6 MiB in 1 MiB rewrite calls, and the small one
    b.download_many([("f/big", str(tmp_path / "got-big")), ("f/sub/small", str(tmp_path / "got" / "small"))])
    assert (tmp_path / "got-big").read_bytes() == big and (tmp_path / "got" / "small").read_bytes() == small
    assert TRANSFERRED.down - down == len(big) + len(small)

    b.delete(["p/big", "p/sub/small", "p/never-there"] + [f"f/{n}" for n in ("big", "sub/small")])
    assert server.objects(name) == {}


def test_check_passes_and_leaves_nothing(bucket):
    server, name, b = bucket
    b.check()
    assert server.objects(name) == {}


def test_check_refuses_a_server_that_ignores_generation_preconditions():
    with gcs_server(honour_preconditions=False) as (srv, env), environment(env):
        name = new_bucket(srv)
        with pytest.raises(InputError) as e:
            GcsBucket(f"gs://{name}/runs").check()
        assert srv.objects(name) == {}  # the probe is deleted
    message = str(e.value)
    assert "\n" not in message
    assert message == (
        f"store 'gs://{name}/runs': the server ignores conditional writes (ifGenerationMatch), so two builders of one output "
        "could not be kept apart. Fix: use a server that honours them (Google Cloud Storage itself, or an emulator that "
        "implements ifGenerationMatch)."
    )


def test_check_refusals_name_the_fix(server, monkeypatch, tmp_path):
    with pytest.raises(InputError) as e:
        GcsBucket("gs://no-such-bucket/runs").check()
    assert str(e.value) == (
        "store 'gs://no-such-bucket/runs' cannot be written: the bucket does not exist. "
        "Fix: create the bucket first (e.g. `gcloud storage buckets create gs://BUCKET`) or fix its name."
    )
    name = new_bucket(server)
    server.forbidden = True
    try:
        with pytest.raises(InputError) as e:
            GcsBucket(f"gs://{name}/runs").check()
    finally:
        server.forbidden = False
    assert str(e.value) == (
        f"store 'gs://{name}/runs' cannot be written: 403 Forbidden: dmd-test@example.iam.gserviceaccount.com does not have "
        "storage.objects.create access to the Google Cloud Storage object. Permission 'storage.objects.create' denied on resource "
        "(or it may not exist). Fix: grant these credentials the Storage Object User role (roles/storage.objectUser) on the bucket."
    )

    # Google Cloud Storage itself (no emulator) with credentials that do not exist: refused before any request
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-key.json"))
    with pytest.raises(InputError, match=r"^store 'gs://b/runs': no Google credentials \(File .*no-key.json was not found.*\)\. "
                                         r"Fix: set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, run `gcloud auth"):  # fmt: skip
        GcsBucket("gs://b/runs")


def test_without_gcsfs_the_fix_is_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs raises ImportError
    monkeypatch.setitem(sys.modules, "gcsfs.core", None)
    with pytest.raises(InputError, match=r"needs gcsfs, which is not installed. Fix: pip install 'dmd-pipeline\[gs\]'"):
        GcsBucket("gs://b/runs")


# ---------------------------------------------------------------- the server's own rules, as GCS's JSON API states them


def call(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_server_answers_as_the_json_api(server):
    name = new_bucket(server)
    o = f"{server.url}/storage/v1/b/{name}/o"
    upload = f"{server.url}/upload/storage/v1/b/{name}/o?uploadType=media&name=a%2Fb"
    status, _, body = call(upload + "&ifGenerationMatch=0", "POST", b"0123456789")
    resource = json.loads(body)
    assert status == 200 and resource["name"] == "a/b" and resource["size"] == "10" and resource["metageneration"] == "1"
    generation = resource["generation"]  # a string, as every int64 of the JSON API
    assert call(upload + "&ifGenerationMatch=0", "POST", b"x")[0] == 412
    status, _, body = call(upload + "&ifGenerationMatch=7", "POST", b"x")
    assert status == 412 and json.loads(body)["error"]["errors"][0]["reason"] == "conditionNotMet"
    assert call(f"{o}/a%2Fb?ifGenerationNotMatch={generation}")[0] == 304
    assert call(f"{o}/a%2Fb?ifMetagenerationMatch=2")[0] == 412

    status, headers, body = call(f"{server.url}/download/storage/v1/b/{name}/o/a%2Fb?alt=media", headers={"Range": "bytes=2-4"})
    assert (status, body, headers["Content-Range"], headers["x-goog-generation"]) == (206, b"234", "bytes 2-4/10", generation)
    status, _, body = call(f"{o}/missing")
    assert status == 404 and json.loads(body)["error"] == {
        "code": 404, "message": f"No such object: {name}/missing",
        "errors": [{"message": f"No such object: {name}/missing", "domain": "global", "reason": "notFound"}],
    }  # fmt: skip
    assert call(f"{o}/missing?ifGenerationMatch=0", "DELETE")[0] == 404  # absent: 404 whatever the preconditions
    assert json.loads(call(f"{server.url}/storage/v1/b/nope/o")[2])["error"]["message"] == "The specified bucket does not exist."
    assert call(f"{o}/a%2Fb?ifGenerationMatch=1", "DELETE")[0] == 412 and server.objects(name) == {"a/b": b"0123456789"}
    assert call(f"{o}/a%2Fb?ifGenerationMatch={generation}", "DELETE")[0] == 204 and server.objects(name) == {}


def test_a_multipart_upload_with_crlf_or_lf_lines(server):
    """gcsfs writes its multipart bodies with LF line ends; Google's clients with CRLF."""
    name = new_bucket(server)
    for i, eol in enumerate((b"\r\n", b"\n")):
        media = b"line one" + eol + b"--not-the-boundary" + eol
        body = eol.join([b"--XyZ", b"Content-Type: application/json; charset=UTF-8", b"", json.dumps({"name": f"m{i}"}).encode(),
                         b"--XyZ", b"Content-Type: text/plain", b"", media, b"--XyZ--"])  # fmt: skip
        url = f"{server.url}/upload/storage/v1/b/{name}/o?uploadType=multipart"
        status, _, out = call(url, "POST", body, {"Content-Type": 'multipart/related; boundary="XyZ"'})
        assert status == 200 and json.loads(out)["contentType"] == "text/plain"
        assert server.objects(name)[f"m{i}"] == media

"""export.promote_if: the expression language (closed cases, refusals), promotion decisions and the promotion
record (contents, atomic updates) on the local store and on moto's S3 server, and ``dmd promoted``."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import run_cli, write_config
from dmd_core.errors import InputError
from stages.contract import DENOISER_FILES, EVALUATE_FILES, Manifest, file_entry
from stages.files import digest_json
from stages.gate import parse
from stages.promotion import current, promote, record_name
from stages.store import LocalStore, open_store

TEACHER = "a" * 64
EXPORT_FILES = ("README.md", "one_step.json", "grid.png", "model_index.json", *(f"generator/{n}" for n in DENOISER_FILES))


# ---------------------------------------------------------------- the expression language


@pytest.mark.parametrize(
    "text, metrics, promoted, expected",
    [
        ("fd_ratio <= 1.1 * promoted", {"fd_ratio": 1.1}, {"fd_ratio": 1.0}, True),  # 1.1 <= 1.1000000000000001
        ("fd_ratio <= 1.1 * promoted", {"fd_ratio": 1.2}, {"fd_ratio": 1.0}, False),
        ("fd_ratio < promoted", {"fd_ratio": 1.0}, {"fd_ratio": 1.0}, False),
        ("fd_ratio <= 1 + 2 * promoted", {"fd_ratio": 3.0}, {"fd_ratio": 1.0}, True),  # * before +: 3 <= 3
        ("fd_ratio <= (1 + 2) * promoted", {"fd_ratio": 3.5}, {"fd_ratio": 1.0}, False),  # 3.5 <= 3
        ("(fd_ratio + 1) / 2 <= promoted", {"fd_ratio": 3.0}, {"fd_ratio": 2.0}, True),
        ("-fd_ratio >= -promoted", {"fd_ratio": 0.5}, {"fd_ratio": 0.6}, True),
        ("fd_ratio - promoted - 1 == -1.5", {"fd_ratio": 0.5}, {"fd_ratio": 1.0}, True),  # left-associative: (0.5-1)-1
        ("speedup / promoted > 2e0", {"speedup": 5.0}, {"speedup": 2.0}, True),
        ("not fd_ratio > 1 or speedup > 10", {"fd_ratio": 2.0, "speedup": 11.0}, {}, True),
        ("not (fd_ratio > 1 or speedup > 10)", {"fd_ratio": 2.0, "speedup": 11.0}, {}, False),
        ("fd_ratio < 1 or speedup > 10 and student_fd < 0", {"fd_ratio": 0.5, "speedup": 1.0, "student_fd": 1.0}, {}, True),  # and binds tighter
        ("(fd_ratio < 1 or speedup > 10) and student_fd < 0", {"fd_ratio": 0.5, "speedup": 1.0, "student_fd": 1.0}, {}, False),
        ("student_class_accuracy >= promoted.student_class_accuracy - 0.02", {"student_class_accuracy": 0.9}, {"student_class_accuracy": 0.91}, True),
        ("fd_ratio <= promoted.fd_ratio and speedup >= promoted", {"fd_ratio": 1.0, "speedup": 4.0}, {"fd_ratio": 1.0, "speedup": 5.0}, False),
        ("((fd_ratio)) <= .5", {"fd_ratio": 0.5}, {}, True),
        ("fd_ratio != 1", {"fd_ratio": 1}, {}, False),
    ],
)
def test_expressions_evaluate_to_their_closed_values(text, metrics, promoted, expected):
    ok, checks = parse(text).check(metrics, promoted)
    assert ok is expected
    assert len(checks) == text.count("<") + text.count(">") + text.count("==") + text.count("!=")  # every comparison shown


def test_a_bare_promoted_is_the_metric_of_its_own_comparison():
    rule = parse("fd_ratio <= 1.1 * promoted and speedup >= 0.5 * promoted")
    assert rule.metrics() == {"fd_ratio", "speedup"}
    ok, checks = rule.check({"fd_ratio": 1.0, "speedup": 4.0}, {"fd_ratio": 1.0, "speedup": 10.0})
    assert not ok
    assert checks == ["fd_ratio (1) <= 1.1 * promoted.fd_ratio (1.1): yes", "speedup (4) >= 0.5 * promoted.speedup (5): no"]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "empty"),
        ("fd_ratio", "expected a comparison"),
        ("fd_ratio <=", "expected a number, a metric or promoted"),
        ("fd_ratio <= 1.1 * promoted)", "unexpected ')'"),
        ("(fd_ratio <= 1", "expected ')'"),
        ("fid < 1", "unknown metric 'fid'"),
        ("promoted.fid > 1", "promoted.fid: no such metric"),
        ("1 < 2 < 3", "chained comparison"),
        ("fd_ratio <= promoted * speedup", "a bare promoted needs exactly one metric"),
        ("promoted > 1", "a bare promoted needs exactly one metric"),
        ("__import__('os').system('true')", "unexpected \"'\" at character 12"),
        ("fd_ratio.__class__ < 1", "expected a comparison"),
        ("fd_ratio ** 2 < 1", "expected a number, a metric or promoted, found '*'"),
        ("fd_ratio < 1e999", "not finite"),
        ("fd_ratio < 1 and", "found 'the end'"),
        ("-" * 40 + "fd_ratio < 1", "nested deeper than 32"),
        ("fd_ratio < 1 or " * 40 + "fd_ratio < 1", "longer than 500 characters"),
    ],
)
def test_malformed_expressions_are_refused_in_one_line_naming_the_fix(text, problem):
    with pytest.raises(InputError) as e:
        parse(text)
    msg = str(e.value)
    assert problem in msg and "Fix: " in msg and "\n" not in msg


def test_the_config_refuses_a_malformed_gate_up_front(tmp_path):
    from stages.config import load_config

    with pytest.raises(InputError) as e:
        load_config(None, ["export.promote_if=fd_ratio <= 1.1 * promotd"])
    assert "export.promote_if: unknown metric 'promotd'" in str(e.value) and "Fix: " in str(e.value)
    with pytest.raises(InputError, match="export.pipeline"):
        load_config(None, ["export.pipeline=../x"])
    cfg = load_config(None, ["export.promote_if=fd_ratio <= 1.1 * promoted", "export.on_not_promoted=fail"])
    assert cfg.export.promote_if == "fd_ratio <= 1.1 * promoted" and cfg.export.on_not_promoted == "fail"


@pytest.mark.parametrize(
    "config, sets, refused",
    [
        (None, ["export.promote_if=student_clip_score >= promoted"], "student_clip_score"),
        (None, ["export.promote_if=fd_ratio <= promoted and promoted.teacher_clip_score > 0"], "teacher_clip_score"),
        ("data/digits-t2i.yaml", ["export.promote_if=student_class_accuracy >= promoted", "evaluate.prompt_labels=null"], "student_class_accuracy"),
        (None, ["export.promote_if=fd_ratio <= 1.1 * promoted and student_class_accuracy >= 0.9"], None),
        ("data/digits-t2i.yaml", ["export.promote_if=student_class_accuracy >= promoted"], None),
    ],
)
def test_a_gate_on_a_metric_evaluate_does_not_measure_is_refused_up_front(config, sets, refused):
    import stages.export
    from stages.config import load_config
    from stages.chain import resolve_teacher

    cfg = load_config(config, sets)
    if refused is None:
        stages.export.check(cfg, resolve_teacher(cfg))
        return
    with pytest.raises(InputError) as e:
        stages.export.check(cfg, resolve_teacher(cfg))
    msg = str(e.value)
    assert f"export.promote_if reads {refused}," in msg and "Fix: set evaluate." in msg and "\n" not in msg


def test_dmd_refuses_an_unmeasurable_gate_before_any_stage_runs(tmp_path):
    store = tmp_path / "store"
    proc = run_cli("export", "--set", f"store={store}", "--set", "export.promote_if=student_clip_score >= promoted", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: export.promote_if reads student_clip_score" in proc.stderr and "evaluate.clip_model" in proc.stderr
    assert not any((store / stage).exists() for stage in ("generate", "distill", "evaluate", "export"))


def test_the_gate_settings_do_not_change_the_export_key():
    from stages.config import load_config
    from stages.contract import spec

    plain = load_config(None, [])
    gated = load_config(None, ["export.promote_if=fd_ratio <= promoted", "export.pipeline=nightly", "export.on_not_promoted=fail"])
    assert spec("export").key(plain, {"evaluate": "x"}) == spec("export").key(gated, {"evaluate": "x"})


# ---------------------------------------------------------------- decisions and the record


def _output(store, stage: str, key: str, files: dict[str, bytes], info: dict, upstream: dict) -> Path:
    out = store.output_dir(stage, key)
    work = store.partial_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    m = Manifest(stage=stage, key=key, code_version=f"{stage}/1", config={}, pipeline_config={"run": key}, upstream=upstream,
                 files=[file_entry(work / n, name=n) for n in files], info=info, wall_time_s=1.0)  # fmt: skip
    store.save_manifest(m, work)
    store.publish(work, out)
    return out


def run_outputs(store, n: int, fd_ratio: float, speedup: float = 10.0, teacher: str = TEACHER) -> tuple[Path, Path]:
    """A distill, evaluate and export output of run ``n`` in ``store``: (evaluate dir, export dir)."""
    d = _output(store, "distill", f"distill{n}", {"g.bin": b"g%d" % n}, {"steps": 100 * n}, {"pairs": "p" * 64, "teacher": teacher})
    dm = store.read_manifest(d)
    metrics = {"fd_ratio": fd_ratio, "speedup": speedup, "student_fd": 2 * fd_ratio, "teacher_fd": 2.0, "student_class_accuracy": None, "features": "digits"}
    e = _output(store, "evaluate", f"evaluate{n}", {f: b"e%d" % n for f in EVALUATE_FILES}, {"metrics": metrics, "distill_dir": str(d)}, {"distill": dm.digest, "teacher": teacher})
    x = _output(store, "export", f"export{n}", {f: b"x%d" % n for f in EXPORT_FILES}, {"teacher_digest": teacher}, {"evaluate": store.read_manifest(e).digest})
    return e, x


def test_first_promotes_a_worse_second_does_not_a_better_third_replaces(tmp_path):
    store = LocalStore(tmp_path / "store")
    rule = "fd_ratio <= 1.1 * promoted"
    name = record_name("nightly", TEACHER)
    e1, x1 = run_outputs(store, 1, fd_ratio=1.0)
    d1 = promote(store, "nightly", rule, e1, x1, now=1000.0)
    assert d1.promoted and d1.previous is None and "first export" in d1.reason
    first = store.read_record(name)
    assert current(store, "nightly", TEACHER)["export_key"] == "export1"

    e2, x2 = run_outputs(store, 2, fd_ratio=1.2)  # 1.2 > 1.1 * 1.0
    d2 = promote(store, "nightly", rule, e2, x2, now=2000.0)
    assert not d2.promoted and "fails, not promoted" in d2.reason
    assert d2.checks == ["fd_ratio (1.2) <= 1.1 * promoted.fd_ratio (1.1): no"]
    assert store.read_record(name) == first  # byte for byte: the first stays promoted
    assert (x2 / "README.md").read_bytes() == b"x2"  # the failing export is kept

    e3, x3 = run_outputs(store, 3, fd_ratio=0.9)
    d3 = promote(store, "nightly", rule, e3, x3, now=3000.0)
    assert d3.promoted and d3.previous["export_key"] == "export1"
    rec = current(store, "nightly", TEACHER)
    assert rec["export_key"] == "export3" and rec["replaced"] == "export1" and rec["promoted_unix"] == 3000.0

    again = store.read_record(name)
    d4 = promote(store, "nightly", rule, e3, x3, now=4000.0)  # a cached rerun of the promoted export
    assert d4.promoted and d4.reason == "already the promoted export" and store.read_record(name) == again
    assert current(store, "other", TEACHER) is None  # another pipeline has its own record


def test_null_gate_always_promotes(tmp_path):
    store = LocalStore(tmp_path / "store")
    for n, ratio in ((1, 1.0), (2, 5.0)):
        e, x = run_outputs(store, n, fd_ratio=ratio)
        assert promote(store, "default", None, e, x).promoted
    assert current(store, "default", TEACHER)["export_key"] == "export2"


def test_the_record_holds_metrics_and_lineage(tmp_path):
    store = LocalStore(tmp_path / "store")
    e, x = run_outputs(store, 1, fd_ratio=0.75, speedup=12.5)
    promote(store, "nightly", "fd_ratio < 2 * promoted", e, x, now=1234.5)
    rec = json.loads((tmp_path / "store" / "records" / record_name("nightly", TEACHER)).read_text())
    xm, em, dm = (store.read_manifest(p) for p in (x, e, tmp_path / "store" / "distill" / "distill1"))
    assert rec == {
        "pipeline": "nightly", "export": str(x), "export_key": "export1", "export_digest": xm.digest, "teacher_digest": TEACHER,
        "pairs_digest": "p" * 64, "distill_key": "distill1", "generator_digest": dm.digest, "evaluate_key": "evaluate1",
        "config_digest": digest_json({"run": "export1"}), "metrics": {"fd_ratio": 0.75, "speedup": 12.5, "student_fd": 1.5, "teacher_fd": 2.0},
        "promote_if": "fd_ratio < 2 * promoted", "promoted_unix": 1234.5, "replaced": None,
    }  # fmt: skip
    assert em.upstream["distill"] == rec["generator_digest"]


def test_a_metric_this_run_lacks_is_named(tmp_path):
    store = LocalStore(tmp_path / "store")
    for n in (1, 2):
        e, x = run_outputs(store, n, fd_ratio=1.0)
        if n == 1:
            promote(store, "default", None, e, x)
    with pytest.raises(InputError, match="student_class_accuracy, which this run has no finite value for"):
        promote(store, "default", "student_class_accuracy >= promoted", e, x)


def test_a_failed_write_leaves_the_old_record_whole_and_no_partial_file(tmp_path, monkeypatch):
    """The record is written to a hidden temporary sibling and renamed: a write that fails (a full disk, here
    from the fault point between the write and the rename) leaves the previous record, byte for byte."""
    store = LocalStore(tmp_path / "store")
    name = record_name("default", TEACHER)
    final = tmp_path / "store" / "records" / name
    e1, x1 = run_outputs(store, 1, fd_ratio=1.0)
    monkeypatch.setenv("DMD_FAULT", f"write/{final.name}:1:enospc")
    with pytest.raises(OSError):
        promote(store, "default", None, e1, x1)
    assert not final.exists() and store.read_record(name) is None  # no half-written record under the final name
    monkeypatch.delenv("DMD_FAULT")
    promote(store, "default", None, e1, x1)
    before = final.read_bytes()
    e2, x2 = run_outputs(store, 2, fd_ratio=0.5)
    monkeypatch.setenv("DMD_FAULT", f"write/{final.name}:2:enospc")  # the counter is per process: the 2nd write from here
    with pytest.raises(OSError):
        promote(store, "default", None, e2, x2)
    assert final.read_bytes() == before
    assert sorted(p.name for p in final.parent.iterdir()) == [f".{final.name}.lock", final.name]  # no temporary file left


def _count(store, name: str, times: int) -> None:
    for _ in range(times):
        store.update_record(name, lambda old: str(int(old or b"0") + 1).encode())


def test_concurrent_updates_lose_nothing_on_the_local_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    threads = [threading.Thread(target=_count, args=(LocalStore(tmp_path / "store"), "counter/n", 25)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.read_record("counter/n") == b"100"
    assert store.record_names("counter") == ["n"]


@pytest.mark.parametrize("name", ["../x", ".hidden", "a//b", "/abs", "a/.b"])
def test_record_names_are_plain(tmp_path, name):
    with pytest.raises(InputError, match="not a plain relative path"):
        LocalStore(tmp_path).read_record(name)


# ---------------------------------------------------------------- on moto's S3 server


@pytest.fixture(scope="module")
def s3():
    from s3_server import environment, s3_server

    with s3_server() as env, environment(env):
        yield env


def test_promotion_on_the_object_store(s3, tmp_path, monkeypatch):
    from s3_server import new_bucket, objects

    from stages.store.object import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    bucket = new_bucket()
    store = open_store(f"s3://{bucket}/runs")
    rule = "fd_ratio <= 1.1 * promoted"
    e1, x1 = run_outputs(store, 1, fd_ratio=1.0)
    assert promote(store, "nightly", rule, e1, x1).promoted
    key = f"runs/records/{record_name('nightly', TEACHER)}"
    first = objects(bucket)[key]
    e2, x2 = run_outputs(store, 2, fd_ratio=1.5)
    assert not promote(store, "nightly", rule, e2, x2).promoted
    assert objects(bucket)[key] == first
    e3, x3 = run_outputs(store, 3, fd_ratio=0.5)
    assert promote(store, "nightly", rule, e3, x3).promoted
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache2"))  # another machine reads the same record
    rec = current(open_store(f"s3://{bucket}/runs"), "nightly", TEACHER)
    assert rec["export_key"] == "export3" and rec["replaced"] == "export1" and json.loads(objects(bucket)[key]) == rec


def test_a_lost_conditional_write_reads_again_on_the_object_store(s3, tmp_path, monkeypatch):
    """Another writer changes the record between this update's read and its write: the conditional PUT
    (If-Match / If-None-Match) fails, and the update runs again on the other's record; nothing is lost."""
    from s3_server import new_bucket

    from stages.store.object import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    url = f"s3://{new_bucket()}/p"
    store, other = open_store(url), open_store(url)
    seen = []

    def change(old):
        seen.append(old)
        if len(seen) == 1:
            other.update_record("counter/n", lambda o: b"10")  # the other writer gets in first (a create)
        if len(seen) == 2:
            other.update_record("counter/n", lambda o: b"20")  # and again (a replace)
        return str(int(old or b"0") + 1).encode()

    assert store.update_record("counter/n", change) == b"21"
    assert seen == [None, b"10", b"20"] and store.read_record("counter/n") == b"21"
    store.add_record("history/x/1.json", b"{}")
    with pytest.raises(InputError, match="already exists"):
        store.add_record("history/x/1.json", b"{}")
    assert store.record_names("history/x") == ["1.json"] and store.record_names("history/none") == []


# ---------------------------------------------------------------- dmd promoted


def test_dmd_promoted_prints_the_promoted_export_or_exits_1(tmp_path, edm_teacher):
    from stages.chain import resolve_teacher
    from stages.config import load_config

    cfg_file = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store")
    cfg_file.write_text(cfg_file.read_text() + "export:\n  pipeline: nightly\n")
    none = run_cli("promoted", "--config", str(cfg_file), check=False)
    assert none.returncode == 1 and none.stdout == ""
    assert "no promoted export of the teacher" in none.stderr and "'nightly'" in none.stderr and "Fix: dmd run" in none.stderr

    cfg = load_config(cfg_file, [])
    store = open_store(cfg.store)
    teacher = resolve_teacher(cfg).digest
    e, x = run_outputs(store, 1, fd_ratio=0.8125, teacher=teacher)
    promote(store, "nightly", None, e, x, now=0.0)
    from typer.testing import CliRunner

    from stages.cli import app

    def dmd(*args: str):  # in this process: a subprocess per call costs seconds of imports
        return CliRunner().invoke(app, ["promoted", "--config", str(cfg_file), *args])

    shown = dmd()
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0] == f"promoted export: {x}"
    assert lines[1] == "  pipeline nightly, promoted 1970-01-01 00:00:00 UTC"
    assert "fd_ratio 0.8125" in lines[2] and lines[3] == f"  teacher {teacher}"
    assert json.loads(dmd("--json").stdout) == current(store, "nightly", teacher)
    assert dmd("--set", "export.pipeline=other").exit_code == 1
    bad = dmd("--set", "export.promote_if=fd_ratio <")
    assert bad.exit_code == 2 and "export.promote_if" in bad.stderr and "Fix: " in bad.stderr


# ---------------------------------------------------------------- in the flow, against a real Prefect server


@pytest.mark.slow
def test_flow_runs_a_worse_second_run_is_not_promoted_and_says_why(tmp_path, edm_teacher):
    """Two flow runs of one pipeline: the first is promoted; the second, held to a gate it cannot pass, ends
    Completed named "Not promoted" (or Failed, so named, with on_not_promoted=fail), its dmd-promotion artifact
    says why, the first stays promoted, and dmd-trends plots both runs from the store's history."""
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.exceptions import FailedRun
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import dmd_pipeline
    from stages import history
    from stages.chain import resolve_teacher
    from stages.config import load_config

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    cfg_file = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", distill={})
    cfg_file.write_text(cfg_file.read_text() + (
        "evaluate:\n  num_samples: 100\n  batch_size: 50\n  features: digits\n"
        f"  classifier: {Path(__file__).resolve().parents[1] / 'data' / 'classifier'}\n  speed_batch_size: 8\n  speed_repeats: 1\n  num_threads: 1\n"
        "export:\n  onnx: false\n  pipeline: nightly\n"
    ))  # fmt: skip
    never = "fd_ratio < promoted - 1000"  # a second run held to this is not promoted, whatever its quality
    with prefect_test_harness(server_startup_timeout=600):
        first = dmd_pipeline(config=str(cfg_file), overrides=[f"export.promote_if={never}"])
        assert first["promotion"] == {"promoted": True, "reason": "first export of this teacher and pipeline: promoted"}
        state = dmd_pipeline(config=str(cfg_file), overrides=[f"export.promote_if={never}", "distill.steps=2"], return_state=True)
        assert state.type.value == "COMPLETED" and state.name == "Not promoted" and "fails, not promoted" in state.message
        second = state.result()
        assert second["promotion"]["promoted"] is False and second["outputs"]["export"] != first["outputs"]["export"]
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[second["flow_run_id"]])))
        by_key = {a.key: a for a in arts}
        md = by_key["dmd-promotion"].data
        assert md.startswith("## Not promoted") and "- fd\\_ratio (" in md and ": no" in md and "| fd_ratio |" in md  # text escaped as markdown
        assert "## Last 2 run(s) of pipeline nightly" in by_key["dmd-trends"].data and "data:image/png;base64," in by_key["dmd-trends"].data
        run_rows = {r["metric"]: r["value"] for r in (by_key["dmd-run"].data if isinstance(by_key["dmd-run"].data, list) else json.loads(by_key["dmd-run"].data))}
        assert run_rows["promoted"] == "no" and run_rows["generate_cache"] == "hit" and run_rows["distill_cache"] == "miss"
        with pytest.raises(FailedRun, match="fails, not promoted"):
            dmd_pipeline(config=str(cfg_file), overrides=[f"export.promote_if={never}", "distill.steps=3", "export.on_not_promoted=fail"])
    cfg = load_config(cfg_file, [])
    store = open_store(cfg.store)
    teacher = resolve_teacher(cfg).digest
    assert current(store, "nightly", teacher)["export"] == first["outputs"]["export"]  # the first stays promoted
    runs = history.last(store, "nightly", teacher, 10)
    assert [r["promoted"] for r in runs] == [True, False, False] and [r["flow_run_id"] for r in runs[:2]] == [first["flow_run_id"], second["flow_run_id"]]

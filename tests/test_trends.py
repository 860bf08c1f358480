"""Run history in the store and the trend dashboards: records appended and read back bounded to the last N,
the per-run table, and the trend plot's points."""

from __future__ import annotations

import base64
import io
import json
import math

import pytest

from dmd_core.errors import InputError
from stages import history
from stages.contract import ORDER
from stages.store import LocalStore

TEACHER = "b" * 64


def record(i: int, promoted: bool | None = None, cached: bool = False) -> dict:
    stages = {s: {"cache": "hit" if cached else "miss", "wall_s": 10.0 * (k + 1) + i, "compute_h": 0.0 if cached else 0.001 * (k + 1)} for k, s in enumerate(ORDER)}
    return {"flow_run_id": f"run{i}", "export_key": f"x{i}", "promoted": promoted, "device": "CPU", "stages": stages,
            "metrics": {"fd_ratio": 1.0 + i / 10, "student_fd": 2.0, "student_class_accuracy": 0.9, "speedup": 20.0 + i}}  # fmt: skip


class CountingStore(LocalStore):
    """A local store that counts the records it reads."""

    reads = 0

    def read_record(self, name: str):
        self.reads += 1
        return super().read_record(name)


def test_history_reads_only_the_last_n_records_oldest_first(tmp_path):
    store = CountingStore(tmp_path / "store")
    for i in range(40):
        history.append(store, "nightly", TEACHER, record(i), now=1_000_000.0 + 60 * i, run_id=f"{i:032x}")
    history.append(store, "other", TEACHER, record(99), now=2_000_000.0)
    store.reads = 0
    got = history.last(store, "nightly", TEACHER, 7)
    assert store.reads == 7  # memory and reads bounded by N, whatever the history's length
    assert [r["flow_run_id"] for r in got] == [f"run{i}" for i in range(33, 40)]
    assert [r["unix"] for r in got] == [1_000_000.0 + 60 * i for i in range(33, 40)]
    assert len(history.last(store, "nightly", TEACHER, 100)) == 40 and len(history.last(store, "other", TEACHER, 5)) == 1
    assert history.last(store, "nightly", "c" * 64, 5) == []
    with pytest.raises(InputError, match="Fix: a number from 1 to"):
        history.last(store, "nightly", TEACHER, 0)


def test_history_names_sort_by_time_and_skip_unreadable_records(tmp_path):
    store = LocalStore(tmp_path / "store")
    # within one second, and across a year boundary: the name order is the time order
    times = [1_767_225_599.999999, 1_767_225_599.5, 1_767_225_600.000001]
    for k, t in enumerate(times):
        history.append(store, "p", TEACHER, {"k": k}, now=t)
    assert [r["k"] for r in history.last(store, "p", TEACHER, 3)] == [1, 0, 2]
    top = history.folder("p", TEACHER)
    store.add_record(f"{top}/99999999T999999.999999Z-broken.json", b"{not json")
    assert [r["k"] for r in history.last(store, "p", TEACHER, 3)] == [0, 2]  # the broken one is the newest name, skipped


def test_run_record_and_table(tmp_path):
    from flows.trends import run_record, run_table
    from stages.config import load_config

    cfg = load_config(None, [f"store={tmp_path}", "generate.num_threads=2", "distill.num_threads=2", "evaluate.num_threads=2"])
    results = {s: {"manifest": {"wall_time_s": 3600.0, "key": f"{s}-key", "info": {}}} for s in ORDER}
    results["evaluate"]["manifest"]["info"]["metrics"] = {"fd_ratio": 1.25, "student_fd": 2.5, "student_class_accuracy": 0.875, "speedup": 30.0}
    cache = {"generate": "hit", "distill": "store", "evaluate": "miss", "export": "miss"}
    seconds = {s: 1.0 + k for k, s in enumerate(ORDER)}
    rec = run_record(cfg, results, cache, seconds, {"promoted": False}, num_processes=2, gpu=True, flow_run_id="r")
    assert rec["promoted"] is False and rec["device"] == "GPU" and rec["export_key"] == "export-key"
    # GPU-hours: an hour's wall time on 2 processes for evaluate (multi-process), on 1 for export; cached stages spent nothing
    assert {s: v["compute_h"] for s, v in rec["stages"].items()} == {"generate": 0.0, "distill": 0.0, "evaluate": 2.0, "export": 1.0}
    cpu = run_record(cfg, results, cache, seconds, None, num_processes=1, gpu=False, flow_run_id="r")
    assert cpu["stages"]["evaluate"]["compute_h"] == min(2, __import__("os").cpu_count())  # evaluate.num_threads cores for an hour
    table = {r["metric"]: r["value"] for r in run_table(rec)}
    assert table["fd_ratio"] == 1.25 and table["student_class_accuracy"] == 0.875 and table["speedup"] == 30.0
    assert table["promoted"] == "no" and table["generate_cache"] == "hit" and table["cache_hits"] == 2
    assert table["evaluate_compute"] == "2.0000 GPU-h" and table["total_compute"] == "3.0000 GPU-h" and table["export_wall_time_s"] == 4.0


def test_trend_plot_has_one_point_per_run(tmp_path):
    from PIL import Image

    from flows.trends import trend_figure, trend_markdown, trend_png, trend_series

    store = LocalStore(tmp_path / "store")
    for i in range(12):
        history.append(store, "nightly", TEACHER, record(i, promoted=i in (0, 5), cached=i % 3 == 2), now=1_000_000.0 + 3600 * i)
    records = history.last(store, "nightly", TEACHER, 9)
    s = trend_series(records)
    assert s["fd_ratio"] == pytest.approx([1.0 + i / 10 for i in range(3, 12)])
    assert s["cache_hits"] == [4.0 if i % 3 == 2 else 0.0 for i in range(3, 12)]
    assert s["compute_h"] == pytest.approx([0.0 if i % 3 == 2 else 0.010 for i in range(3, 12)])
    fig = trend_figure(records)
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 3 + len(ORDER) + 2 and all(len(line.get_xdata()) == 9 for line in lines)
    stars = fig.axes[0].collections[0].get_offsets()
    assert [tuple(p) for p in stars] == [(3.0, pytest.approx(1.5))]  # run 5 is the 3rd of the last 9; run 0 is older
    png = trend_png(records)
    assert Image.open(io.BytesIO(png)).size == (1400, 640)
    md = trend_markdown("nightly", records, png, rows=4)
    embedded = md.split("data:image/png;base64,")[1].split(")")[0]
    assert base64.b64decode(embedded) == png
    table = [line for line in md.splitlines() if line.startswith("| 1970")]
    assert len(table) == 4 and "| 2.100 |" in table[0] and "| 0.0000 CPU-h | 4/4 | **no** |" in table[0]  # newest first: run 11, cached


def test_a_record_missing_values_plots_as_gaps(tmp_path):
    from flows.trends import trend_figure, trend_series

    records = [record(0), {"unix": 5.0, "stages": {}, "metrics": {"fd_ratio": None}}, record(2)]
    s = trend_series(records)
    assert math.isnan(s["fd_ratio"][1]) and s["cache_hits"][1] == 0.0
    assert all(len(line.get_xdata()) == 3 for ax in trend_figure(records).axes for line in ax.get_lines())
    json.dumps(records)  # records stay plain JSON

"""A full disk: a small tmpfs as the store. The run stops with one clear error, leaves no temporary file
holding space and nothing under a final name; once there is room, the rerun resumes to the exact output."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from common import dmd_forked, leftovers, product_files
from test_kill import pipeline  # noqa: F401


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount point (root and mount(8) needed, as on the project's machines; else skipped)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size: str, remount: bool = False) -> None:
        opts = f"{'remount,' if remount else ''}size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the full-disk cases need root")

    yield mnt, mount
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _used(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_generate_on_a_full_disk_then_resumes(pipeline, small_disk, tmp_path, monkeypatch):  # noqa: F811
    """The up-front room check passes; then another writer takes what is left of the disk while shard 1 is
    being written (the forked run inherits the patch): the run stops with one line, keeps shard 0, and
    resumes to the uninterrupted output once there is room again."""
    import stages.generate

    mnt, mount = small_disk
    mount("8m")
    store, filler = mnt / "store", mnt / "filler"
    sets = ["--set", "generate.num_samples=400"]
    reached: list[str] = []

    def fill_the_disk_at_the_second_shard(name: str) -> None:
        reached.append(name)
        if name == "generate.shard-written" and reached.count(name) == 2:
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()

    monkeypatch.setattr(stages.generate, "fault_point", fill_the_disk_at_the_second_shard)
    code = dmd_forked(pipeline.args("generate", store, *sets), tmp_path / "full.log")
    monkeypatch.undo()
    log = (tmp_path / "full.log").read_text()
    assert code == 2 and "Traceback" not in log, log[-3000:]
    assert [line for line in log.splitlines() if line.startswith("error:")][0].startswith("error: disk full"), log[-2000:]
    assert leftovers(store) == [s for s in leftovers(store) if s.endswith(".partial")], leftovers(store)  # no temporary files
    assert not [p for p in (store / "generate").iterdir() if not p.name.startswith(".")]
    kept = len(list((store / "generate").glob(".*.partial/pairs-*.tar")))
    assert kept > 0  # finished shards are kept for the rerun

    filler.unlink()
    assert dmd_forked(pipeline.args("generate", store, *sets), tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    ref_store = tmp_path / "ref"
    assert dmd_forked(pipeline.args("generate", ref_store, *sets), tmp_path / "ref.log") == 0
    assert product_files(pipeline.output("generate", store)) == product_files(pipeline.output("generate", ref_store))
    assert leftovers(store) == []


def test_generate_that_cannot_fit_is_refused_before_it_writes(pipeline, small_disk, tmp_path):  # noqa: F811
    """On a disk smaller than the pairs (counted as written: tar headers and padding included), nothing is written."""
    mnt, mount = small_disk
    mount("400k")
    store = mnt / "store"
    code = dmd_forked(pipeline.args("generate", store, "--set", "generate.num_samples=400"), tmp_path / "log")
    log = (tmp_path / "log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in log, log[-2000:]
    assert errors[0].startswith("error: generate.num_samples=400 needs ") and " MiB of pairs; the store's disk has " in errors[0], errors[0]
    assert not list((store / "generate").glob("*/pairs-*.tar")) and not list((store / "generate").glob(".*.partial/pairs-*.tar"))


@pytest.mark.faults_full
def test_distill_checkpoint_on_a_full_disk_then_resumes(pipeline, small_disk, tmp_path):  # noqa: F811
    mnt, mount = small_disk
    mount("1m")
    store = pipeline.store_before("distill", mnt / "store")
    code = dmd_forked(pipeline.args("distill", store), tmp_path / "full.log")
    log = (tmp_path / "full.log").read_text()
    assert code == 2 and "Traceback" not in log, log[-3000:]
    assert "error: disk full" in log, log[-2000:]
    assert not [s for s in leftovers(store) if ".tmp" in s], leftovers(store)
    mount("32m", remount=True)
    assert dmd_forked(pipeline.args("distill", store), tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert product_files(pipeline.output("distill", store)) == product_files(pipeline.output("distill"))
    assert leftovers(store) == []

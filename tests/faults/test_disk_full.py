"""A full disk: a small tmpfs as the store. The run stops with one clear error, leaves no temporary file
holding space and nothing under a final name; once there is room, the rerun resumes to the exact output."""

from __future__ import annotations

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


def test_generate_on_a_full_disk_then_resumes(pipeline, small_disk, tmp_path):  # noqa: F811
    mnt, mount = small_disk
    mount("400k")
    store = mnt / "store"
    sets = ["--set", "generate.num_samples=400"]
    code = dmd_forked(pipeline.args("generate", store, *sets), tmp_path / "full.log")
    log = (tmp_path / "full.log").read_text()
    assert code == 2 and "Traceback" not in log, log[-3000:]
    assert [line for line in log.splitlines() if line.startswith("error:")][0].startswith("error: disk full"), log[-2000:]
    assert leftovers(store) == [s for s in leftovers(store) if s.endswith(".partial")], leftovers(store)  # no temporary files
    assert not [p for p in (store / "generate").iterdir() if not p.name.startswith(".")]
    kept = len(list((store / "generate").glob(".*.partial/pairs-*.tar")))
    assert kept > 0  # finished shards are kept for the rerun

    mount("8m", remount=True)
    assert dmd_forked(pipeline.args("generate", store, *sets), tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    ref_store = tmp_path / "ref"
    assert dmd_forked(pipeline.args("generate", ref_store, *sets), tmp_path / "ref.log") == 0
    assert product_files(pipeline.output("generate", store)) == product_files(pipeline.output("generate", ref_store))
    assert leftovers(store) == []


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

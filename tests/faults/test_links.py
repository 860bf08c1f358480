"""Symbolic links in the store, met by the store's own calls: every output, partial build, lock file,
verification record, ``.digests/``, side cache and scratch folder is reached through a path with no link
below the root, or refused (InputError naming the link and the fix). A directory outside the store that a
link points to is byte for byte unchanged afterwards, whatever it holds (a manifest, temporary-looking
names of dead processes, checkpoint-like folders). The root itself may be a link: the user's choice.

The store does not know stages apart (an output is a directory and a manifest), so each case builds a
tiny output of a stage's name with a stand-in build: milliseconds, no model.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from bad_input.refusal import snapshot

from dmd_core.errors import InputError
from stages.contract import MANIFEST, Manifest, file_entry
from stages.store import LocalStore
from stages.store.local import RECORD

DEAD_PID = 4_000_000  # above Linux's pid_max: never a live process


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory outside the store holding what a store would delete or overwrite if it followed a link there."""
    d = tmp_path / "outside"
    (d / "checkpoints" / "step-0000001").mkdir(parents=True)
    (d / "checkpoints" / "step-0000001" / "weights.bin").write_bytes(b"someone else's checkpoint")
    (d / MANIFEST).write_text('{"not": "the store\'s"}')
    (d / f".notes.tmp-{DEAD_PID}").write_text("named like a dead writer's temporary file")
    (d / ".cache.tmp").write_text("named like a temporary file")
    (d / "weights.bin").write_bytes(b"w" * 64)
    return d


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def manifest(stage: str, key: str, work: Path, names: list[str]) -> Manifest:
    return Manifest(stage=stage, key=key, code_version="t", config={}, pipeline_config={}, upstream={},
                    files=[file_entry(work / n) for n in names], wall_time_s=0.0, created_unix=time.time())  # fmt: skip


def tiny_build(store: LocalStore, stage: str, key: str):
    """A stand-in for a stage's build: resumes from the work directory like distill does (its old
    checkpoints rotated out), writes one file and the manifest."""

    def build(work: Path) -> Manifest:
        for old in sorted((work / "checkpoints").glob("step-*")):
            shutil.rmtree(old)
        (work / "weights.bin").write_bytes(b"w" * 64)
        m = manifest(stage, key, work, ["weights.bin"])
        store.save_manifest(m, work)
        return m

    return build


def built(store: LocalStore, kind: str, key: str) -> Path:
    """A complete, verified output of a side-cache kind (no contract beyond its manifest)."""
    out = store.side_dir(kind, key)
    store.reuse_or_build(kind, out, "config: {}\n", tiny_build(store, kind, key))
    assert store.verified(out) is not None
    return out


def refused(call, *needles: str) -> str:
    with pytest.raises(InputError) as e:
        call()
    text = str(e.value)
    assert "Fix:" in text and "\n" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    return text


def unchanged(outside: Path, before: dict[str, str]) -> None:
    assert snapshot(outside) == before, "a directory outside the store was changed through a link"


# ---------------------------------------------------------------- outputs and stage directories


@pytest.mark.parametrize("stage", ["generate", "distill", "evaluate", "export"])
def test_an_output_that_is_a_link_is_refused_and_its_target_untouched(store, outside, stage):
    out = store.path / stage / "k1"
    out.parent.mkdir(parents=True)
    out.symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    refused(lambda: store.reuse_or_build(stage, out, "c\n", tiny_build(store, stage, "k1")), "symbolic link", "k1", "Fix: remove the link")
    unchanged(outside, before)
    assert not (store.path / stage / ".k1.partial").exists()


def test_a_stage_directory_that_is_a_link_is_refused_when_handed_out(store, outside):
    store.path.mkdir()
    (store.path / "distill").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    refused(lambda: store.output_dir("distill", "k1"), "distill", "symbolic link")
    refused(store.check_writable, "distill", "symbolic link")
    unchanged(outside, before)


def test_a_partial_build_that_is_a_link_is_neither_cleaned_nor_built_in(store, outside):
    out = store.output_dir("evaluate", "k1")
    out.parent.mkdir(parents=True)
    store.partial_dir(out).symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    refused(lambda: store.reuse_or_build("evaluate", out, "c\n", tiny_build(store, "evaluate", "k1")), ".k1.partial", "symbolic link")
    refused(lambda: store.clean(store.path / "evaluate" / ".k1.partial"), ".k1.partial")
    unchanged(outside, before)


def test_a_link_inside_a_partial_build_is_not_resumed_through(store, outside):
    """distill's checkpoints folder, inside the partial build, is a link: rotating old checkpoints out
    would delete the other directory's."""
    out = store.output_dir("distill", "k1")
    work = store.partial_dir(out)
    work.mkdir(parents=True)
    (work / "checkpoints").symlink_to(outside / "checkpoints", target_is_directory=True)
    before = snapshot(outside)
    refused(lambda: store.reuse_or_build("distill", out, "c\n", tiny_build(store, "distill", "k1")), "checkpoints", "symbolic link")
    unchanged(outside, before)


def test_a_dangling_link_as_the_partial_build_is_refused(store, tmp_path):
    out = store.output_dir("generate", "k1")
    out.parent.mkdir(parents=True)
    store.partial_dir(out).symlink_to(tmp_path / "nowhere" / "new", target_is_directory=True)
    refused(lambda: store.reuse_or_build("generate", out, "c\n", tiny_build(store, "generate", "k1")), ".k1.partial", "symbolic link")
    assert not (tmp_path / "nowhere").exists()


def test_publish_remove_and_set_aside_never_act_through_a_link(store, outside):
    """--refresh (remove), publishing over an old copy and setting a failing output aside: each refuses a link."""
    out = store.output_dir("export", "k1")
    out.parent.mkdir(parents=True)
    out.symlink_to(outside, target_is_directory=True)
    work = store.path / "export" / ".k1.partial"
    work.mkdir()
    (work / "weights.bin").write_bytes(b"new")
    before = snapshot(outside)
    refused(lambda: store.publish(work, out), "symbolic link")
    refused(lambda: store.remove(out), "symbolic link")
    refused(lambda: store.set_aside(out, work), "symbolic link")
    unchanged(outside, before)
    assert (work / "weights.bin").read_bytes() == b"new"


def test_setting_aside_into_a_linked_partial_build_is_refused(store, outside):
    out = built(store, "reference", "k1")
    work = store.partial_dir(out)
    work.symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    refused(lambda: store.set_aside(out, work), ".k1.partial", "symbolic link")
    unchanged(outside, before)
    assert store.verified(out) is not None, "the output was changed before the refusal"


# ---------------------------------------------------------------- files inside an output


def test_a_file_of_an_output_that_is_a_link_outside_is_not_verified_through(store, outside):
    """``weights.bin`` replaced by a link to a file with the very bytes the manifest lists: not valid."""
    out = built(store, "teacher_eval", "k1")
    (out / "weights.bin").unlink()
    (out / "weights.bin").symlink_to(outside / "weights.bin")
    before = snapshot(outside)
    m = store.read_manifest(out)
    refused(lambda: store.problems(out, m), "weights.bin", "symbolic link")
    refused(lambda: store.cached_side_output(out), "weights.bin")
    unchanged(outside, before)


def test_a_verification_record_that_is_a_link_is_refused(store, outside):
    out = built(store, "reference", "k1")
    (out / RECORD).unlink()
    (out / RECORD).symlink_to(outside / "weights.bin")
    before = snapshot(outside)
    refused(lambda: store.verified(out), RECORD, "symbolic link")
    unchanged(outside, before)


def test_a_manifest_naming_a_file_outside_its_output_does_not_verify(store, outside):
    """A crafted manifest lists ``../../../outside/weights.bin`` with that file's checksum: it is a
    problem of the output (redone), never a file read as part of it."""
    out = built(store, "reference", "k1")
    rel = os.path.relpath(outside / "weights.bin", out)
    m = store.read_manifest(out)
    m.files.append(m.files[0].model_copy(update={"name": rel}))
    (out / MANIFEST).write_text(m.model_dump_json())
    before = snapshot(outside)
    problems = store.problems(out, store.read_manifest(out))
    assert problems == [f"{rel} (outside the output)"]
    assert store.verified(out) is None
    unchanged(outside, before)


def test_a_manifest_that_is_a_link_is_not_read(store, outside):
    out = built(store, "reference", "k1")
    shutil.copy(out / MANIFEST, outside / "copied-manifest.json")
    (out / MANIFEST).unlink()
    (out / MANIFEST).symlink_to(outside / "copied-manifest.json")
    before = snapshot(outside)
    refused(lambda: store.read_manifest(out), MANIFEST, "symbolic link")
    unchanged(outside, before)


# ---------------------------------------------------------------- side caches, digests, scratch, locks


def test_a_side_cache_that_is_a_link_to_a_valid_looking_copy_is_refused(store, tmp_path):
    """``reference/<key>`` links to a complete copy elsewhere: reading it would trust files the store does not hold."""
    real = built(store, "reference", "k1")
    copy = tmp_path / "copy"
    shutil.copytree(real, copy)
    shutil.rmtree(real)
    real.symlink_to(copy, target_is_directory=True)
    before = snapshot(copy)
    refused(lambda: store.cached_side_output(real), "symbolic link", "Fix: remove the link")
    refused(lambda: store.side_dir("reference", "k1"), "symbolic link")
    unchanged(copy, before)


def test_a_side_cache_directory_that_is_a_link_is_not_published_into(store, outside):
    store.path.mkdir()
    (store.path / "teacher_eval").symlink_to(outside, target_is_directory=True)
    out = store.path / "teacher_eval" / "k1"
    before = snapshot(outside)

    def write(work: Path) -> list[str]:
        (work / "metrics.json").write_text("{}")
        return ["metrics.json"]

    refused(lambda: store.publish_side_output(out, "teacher_eval", "k1", "t", {}, write), "teacher_eval", "symbolic link")
    unchanged(outside, before)


def test_digests_that_are_a_link_are_neither_written_nor_cleaned(store, outside, tmp_path):
    store.path.mkdir()
    (store.path / ".digests").symlink_to(outside, target_is_directory=True)
    teacher = tmp_path / "teacher.bin"
    teacher.write_bytes(b"t" * 32)
    before = snapshot(outside)
    refused(lambda: store.digest(teacher), ".digests", "symbolic link")
    refused(lambda: store.note("loads-abc"), ".digests")
    refused(lambda: store.clean(store.path / "generate" / ".k1.partial"), ".digests")
    refused(store.check_writable, ".digests")
    unchanged(outside, before)


def test_a_scratch_folder_that_is_a_link_is_refused(store, outside):
    store.path.mkdir()
    (store.path / ".flow-plans").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    refused(lambda: store.scratch_dir("flow-plans"), ".flow-plans", "symbolic link")
    refused(store.check_writable, ".flow-plans")
    unchanged(outside, before)


def test_a_lock_file_that_is_a_link_is_not_opened(store, outside):
    out = store.output_dir("generate", "k1")
    out.parent.mkdir(parents=True)
    (out.parent / ".k1.lock").symlink_to(outside / "weights.bin")
    before = snapshot(outside)

    def take():
        with store.lock(out):
            pass

    refused(take, ".k1.lock", "symbolic link")
    refused(lambda: store.reuse_or_build("generate", out, "c\n", tiny_build(store, "generate", "k1")), ".k1.lock")
    unchanged(outside, before)


def test_listing_outputs_refuses_a_linked_output(store, outside):
    """``dmd verify`` walks every output: a linked one is named, never verified through."""
    built(store, "reference", "k1")
    shutil.copytree(store.path / "reference" / "k1", outside / "k2")
    (store.path / "reference" / "k2").symlink_to(outside / "k2", target_is_directory=True)
    before = snapshot(outside)
    refused(lambda: list(store.outputs()), "k2", "symbolic link")
    unchanged(outside, before)


def test_cleaning_skips_links_and_removes_only_temporary_names(store, outside):
    """remove_orphans, on a directory holding a link named like a temporary file: the link is kept
    (the store makes none) and only the dead writer's own temporary file goes."""
    from stages.store.local import remove_orphans

    work = store.path / "generate" / ".k1.partial"
    work.mkdir(parents=True)
    (work / f".shard.tmp-{DEAD_PID}").write_bytes(b"x")
    (work / ".dir.tmp").symlink_to(outside, target_is_directory=True)
    (work / "pairs-000000.tar").write_bytes(b"kept")
    before = snapshot(outside)
    assert remove_orphans(work) == [work / f".shard.tmp-{DEAD_PID}"]
    assert sorted(p.name for p in work.iterdir()) == [".dir.tmp", "pairs-000000.tar"]
    refused(lambda: store.clean(work), ".dir.tmp", "symbolic link")
    unchanged(outside, before)


def test_a_store_root_that_is_a_link_is_used_and_links_below_it_are_not(tmp_path, outside):
    """The root being a link is the user's choice (resolved once, at open); a link below it is refused."""
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "store").symlink_to(disk, target_is_directory=True)
    store = LocalStore(tmp_path / "store")
    store.check_writable()
    out = built(store, "reference", "k1")
    assert (disk / "reference" / "k1" / "weights.bin").is_file()
    assert built(store, "reference", "k1") == out  # reused
    (disk / "reference" / "k2").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    refused(lambda: store.side_dir("reference", "k2"), "k2", "symbolic link")
    refused(lambda: LocalStore(disk).side_dir("reference", "k2"), "k2", "symbolic link")  # named by its resolved path
    unchanged(outside, before)

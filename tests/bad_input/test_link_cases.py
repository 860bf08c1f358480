"""Symbolic links in the store, met by ``dmd``: a stage directory, an output, a partial build, a lock file,
``.digests/``, a side-cache directory or a file inside an output that is a link is refused with exit 2 and
one ``error: ... Fix: remove the link`` line (before any stage computes when the link is there from the
start), and the directory it points to is byte for byte unchanged (tests/faults/test_links.py has the
store's own calls)."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
from conftest import add_tiny_evaluate, write_config
from refusal import assert_refused, nothing_started, snapshot

from stages.store.local import RECORD

importlib.import_module("flows.cli")  # imported at collection: each case then runs its command only

DEAD_PID = 4_000_000  # above Linux's pid_max: never a live process


@pytest.fixture(scope="module")
def made(tmp_path_factory, edm_teacher):
    """A config, a store holding its generate output, and the distill output's key (in process: seconds)."""
    from stages import chain
    from stages.config import load_config

    tmp = tmp_path_factory.mktemp("link-cases")
    cfg = add_tiny_evaluate(write_config(tmp / "c.yaml", edm_teacher, tmp / "store", distill={}))
    pairs = chain.run(load_config(cfg), "generate", progress=False).out_dir
    distill_key = chain.plan(load_config(cfg), "distill").out_dir.name
    return cfg, tmp / "store", pairs.name, distill_key


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory outside the store holding what a store would delete or overwrite if it followed a link there."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "manifest.json").write_text('{"not": "the store\'s"}')
    (d / f".notes.tmp-{DEAD_PID}").write_text("named like a dead writer's temporary file")
    (d / ".cache.tmp").write_text("named like a temporary file")
    return d


def store_copy(made, tmp_path: Path, keep_generate: bool = True) -> Path:
    store = tmp_path / "store"
    shutil.copytree(made[1], store, symlinks=True)
    if not keep_generate:
        shutil.rmtree(store / "generate" / made[2])
    return store


def args(made, command: str, store: Path) -> list[str]:
    return [command, "--config", str(made[0]), *(["-q"] if command != "verify" else []), "--set", f"store={store}"]


def refused_here(made, command: str, store: Path, outside: Path, *needles: str) -> str:
    """The refusal, checked (before any stage computes: the link is there from the start); the outside directory unchanged."""
    before = snapshot(outside)
    with nothing_started(store):
        line = assert_refused(args(made, command, store), store, "symbolic link", "Fix: remove the link", *needles)
    assert snapshot(outside) == before, "a directory outside the store was changed through a link"
    return line


def test_generate_output_that_is_a_link_elsewhere(made, tmp_path, outside):
    """The reported case: it used to delete that directory's manifest.json and temporary files, then write there."""
    store = store_copy(made, tmp_path, keep_generate=False)
    (store / "generate" / made[2]).symlink_to(outside, target_is_directory=True)
    refused_here(made, "generate", store, outside, made[2])


def test_generate_output_that_is_a_dangling_link(made, tmp_path):
    store = store_copy(made, tmp_path, keep_generate=False)
    (store / "generate" / made[2]).symlink_to(tmp_path / "nowhere", target_is_directory=True)
    refused_here(made, "generate", store, tmp_path / "outside-absent", made[2])
    assert not (tmp_path / "nowhere").exists()


def test_generate_stage_directory_that_is_a_link_in_a_new_store(made, tmp_path, outside):
    store = tmp_path / "store"
    store.mkdir()
    (store / "generate").symlink_to(outside, target_is_directory=True)
    refused_here(made, "generate", store, outside, "generate")


def test_distill_stage_directory_that_is_a_link_is_refused_before_generate(made, tmp_path, outside):
    store = store_copy(made, tmp_path, keep_generate=False)
    (store / "distill").symlink_to(outside, target_is_directory=True)
    refused_here(made, "distill", store, outside, "distill")
    assert not (store / "generate" / made[2]).exists()


def test_distill_output_that_is_a_link(made, tmp_path, outside):
    store = store_copy(made, tmp_path)
    (store / "distill").mkdir()
    (store / "distill" / made[3]).symlink_to(outside, target_is_directory=True)
    refused_here(made, "distill", store, outside, made[3])


def test_reference_side_cache_directory_that_is_a_link_is_refused_before_evaluate(made, tmp_path, outside):
    store = store_copy(made, tmp_path)
    (store / "reference").symlink_to(outside, target_is_directory=True)
    refused_here(made, "evaluate", store, outside, "reference")


def test_digests_that_are_a_link(made, tmp_path, outside):
    store = store_copy(made, tmp_path)
    shutil.rmtree(store / ".digests")
    (store / ".digests").symlink_to(outside, target_is_directory=True)
    refused_here(made, "generate", store, outside, ".digests")


def test_partial_build_that_is_a_link(made, tmp_path, outside):
    store = store_copy(made, tmp_path, keep_generate=False)
    (store / "generate" / f".{made[2]}.partial").symlink_to(outside, target_is_directory=True)
    refused_here(made, "generate", store, outside, ".partial")


def test_lock_file_that_is_a_link(made, tmp_path, outside):
    store = store_copy(made, tmp_path, keep_generate=False)
    lock = store / "generate" / f".{made[2]}.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(outside / "manifest.json")
    refused_here(made, "generate", store, outside, ".lock")


def test_shard_of_a_complete_output_that_is_a_link_to_the_same_bytes(made, tmp_path, outside):
    """The link's target has exactly the bytes the manifest lists: still not the store's file."""
    store = store_copy(made, tmp_path)
    shard = store / "generate" / made[2] / "pairs-000000.tar"
    shutil.copy(shard, outside / shard.name)
    shard.unlink()
    shard.symlink_to(outside / shard.name)
    refused_here(made, "generate", store, outside, "pairs-000000.tar")


def test_shard_inside_a_partial_build_that_is_a_link(made, tmp_path, outside):
    """An interrupted build's finished shard replaced by a link: the resumed build must not take it as its own."""
    store = store_copy(made, tmp_path)
    out = store / "generate" / made[2]
    work = out.parent / f".{made[2]}.partial"
    out.rename(work)
    for name in ("manifest.json", RECORD):
        (work / name).unlink()
    shard = work / "pairs-000001.tar"
    shutil.copy(shard, outside / shard.name)
    shard.unlink()
    shard.symlink_to(outside / shard.name)
    refused_here(made, "generate", store, outside, "pairs-000001.tar")


def test_verify_names_a_linked_output(made, tmp_path, outside):
    """``dmd verify`` walks every output; one that is a link to a complete copy elsewhere is named, not verified through."""
    store = store_copy(made, tmp_path)
    out = store / "generate" / made[2]
    shutil.copytree(out, outside / "copy")
    shutil.rmtree(out)
    out.symlink_to(outside / "copy", target_is_directory=True)
    refused_here(made, "verify", store, outside, made[2])


@pytest.mark.parametrize("lease", ["soon", "0", "-5", "nan"])
def test_lock_lease_that_is_not_a_positive_number(made, tmp_path, lease):
    """DMD_LOCK_LEASE_S (how long a silent lock holder is waited for) is read before any stage runs."""
    store = store_copy(made, tmp_path, keep_generate=False)
    with nothing_started(store):
        assert_refused(args(made, "generate", store), store, "DMD_LOCK_LEASE_S", lease, env={"DMD_LOCK_LEASE_S": lease})

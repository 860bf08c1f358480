"""What generate costs besides solving: the room check counts the bytes it writes, a resume hashes only
shards it has no verification record for, and a prompt file that passed its checks is not parsed again."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import stages.checks
import stages.generate as generate
from conftest import make_edm_teacher, write_config
from dmd_core import faults
from dmd_core.errors import InputError
from dmd_core.shards import shard_name, shard_sizes, write_shard
from stages import chain
from stages.config import load_config
from stages.store import LocalStore, local


def written_sizes(tmp: Path, n: int, k: int, shape, dtype, labelled: bool, prompts: list[str] | None) -> list[int]:
    """The sizes of the shards write_shard makes of n samples in shards of k."""
    sizes = []
    for s in range(0, n, k):
        idx = range(s, min(s + k, n))
        z = np.zeros((len(idx), *shape), dtype)
        labels = np.array([i % len(prompts) for i in idx]) if prompts else np.array([i % 11 for i in idx]) if labelled else None
        write_shard(tmp / "x.tar", idx, z, z, labels, prompts)
        sizes.append((tmp / "x.tar").stat().st_size)
    return sizes


@pytest.mark.parametrize(
    "shape,dtype,labelled,prompts",
    [
        ((1, 8, 8), "float32", True, None),
        ((3, 5, 7), "float16", False, None),
        ((4, 4, 4), "float32", True, ["a", "ü" * 300, "b" * 511, "c" * 512, "d" * 513, "e" * 2000]),  # 1, 2, 1, 1, 2, 4 blocks
    ],
)
def test_shard_sizes_are_the_written_sizes(tmp_path, shape, dtype, labelled, prompts):
    n, k = 23, 7  # a partial last shard; prompts cycle across shard boundaries
    want = written_sizes(tmp_path, n, k, shape, dtype, labelled, prompts)
    sizes = None if prompts is None else [len(p.encode()) for p in prompts]
    assert shard_sizes(n, k, shape, dtype, labelled, sizes).tolist() == want


def output_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("pairs-"))


@pytest.mark.parametrize("classes,dtype", [(10, "float32"), (10, "float16"), (0, "float32"), (0, "float16")])
def test_room_check_counts_the_generate_output(tmp_path, edm_teacher, classes, dtype):
    """pairs_bytes (what check_room needs) equals the bytes of a generate output's shards and checksum files."""
    teacher_dir = edm_teacher if classes else make_edm_teacher(tmp_path / "edm", num_classes=0)
    cfg = load_config(write_config(tmp_path / "c.yaml", teacher_dir, tmp_path / "store", num_samples=21, shard_size=8, steps=1, dtype=dtype))
    teacher = chain.resolve_teacher(cfg)
    out = chain.run(cfg, "generate", progress=False).out_dir
    assert generate.pairs_bytes(cfg.generate, teacher) == output_bytes(out)


def test_room_check_refuses_exactly_what_does_not_fit(tmp_path, monkeypatch, edm_teacher):
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", num_samples=21, shard_size=8))
    teacher = chain.resolve_teacher(cfg)
    need = generate.pairs_bytes(cfg.generate, teacher)
    # 8 samples of 3 members of 2 blocks, + 2 end blocks: 50 blocks, 3 records; the last 5 samples: 32 blocks, 2 records
    assert need == (3 + 3 + 2) * 10240 + 3 * 65
    monkeypatch.setattr(LocalStore, "free_bytes", lambda self: need)
    generate.check_room(cfg, teacher)
    monkeypatch.setattr(LocalStore, "free_bytes", lambda self: need - 1)
    with pytest.raises(InputError, match="generate.num_samples=21 needs 82,115 bytes of pairs; the store's disk has 82,114 bytes free"):
        generate.check_room(cfg, teacher)


def test_room_check_reads_prompt_lengths_only_when_close(tmp_path, monkeypatch):
    """A text-to-image run's need lies between prompts of one block and of MAX_PROMPT_CHARS; the file is read only
    when the room lies between, and then the need is exact."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("short\n" + "x" * 9000 + "\n")  # prompt.txt members of 2 and 19 blocks
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "store", num_samples=2, shard_size=2, prompts=str(prompts)))
    teacher = SimpleNamespace(takes_prompts=True, image_shape=(4, 4, 4), param=SimpleNamespace(num_classes=0))
    exact = generate.pairs_bytes(cfg.generate, teacher, [5, 9000])
    assert exact == 2 * 10240 + 65  # 2 x (noise 3 + image 3 + cls 2 blocks) + 21 prompt blocks + 2 end blocks = 39 blocks: 2 records
    assert generate.pairs_bytes(cfg.generate, teacher, [1]) == 10240 + 65  # the least: 22 blocks
    reads = []
    monkeypatch.setattr(generate, "iter_prompts", lambda *a: reads.append(a) or iter(["short", "x" * 9000]))
    for free, refused, read in [(10**12, False, 0), (exact, False, 1), (exact - 1, True, 1), (100, True, 0)]:
        reads.clear()
        monkeypatch.setattr(LocalStore, "free_bytes", lambda self, free=free: free)
        if refused:
            with pytest.raises(InputError, match="needs "):
                generate.check_room(cfg, teacher)
        else:
            generate.check_room(cfg, teacher)
        assert len(reads) == read, free


def count_hashes(monkeypatch) -> list[str]:
    """The files sha256 is computed of, from now on (the generate stage's and the store's)."""
    hashed: list[str] = []
    real = local.sha256_file

    def counting(path, chunk=1 << 20):
        hashed.append(Path(path).name)
        return real(path, chunk)

    for module in (generate, local):
        monkeypatch.setattr(module, "sha256_file", counting)
    monkeypatch.setattr(local, "_SEEN", {})  # as in a fresh process: only the records may spare a hash
    return hashed


def test_resume_hashes_only_shards_without_records(tmp_path, monkeypatch, edm_teacher):
    """A run cut before its manifest (every shard written, recorded when written) resumes hashing none of its
    shards but the one truncated since; that one and two deleted ones are rewritten, equal to an uninterrupted run."""
    sets = dict(num_samples=40, shard_size=8, steps=1)
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", **sets))
    monkeypatch.setattr(faults, "_reached", {})
    monkeypatch.setenv(faults.ENV, "generate.before-manifest:1:enospc")
    with pytest.raises(InputError, match="disk full"):
        chain.run(cfg, "generate", progress=False)
    monkeypatch.delenv(faults.ENV)
    work = next((tmp_path / "store" / "generate").glob(".*.partial"))
    assert sorted(p.name for p in work.glob("pairs-*.tar")) == [shard_name(i) for i in range(5)]
    (work / shard_name(1)).unlink()
    (work / shard_name(3)).unlink()
    victim = work / shard_name(2)
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:-10240])  # cut (a new size): its record no longer applies

    hashed = count_hashes(monkeypatch)
    out = chain.run(cfg, "generate", progress=False).out_dir
    shards_hashed = [n for n in hashed if n.startswith("pairs-")]
    assert shards_hashed == [shard_name(2)]  # the cut shard, found bad; the kept ones: by their records
    written = sorted(re.sub(r"(\.\d+)?\.tmp-\d+$", "", n) for n in hashed if n.startswith(".pairs-"))  # temporary names (tmp_sibling: the writer thread's)
    assert written == [f".{shard_name(i)}" for i in (1, 2, 3)]  # each rewritten shard: hashed once, as written

    fresh = load_config(write_config(tmp_path / "f.yaml", edm_teacher, tmp_path / "fresh", **sets))
    ref = chain.run(fresh, "generate", progress=False).out_dir
    assert {p.name: p.read_bytes() for p in out.glob("pairs-*")} == {p.name: p.read_bytes() for p in ref.glob("pairs-*")}


def test_finished_shards_trusts_records_and_rehashes_a_changed_shard(tmp_path, monkeypatch, edm_teacher):
    """Without the generate run: a recorded shard is not hashed; one rewritten in place (new mtime) is."""
    cfg = load_config(write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store", num_samples=16, shard_size=8, steps=1))
    out = chain.run(cfg, "generate", progress=False).out_dir
    hashed = count_hashes(monkeypatch)
    assert generate.finished_shards(out, range(3)) == {0, 1}
    assert hashed == []
    data = bytearray((out / shard_name(0)).read_bytes())
    data[2000] ^= 0xFF
    (out / shard_name(0)).chmod(0o644)
    (out / shard_name(0)).write_bytes(bytes(data))  # same size, new mtime
    assert generate.finished_shards(out, range(2)) == {1}
    assert hashed == [shard_name(0)]


def test_prompt_file_is_parsed_once_per_content(tmp_path, monkeypatch, sd_teacher):
    """The checks of `dmd generate` parse a prompt file once; a rerun with the same file does not, a changed
    file is parsed again (and refused when bad)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("the digit 7\na handwritten three\n")
    cfg = load_config(write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", solver="pndm", prompts=str(prompts)))
    parsed = []
    real = stages.checks.read_prompt_file
    monkeypatch.setattr(stages.checks, "read_prompt_file", lambda *a, **k: parsed.append(a[0]) or real(*a, **k))
    chain.check(cfg, "generate")
    assert parsed == [str(prompts)]
    chain.check(cfg, "generate")
    assert parsed == [str(prompts)]  # remembered by the store: not parsed again
    prompts.write_text("the digit 7\n\x07bell\n")  # a control character: refused
    with pytest.raises(InputError, match="generate.prompts"):
        chain.check(cfg, "generate")
    assert parsed == [str(prompts)] * 2
    with pytest.raises(InputError, match="generate.prompts"):  # a file that failed is not remembered
        chain.check(cfg, "generate")
    assert parsed == [str(prompts)] * 3


def test_prompt_file_marker_covers_column_and_labels(tmp_path, monkeypatch):
    """The same file read with another column (or labels, or classes) is checked again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "caption": ["x", ""], "digit": [0, 12]}), path)
    store = LocalStore(tmp_path / "store")
    stages.checks.check_prompt_file(store, str(path), "prompt", "evaluate")
    with pytest.raises(InputError, match="empty or whitespace-only prompts at row 1"):
        stages.checks.check_prompt_file(store, str(path), "caption", "evaluate")
    stages.checks.check_prompt_file(store, str(path), "prompt", "evaluate", "digit", 13)
    with pytest.raises(InputError, match=r"labels outside the classifier's classes \[0, 10\) at row 1"):
        stages.checks.check_prompt_file(store, str(path), "prompt", "evaluate", "digit", 10)
    with pytest.raises(InputError, match="no such file"):
        stages.checks.check_prompt_file(store, str(tmp_path / "missing.txt"), "prompt", "evaluate")

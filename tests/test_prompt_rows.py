"""Prompt embeddings are encoded once into the store and read back by index, equal to the in-memory table."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import stages.prompt_rows as prompt_rows_module
from dmd_core.rows import JoinedPromptRows, NpyRows, PromptRows, PromptTexts, ShardedRows, write_prompt_texts
from dmd_core.text import PromptEncoder, iter_prompts, read_prompts
from stages.contract import Teacher
from stages.prompt_rows import PromptSource, prompt_rows
from stages.store import LocalStore

PROMPTS = ["the digit 3", "seven", "a handwritten 7", "three", "7", "the digit 7 é", "3 3"]


def test_npy_rows_read_any_rows_of_any_dtype(tmp_path):
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float16", "int64"):
        a = (rng.standard_normal((37, 3, 5)) * 100).astype(dtype)
        np.save(tmp_path / f"a-{dtype}.npy", a)
        rows = NpyRows(tmp_path / f"a-{dtype}.npy")
        idx = rng.integers(0, 37, 50)
        assert len(rows) == 37 and np.array_equal(rows.read(idx), a[idx]) and rows.read(idx).dtype == a.dtype
        assert rows.read([]).shape == (0, 3, 5)
        with pytest.raises(IndexError):
            rows.read([37])
    parts = [rng.standard_normal((n, 4)).astype("float32") for n in (5, 1, 9)]
    for i, part in enumerate(parts):
        np.save(tmp_path / f"p{i}.npy", part)
    table = ShardedRows([NpyRows(tmp_path / f"p{i}.npy") for i in range(3)])
    idx = np.array([14, 0, 5, 6, 4, 14, 7])
    assert np.array_equal(table.read(idx), np.concatenate(parts)[idx])


def test_a_cut_npy_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 3), "float32"))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="header declares"):
        NpyRows(tmp_path / "a.npy")


def test_prompt_texts_round_trip(tmp_path):
    assert write_prompt_texts(iter(PROMPTS), tmp_path / "p.bin", tmp_path / "o.npy") == len(PROMPTS)
    texts = PromptTexts(tmp_path / "p.bin", tmp_path / "o.npy")
    assert [texts[i] for i in range(len(texts))] == PROMPTS


@pytest.mark.parametrize("suffix", [".txt", ".parquet"])
def test_iter_prompts_streams_what_read_prompts_reads(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    prompts = [*PROMPTS, "line\u2028split", "x\x85y"] if suffix == ".txt" else PROMPTS
    if suffix == ".txt":
        path.write_text("\n".join(prompts) + "\n\n  \r\nlast\r")
    else:
        pq.write_table(pa.table({"prompt": pa.array(prompts).dictionary_encode()}), path, row_group_size=3)
    assert list(iter_prompts(path, "prompt", batch=2)) == read_prompts(path, "prompt")


def encoder_calls(monkeypatch) -> list[int]:
    """The number of prompts each PromptEncoder.encode call encodes (the empty row's call included)."""
    calls: list[int] = []
    real = PromptEncoder.encode

    def counted(self, prompts):
        calls.append(len(prompts))
        return real(self, prompts)

    monkeypatch.setattr(PromptEncoder, "encode", counted)
    return calls


def test_stored_rows_equal_the_table_bit_for_bit_and_are_encoded_once(tmp_path, sd_teacher, monkeypatch):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    store, teacher = LocalStore(tmp_path / "store"), Teacher.at(sd_teacher, "d" * 64)
    want = teacher.prompt_encoder().table(PROMPTS)
    monkeypatch.setattr(prompt_rows_module, "ROWS_PER_SHARD", 3)  # 3 shards of rows
    calls = encoder_calls(monkeypatch)
    rows = prompt_rows(store, teacher, PromptSource.file(store, tmp_path / "p.txt", "prompt"))
    assert len(rows) == len(PROMPTS) + 1 and rows.null_row == len(PROMPTS)
    idx = torch.tensor([7, 0, 6, 3, 3, 2])
    assert torch.equal(rows.rows(idx)["hidden"], want.rows(idx)["hidden"])
    assert [rows.prompt(i) for i in range(len(rows))] == [*PROMPTS, ""]
    assert sorted(calls) == [1, 1, 3, 3]  # the empty row, then shards of 3, 3 and 1 prompts
    calls.clear()
    again = prompt_rows(store, teacher, PromptSource.file(store, tmp_path / "p.txt", "prompt"))
    assert calls == [] and torch.equal(again.rows(idx)["hidden"], want.rows(idx)["hidden"])
    (out,) = [p for kind, p in store.outputs() if kind == "prompt_embeddings"]
    assert store.verified(out) is not None
    half = prompt_rows(store, teacher, PromptSource.file(store, tmp_path / "p.txt", "prompt"), "float16")
    assert half.parts["hidden"].dtype == np.float16
    assert torch.equal(half.rows(idx)["hidden"], want.rows(idx)["hidden"].half().float())


def test_a_killed_encoding_resumes_its_finished_shards(tmp_path, sd_teacher, monkeypatch):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    teacher = Teacher.at(sd_teacher, "d" * 64)
    monkeypatch.setattr(prompt_rows_module, "ROWS_PER_SHARD", 2)
    clean = LocalStore(tmp_path / "clean")
    prompt_rows(clean, teacher, PromptSource.file(clean, tmp_path / "p.txt", "prompt"))
    store = LocalStore(tmp_path / "store")
    calls = encoder_calls(monkeypatch)
    real_save = prompt_rows_module._save

    def dies_at_third_shard(work, name, rows):
        if name == "hidden-000002.npy":
            raise KeyboardInterrupt
        return real_save(work, name, rows)

    monkeypatch.setattr(prompt_rows_module, "_save", dies_at_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prompt_rows(store, teacher, PromptSource.file(store, tmp_path / "p.txt", "prompt"))
    monkeypatch.setattr(prompt_rows_module, "_save", real_save)
    calls.clear()
    prompt_rows(store, teacher, PromptSource.file(store, tmp_path / "p.txt", "prompt"))
    assert sorted(calls) == [1, 1, 2]  # the empty row, then shards 2 (2 prompts) and 3 (1 prompt) only
    (a,), (b,) = ([p for kind, p in s.outputs() if kind == "prompt_embeddings"] for s in (clean, store))
    assert a.name == b.name
    made = sorted(f.name for f in a.iterdir() if not f.name.startswith(".") and f.name != "manifest.json")  # records hold times
    assert made == sorted(f.name for f in b.iterdir() if not f.name.startswith(".") and f.name != "manifest.json")
    for name in made:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_joined_rows_are_the_first_then_the_second_then_the_null_row():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, 3, generator=g), torch.randn(3, 2, 3, generator=g)
    joined = JoinedPromptRows(PromptRows({"hidden": a}, ["a0", "a1", "a2"]), PromptRows({"hidden": b}, ["b0", "b1"]))
    table = torch.cat([a[:3], b[:2], a[3:]])
    assert len(joined) == 6 and joined.null_row == 5
    idx = torch.tensor([5, 0, 3, 4, 2, 3, 5])
    assert torch.equal(joined.rows(idx)["hidden"], table[idx])
    assert [joined.prompt(i) for i in range(6)] == ["a0", "a1", "a2", "b0", "b1", ""]
    assert copy.deepcopy(joined) is joined


def test_processes_of_a_launch_encode_their_shares_then_one_publishes(tmp_path, sd_teacher, monkeypatch):
    """Two ranks (threads here: a fork after torch ran may hang in its thread pool; they meet at a barrier as
    accelerate's processes do) encode alternate shards; the published output equals one process's, byte for byte."""
    import threading

    from stages.prompt_rows import Spread

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    teacher = Teacher.at(sd_teacher, "d" * 64)
    monkeypatch.setattr(prompt_rows_module, "ROWS_PER_SHARD", 2)  # 4 shards: rank 0 encodes 0 and 2, rank 1 encodes 1 and 3
    one = LocalStore(tmp_path / "one")
    prompt_rows(one, teacher, PromptSource.file(one, tmp_path / "p.txt", "prompt"))
    store = LocalStore(tmp_path / "store")
    barrier, encoded, rank_of, results, errors = threading.Barrier(2, timeout=120), {0: [], 1: []}, {}, {}, []
    real = PromptEncoder.encode
    monkeypatch.setattr(PromptEncoder, "encode", lambda self, prompts: encoded[rank_of[threading.get_ident()]].append(len(prompts)) or real(self, prompts))

    def rank(r: int) -> None:
        rank_of[threading.get_ident()] = r
        try:
            results[r] = prompt_rows(store, teacher, PromptSource.file(store, tmp_path / "p.txt", "prompt"), spread=Spread(r, 2, barrier.wait))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(180) for t in threads]
    assert not errors, errors
    assert sorted(encoded[0]) == [1, 1, 2, 2] and sorted(encoded[1]) == [1, 1, 2]  # the empty row each (rank 0 twice: it publishes)
    (a,), (b,) = ([p for kind, p in s.outputs() if kind == "prompt_embeddings"] for s in (one, store))
    made = sorted(f.name for f in a.iterdir() if not f.name.startswith(".") and f.name != "manifest.json")
    assert made == sorted(f.name for f in b.iterdir() if not f.name.startswith(".") and f.name != "manifest.json")
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in made)
    idx = torch.arange(len(PROMPTS) + 1)
    assert torch.equal(results[0].rows(idx)["hidden"], results[1].rows(idx)["hidden"])


def test_the_embedded_teachers_prompts_read_back_equal_the_table_computed_whole(tmp_path):
    """data/digits-t2i.yaml: the stored rows of its training prompts equal the in-memory table (float32), bit for bit."""
    root = Path(__file__).resolve().parents[1] / "data"
    teacher, prompts = root / "teacher-t2i", root / "digits-t2i-train-prompts.parquet"
    store, t = LocalStore(tmp_path / "store"), Teacher.at(teacher, "e" * 64)
    rows = prompt_rows(store, t, PromptSource.file(store, prompts, "prompt"))
    want = t.prompt_encoder().table(read_prompts(prompts))
    idx = torch.arange(len(want))
    assert len(rows) == len(want) and torch.equal(rows.rows(idx)["hidden"], want.rows(idx)["hidden"])


def test_a_two_process_generate_encodes_together_and_writes_the_same_bytes(tmp_path, sd_teacher):
    """``dmd generate -n 2`` on a text-to-image teacher (accelerate, gloo on CPU): the processes encode the prompt
    shards together; pairs and embeddings equal a one-process run's, byte for byte."""
    from conftest import run_cli, write_config

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "one", solver="pndm", steps=3, num_samples=8, shard_size=4,
                       prompts=str(tmp_path / "p.txt"))  # fmt: skip
    outs = {}
    for n, store in (("1", "one"), ("2", "two")):
        proc = run_cli("generate", "--config", str(cfg), "-q", "-n", n, "--set", f"store={tmp_path / store}")
        outs[n] = Path(proc.stdout.strip().splitlines()[-1])
    assert outs["1"].name == outs["2"].name
    for f in sorted(outs["1"].glob("pairs-*.tar")):
        assert f.read_bytes() == (outs["2"] / f.name).read_bytes(), f.name
    (a,), (b,) = ([p for kind, p in LocalStore(tmp_path / s).outputs() if kind == "prompt_embeddings"] for s in ("one", "two"))
    made = sorted(f.name for f in a.iterdir() if f.suffix in (".npy", ".bin"))
    assert made and all((a / n).read_bytes() == (b / n).read_bytes() for n in made)

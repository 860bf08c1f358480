"""Bad prompt files of text-to-image teachers: the held-out prompts of ``evaluate`` (with their class labels) and
the training prompts of ``generate``, each refused with exit 2 and one ``error: ... Fix: ...`` line naming the
setting, the row and the fix, before any stage computes (``refusal.assert_refused`` inside ``nothing_started``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import add_tiny_evaluate, write_config
from refusal import assert_refused, nothing_started

from dmd_core.errors import InputError

importlib.import_module("flows.cli")  # imported at collection: each case then runs its command only

GOOD = ["the digit 3", "seven", "a handwritten 7"]
MAX_PROMPT_CHARS = 10_000  # the documented bound (docs/formats.md)


def invalid_utf8() -> pa.Array:
    """A string column whose second value is the bytes ff fe: pyarrow writes and reads it without looking."""
    offsets = pa.py_buffer(pa.array([0, 5, 7], pa.int32()).buffers()[1])
    return pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"seven\xff\xfe")])


def truncated(path: Path) -> bytes:
    pq.write_table(pa.table({"prompt": GOOD, "digit": [3, 7, 7]}), path)
    return path.read_bytes()[:-20]  # the footer (schema, row groups) is cut


# (what to write at evaluate.prompts: a table, raw bytes, or a callable of the path; the labels column; needles)
EVALUATE_CASES = [
    pytest.param({"prompt": ["seven", None, "the digit 3"], "digit": [7, 3, 3]}, "digit", ("evaluate.prompts", "null", "row 1", "Fix"), id="null-prompt"),
    pytest.param({"prompt": ["seven", "", " \t\u3000", "3"], "digit": [7, 3, 3, 3]}, "digit", ("empty or whitespace-only", "rows 1, 2"), id="blank-prompts"),
    pytest.param({"prompt": [3, 7], "digit": [3, 7]}, "digit", ("column 'prompt'", "int64", "string"), id="int-prompt-column"),
    pytest.param({"prompt": [["seven"], ["3"]], "digit": [7, 3]}, "digit", ("column 'prompt'", "list<"), id="list-prompt-column"),
    pytest.param({"prompt": [{"text": "seven"}], "digit": [7]}, "digit", ("column 'prompt'", "struct<"), id="struct-prompt-column"),
    pytest.param({"prompt": pa.array([b"seven"], pa.binary()), "digit": [7]}, "digit", ("column 'prompt'", "binary"), id="binary-prompt-column"),
    pytest.param({"prompt": invalid_utf8(), "digit": [7, 3]}, "digit", ("column 'prompt'", "not valid UTF-8"), id="invalid-utf8"),
    pytest.param({"prompt": ["seven", "3", "x" * (MAX_PROMPT_CHARS + 1)], "digit": [7, 3, 3]}, "digit", ("row 2", "10001 characters", "10000"), id="long-prompt"),
    pytest.param({"prompt": ["seven", "seven\x00 3"], "digit": [7, 3]}, "digit", ("row 1", "control character"), id="nul-in-prompt"),
    pytest.param({"prompt": ["\x1b[31mseven", "3"], "digit": [7, 3]}, "digit", ("row 0", "control character"), id="escape-in-prompt"),
    pytest.param({"prompt": GOOD, "digit": [3.0, 7.0, 7.0]}, "digit", ("evaluate.prompt_labels", "'digit'", "double", "integer"), id="float-labels"),
    pytest.param({"prompt": GOOD, "digit": ["3", "7", "7"]}, "digit", ("evaluate.prompt_labels", "'digit'", "string", "integer"), id="string-labels"),
    pytest.param({"prompt": GOOD, "digit": [3, None, 7]}, "digit", ("evaluate.prompt_labels", "null", "row 1"), id="null-label"),
    pytest.param({"prompt": GOOD, "digit": [3, 7, 10]}, "digit", ("evaluate.prompt_labels", "row 2", "[0, 10)"), id="label-above-classes"),
    pytest.param({"prompt": GOOD, "digit": [-1, 7, 7]}, "digit", ("evaluate.prompt_labels", "row 0", "[0, 10)"), id="negative-label"),
    pytest.param({"prompt": GOOD, "digit": [3, 7, 7]}, "digits", ("evaluate.prompt_labels", "'digits'", "'prompt', 'digit'"), id="missing-label-column"),
    pytest.param({"caption": GOOD, "digit": [3, 7, 7]}, "digit", ("evaluate.prompt_column", "'prompt'", "'caption', 'digit'"), id="missing-prompt-column"),
    pytest.param(pa.table({"prompt": pa.array([], pa.string()), "digit": pa.array([], pa.int64())}), "digit", ("evaluate.prompts", "0 rows"), id="zero-rows"),
    pytest.param(b"the digit 3\nseven\n", "digit", ("evaluate.prompts", "not a readable Parquet file"), id="text-named-parquet"),
    pytest.param(b"", "digit", ("evaluate.prompts", "not a readable Parquet file"), id="zero-byte-file"),
    pytest.param(truncated, "digit", ("evaluate.prompts", "not a readable Parquet file"), id="truncated-parquet"),
    pytest.param(Path.mkdir, "digit", ("evaluate.prompts", "is a directory"), id="directory"),
]  # fmt: skip


def write_prompts(path: Path, content) -> Path:
    """``content`` at ``path``: a table (or the dict of one) as Parquet, raw bytes, or what a callable makes there."""
    if callable(content):
        data = content(path)
        if isinstance(data, bytes):
            path.write_bytes(data)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        pq.write_table(content if isinstance(content, pa.Table) else pa.table(content), path)
    return path


@pytest.fixture
def cfg(tmp_path, sd_teacher) -> Path:
    """The tiny Stable-Diffusion-layout teacher with good training prompts, FD-digits with the committed classifier (10 classes)."""
    (tmp_path / "train.txt").write_text("\n".join(GOOD) + "\n")
    return add_tiny_evaluate(write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", distill={}, solver="pndm", steps=4,
                                          num_samples=8, shard_size=8, prompts=str(tmp_path / "train.txt")))  # fmt: skip


def refused(args: list[str], store: Path, *needles: str) -> str:
    with nothing_started(store):
        line = assert_refused(args, store, *needles)
    assert len(line) < 600, f"the error line is not bounded: {len(line)} characters"
    return line


@pytest.mark.parametrize("content, labels, needles", EVALUATE_CASES)
def test_bad_evaluate_prompt_file(tmp_path, cfg, content, labels, needles):
    path = write_prompts(tmp_path / "eval.parquet", content)
    args = ["evaluate", "--config", str(cfg), "--set", f"evaluate.prompts={path}", "--set", f"evaluate.prompt_labels={labels}"]
    refused(args, tmp_path / "store", *needles)


def test_a_megabyte_prompt_is_refused_in_one_short_line(tmp_path, cfg):
    """A ~1 MB held-out prompt used to pass every check and crash the grid captions after the whole evaluation."""
    path = write_prompts(tmp_path / "eval.parquet", {"prompt": ["seven", "3" * 2**20], "digit": [7, 3]})
    line = refused(["evaluate", "--config", str(cfg), "--set", f"evaluate.prompts={path}"], tmp_path / "store", "row 1", "1048576 characters")
    assert "333333333333" not in line


def test_labels_need_a_parquet_prompt_file(tmp_path, cfg):
    (tmp_path / "eval.txt").write_text("\n".join(GOOD) + "\n")
    args = ["evaluate", "--config", str(cfg), "--set", f"evaluate.prompts={tmp_path / 'eval.txt'}", "--set", "evaluate.prompt_labels=digit"]
    refused(args, tmp_path / "store", "evaluate.prompt_labels", "Parquet")


# the training prompts (generate.prompts) go through the same reader and checks
GENERATE_CASES = [
    pytest.param("p.parquet", {"prompt": ["seven", None]}, ("generate.prompts", "null", "row 1"), id="parquet-null-prompt"),
    pytest.param("p.parquet", {"prompt": [1.5, 2.5]}, ("generate.prompts", "column 'prompt'", "double"), id="parquet-float-column"),
    pytest.param("p.parquet", pa.table({"prompt": pa.array([], pa.string())}), ("generate.prompts", "0 rows"), id="parquet-zero-rows"),
    pytest.param("p.txt", b"seven\nthe digit\x00 3\n", ("generate.prompts", "line 2", "control character"), id="text-nul"),
    pytest.param("p.txt", ("seven\n\n" + "7" * (MAX_PROMPT_CHARS + 5) + "\n").encode(), ("generate.prompts", "line 3", "10005 characters"), id="text-long-line"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, needles", GENERATE_CASES)
def test_bad_training_prompt_file(tmp_path, cfg, name, content, needles):
    path = write_prompts(tmp_path / name, content)
    refused(["generate", "--config", str(cfg), "--set", f"generate.prompts={path}"], tmp_path / "store", *needles)


def test_rows_and_labels_stay_aligned(tmp_path):
    """One reader gives both columns, row for row: dictionary-encoded and large_string prompts (legal Parquet) over
    several row groups keep each prompt's label; a null prompt is refused, never dropped with the labels shifted."""
    from dmd_core.text import read_prompt_file

    prompts = [f"the digit {i % 10}" if i % 3 else f"a handwritten {i % 10}" for i in range(50)]
    labels = [i % 10 for i in range(50)]
    for column in (pa.array(prompts).dictionary_encode(), pa.array(prompts, pa.large_string())):
        pq.write_table(pa.table({"prompt": column, "digit": labels}), tmp_path / "p.parquet", row_group_size=7)
        got = read_prompt_file(tmp_path / "p.parquet", "prompt", "digit", num_classes=10)
        assert list(zip(got.prompts, got.labels)) == list(zip(prompts, labels))
    pq.write_table(pa.table({"prompt": ["seven", None, "3"], "digit": [7, 0, 3]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match="row 1"):
        read_prompt_file(tmp_path / "p.parquet", "prompt", "digit", num_classes=10)

"""Hostile YAML: configs and ``--set`` values that expand, nest or grow without bound, and tags that are not
plain values. Each is refused at load, in milliseconds, with one bounded ``error:`` line (exit 2), before any
stage starts; anchors and merges that stay within the bounds still load.
"""

from __future__ import annotations

import importlib

import pytest
from conftest import write_config
from refusal import assert_refused, nothing_started

from stages.config import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, load_config

importlib.import_module("flows.cli")  # imported at collection: each case then runs its command only

HEAD = "store: {store}\nteacher:\n  path: {teacher}\n"


def laughs(levels: int, fan: int = 9, key: str = "lol") -> str:
    """The billion-laughs shape: level k is a list of ``fan`` aliases of level k - 1 (fan**levels leaves)."""
    lines = [f"  l0: &l0 [{key}]"]
    lines += [f"  l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * fan)}]" for k in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def flow_laughs(levels: int, fan: int = 9) -> str:
    """``laughs`` on one line, as a --set value: a list whose last item expands to fan**levels leaves."""
    items = [f"&a0 [{', '.join(['1'] * fan)}]"] + [f"&a{k} [{', '.join([f'*a{k - 1}'] * fan)}]" for k in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


def alias_chain(length: int) -> str:
    """Each anchor nests the previous one a level deeper: short text, ``length`` levels once expanded."""
    lines = ["  c0: &c0 [1]"] + [f"  c{k}: &c{k} [*c{k - 1}]" for k in range(1, length + 1)]
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int, fan: int = 9) -> str:
    """Mappings that merge (``<<``) the previous level ``fan`` times, each adding keys of its own."""
    lines = ["  m0: &m0 {a: 1, b: 2}"]
    for k in range(1, levels + 1):
        lines.append(f"  m{k}: &m{k} {{<<: [{', '.join([f'*m{k - 1}'] * fan)}], k{k}: {k}}}")
    return "\n".join(lines) + "\n"


FILE_CASES = [
    # 8 levels of 9: 460 bytes that expand to 43 M values (98 s and 4 GB to refuse as unknown keys, once)
    pytest.param(HEAD + "generate:\n" + laughs(8), ("c.yaml", "expand", f"more than {MAX_YAML_NODES}", "Fix:"), id="alias-bomb-small"),
    pytest.param(HEAD + "generate:\n" + alias_chain(MAX_YAML_DEPTH + 8), ("c.yaml", f"deeper than {MAX_YAML_DEPTH}", "Fix:"), id="alias-bomb-deep"),
    pytest.param(HEAD + "generate:\n  loop: &loop [*loop]\n", ("c.yaml", "refers to itself", "line 5", "Fix:"), id="alias-cycle"),
    pytest.param(HEAD + "distill:\n" + merge_bomb(7), ("c.yaml", "expand", "Fix:"), id="merge-key-bomb"),
    pytest.param(HEAD + "generate:\n  x: " + "[" * 500 + "]" * 500 + "\n", ("c.yaml", f"deeper than {MAX_YAML_DEPTH}", "line 5"), id="nesting-in-file"),
    pytest.param(HEAD + "generate:\n  steps: " + "9" * 5000 + "\n", ("c.yaml", "5000 characters", "line 5", "Fix:"), id="huge-integer"),
    pytest.param(HEAD + "generate:\n  prompt_column: '" + "p" * 200_000 + "'\n", ("c.yaml", "200000 characters", "Fix:"), id="huge-string"),
    pytest.param(HEAD + "generate:\n  seed: !!python/object/apply:os.system ['echo pwned']\n",
                 ("c.yaml", "!!python/object/apply:os.system", "not allowed", "line 5", "Fix:"), id="python-tag"),  # fmt: skip
    pytest.param(HEAD + "generate:\n  prompt_column: !!binary cHJvbXB0\n", ("c.yaml", "!!binary", "not allowed", "Fix:"), id="binary-tag"),
    pytest.param(HEAD + "generate:\n  num_samples: !!set {8: null}\n", ("c.yaml", "!!set", "not allowed", "Fix:"), id="set-tag"),
]


@pytest.mark.parametrize("content, needles", FILE_CASES)
def test_hostile_config_file(tmp_path, edm_teacher, content, needles):
    path, store = tmp_path / "c.yaml", tmp_path / "store"
    path.write_text(content.replace("{store}", str(store)).replace("{teacher}", str(edm_teacher)))
    with nothing_started(store):
        line = assert_refused(["generate", "--config", str(path)], store, *needles)
    assert len(line) < 600, line


def test_a_config_file_over_the_size_bound_is_refused_unread(tmp_path, edm_teacher):
    """A valid config padded past the bound with a comment: refused on its size (a config is a few KB)."""
    path, store = tmp_path / "c.yaml", tmp_path / "store"
    write_config(path, edm_teacher, store)
    path.write_text(path.read_text() + "# " + "x" * MAX_CONFIG_BYTES + "\n")
    with nothing_started(store):
        assert_refused(["generate", "--config", str(path)], store, "c.yaml", f"{MAX_CONFIG_BYTES} bytes", "Fix:")


def test_a_config_path_no_file_system_takes_is_refused(tmp_path):
    name = "c" * 300 + ".yaml"  # a file name over NAME_MAX: open() fails with ENAMETOOLONG
    line = assert_refused(["generate", "--config", str(tmp_path / name)], tmp_path / "store", "cannot be opened", "File name too long", "Fix:")
    assert len(line) < 400, line


def test_many_unknown_keys_give_one_bounded_line(tmp_path, edm_teacher):
    """5,000 unknown keys (a 2.5 M-key file made a 113 MB error line): a few are named, the rest counted."""
    path, store = tmp_path / "c.yaml", tmp_path / "store"
    keys = "".join(f"  unknown_{i}: {'v' * 10}\n" for i in range(5_000))
    path.write_text(HEAD.format(store=store, teacher=edm_teacher) + "generate:\n" + keys)
    with nothing_started(store):
        line = assert_refused(["generate", "--config", str(path)], store, "generate.unknown_0", "unknown key", "and 4995 more")
    assert len(line) < 1000, len(line)


SET_CASES = [
    pytest.param("generate.steps=" + "[" * 500 + "]" * 500, ("--set", f"deeper than {MAX_YAML_DEPTH}", "Fix:"), id="nesting-in-value"),
    pytest.param("generate." + ".".join(["x"] * 60) + "=1", ("--set", f"deeper than {MAX_YAML_DEPTH}", "Fix:"), id="nesting-in-key"),
    pytest.param("teacher.path=" + "t/" * 4000, ("--set", "8000 characters", "Fix:"), id="huge-path"),
    pytest.param("generate.num_samples=" + "9" * 5000, ("--set", "5000 characters", "Fix:"), id="huge-integer-value"),
    pytest.param("teacher.path=/tmp/" + "t" * 300, ("teacher.path", "longer than a file system allows", "Fix:"), id="long-file-name"),
    pytest.param("store=/tmp/" + "s" * 300, ("store", "longer than a file system allows", "Fix:"), id="long-store-name"),
    pytest.param("generate.seed=!!python/name:os.system", ("--set", "!!python/name:os.system", "not allowed", "Fix:"), id="python-tag-value"),
    pytest.param("distill.generator_timesteps=" + flow_laughs(6), ("--set", "expand", f"more than {MAX_YAML_NODES}", "Fix:"), id="alias-bomb-value"),
]


@pytest.mark.parametrize("override, needles", SET_CASES)
def test_hostile_set_value(tmp_path, edm_teacher, override, needles):
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "c.yaml", edm_teacher, store)
    with nothing_started(store):
        line = assert_refused(["generate", "--config", str(cfg), "--set", override], store, *needles)
    assert len(line) < 600, line


def test_anchors_within_the_bounds_still_load(tmp_path, edm_teacher):
    """Shared optimizer settings through an anchor, an alias and a merge: what anchors are for."""
    path = tmp_path / "c.yaml"
    path.write_text(HEAD.format(store=tmp_path / "store", teacher=edm_teacher) + (
        "distill:\n  generator_optimizer: &opt {lr: 2.0e-4, weight_decay: 0.0}\n  fake_optimizer: {<<: *opt, lr: 1.0e-4}\n"
        "evaluate:\n  num_samples: &n 3000\n  speed_batch_size: 8\n  batch_size: *n\n"
    ))  # fmt: skip
    cfg = load_config(path)
    assert cfg.distill.fake_optimizer.lr == 1e-4 and cfg.distill.fake_optimizer.weight_decay == 0.0
    assert cfg.distill.generator_optimizer.lr == 2e-4 and cfg.evaluate.batch_size == 3000
    # and a bomb that was refused there loads nothing here: the bound is on the expansion, not on anchors
    with pytest.raises(Exception, match="expand"):
        load_config(path, ["generate.prompt_column=" + flow_laughs(6)])

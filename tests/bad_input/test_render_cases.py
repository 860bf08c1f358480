"""User text rendered as data: hostile prompts, paths and config values reach the model card, the Prefect
artifacts, the grid captions and the terminal without becoming markup, code or escape sequences.

The card is built by calling the export's card writers with crafted inputs (no export runs) and parsed
with markdown-it (CommonMark plus GFM tables, as the Hub and Prefect's UI render it): no HTML, no link
or image the card does not mean to have, exactly its own headings and code blocks, and its Python snippet
holds exactly its own statements, with the prompt and the path as literals equal to the originals.
"""

from __future__ import annotations

import ast
import logging
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from markdown_it import MarkdownIt

from refusal import assert_refused

MD = MarkdownIt("commonmark").enable("table")
MD.validateLink = lambda url: True  # every link counts: markdown-it drops javascript: ones, other renderers may not
HTML = "<img src=x onerror=alert(1)><script>alert(2)</script>"
JS_LINK = "[click](javascript:alert(1)) <javascript:alert(3)>"
BREAKOUT = f"a cat\n\n```\n{HTML}\n{JS_LINK}\n# Pwned\n```"  # leaves a code span / fence, then markup
CODE = 'a seven"); import os; os.system("touch pwned"); ("'
CARD_HEADINGS = ["One-step generator (DMD)", "Metrics (evaluate stage, 80 samples over the held-out prompts)", "Training", "Use", "Files", "Resolved config"]


def walk(tokens):
    for t in tokens:
        yield t
        yield from walk(t.children or [])


def check_markdown(text: str, images: tuple[str, ...] = (), links: tuple[str, ...] = ()) -> list:
    """No raw HTML, and exactly the images and links the text means to have; returns the tokens."""
    tokens = MD.parse(text)
    every = list(walk(tokens))
    assert not [t.content[:80] for t in every if t.type in ("html_inline", "html_block")]
    assert [t.attrs["src"] for t in every if t.type == "image"] == list(images)
    assert [t.attrs["href"] for t in every if t.type == "link_open"] == list(links)
    return tokens


def headings(tokens) -> list[str]:
    return [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]


def metrics(clip: bool = True, generator: str = "generator") -> dict:
    r = {"features": "digits", "teacher_nfe": 5, "student_nfe": 1, "num_samples": 80, "teacher_fd": 1.0, "student_fd": 2.0, "fd_ratio": 2.0,
         "teacher_class_accuracy": 0.5, "student_class_accuracy": None, "teacher_images_per_s": 10.0, "student_images_per_s": 50.0,
         "speedup": 5.0, "generator": generator}  # fmt: skip
    return {**r, "teacher_clip_score": 20.0, "student_clip_score": 21.0} if clip else r


def card(prompt: str = "a digit", *, teacher: str = "teacher", store: str = "runs/store", train: str = "train.txt", held_out: str = "eval.parquet",
         clip: str = "clip", generator: str = "generator", text: bool = True) -> tuple[str, dict]:
    """The card of a crafted export (text-to-image, or class-conditional with ``text=False``) and its resolved config."""
    from stages import export
    from stages.config import load_config
    from stages.contract import FileEntry, Manifest

    cfg = load_config(None).model_copy(update={"store": store})
    pc = cfg.model_dump(mode="json")
    pc["store"], pc["teacher"]["path"] = store, teacher
    if text:
        pc["generate"]["prompts"], pc["evaluate"]["prompts"], pc["evaluate"]["clip_model"] = train, held_out, clip
    em = Manifest(stage="evaluate", key="e", code_version="v", config={}, pipeline_config=pc, upstream={}, files=[],
                  info={"metrics": metrics(text, generator)}, wall_time_s=1.0)  # fmt: skip
    out = Path(store) / "export" / "k"
    if text:
        use = export.text_to_image_use(out, prompt, "num_inference_steps=1", "`unet/` is the one-step generator.")
        info: dict = {}
    else:
        info = {"image_shape": [1, 8, 8], "data_range": [-1.0, 1.0], "output_range": [-1.0, 1.0], "onnx": {"opset": 17, "max_abs_diff": 0.0, "max_rel_diff": 0.0}}
        use = export.class_model_use(cfg, out, info)
    files = [FileEntry(name="grid.png", size=3, sha256="0" * 64), FileEntry(name="unet/config.json", size=4, sha256="1" * 64)]
    return export.model_card(cfg, em, out, info, files, use), pc


def check_card(text: str, pc: dict, clip: bool = True) -> ast.Module:
    """The card's structure is its own whatever the user text: its headings, one python and one yaml block
    (the config block loads back as the resolved config), one image, no link, no HTML; the metrics table
    keeps three cells a row. Returns the parsed Python snippet."""
    tokens = check_markdown(text, images=("grid.png",))
    want = CARD_HEADINGS if clip else [h.replace(" over the held-out prompts", "").replace("samples", "class-balanced samples") for h in CARD_HEADINGS]
    assert headings(tokens) == want
    fences = [t for t in tokens if t.type in ("fence", "code_block")]
    assert [t.info for t in fences] == ["python", "yaml"]
    assert yaml.safe_load(fences[1].content) == pc
    cells, n = [], 0
    for t in tokens:
        if t.type == "tr_open":
            n = 0
        elif t.type in ("td_open", "th_open"):
            n += 1
        elif t.type == "tr_close":
            cells.append(n)
    assert set(cells) == {3}, cells
    return ast.parse(fences[0].content)


def calls(module: ast.Module) -> list[str]:
    return [ast.unparse(n.func) for n in ast.walk(module) if isinstance(n, ast.Call)]


def t2i_snippet(module: ast.Module) -> tuple[str, str]:
    """(the path, the prompt) of the text-to-image snippet, which must be exactly its three statements."""
    imp, load, gen = module.body
    assert ast.unparse(imp) == "from diffusers import StableDiffusionPipeline"
    assert sorted(calls(module)) == ["StableDiffusionPipeline.from_pretrained", "pipe"]
    assert ast.unparse(gen.targets[0]) == "image" and ast.unparse(load.targets[0]) == "pipe"
    call = gen.value.value.value  # pipe(...).images[0]
    assert [k.arg for k in call.keywords] == ["num_inference_steps", "guidance_scale"] and len(call.args) == 1
    return ast.literal_eval(load.value.args[0]), ast.literal_eval(call.args[0])


# ---- the model card


@pytest.mark.parametrize(
    "prompt",
    [BREAKOUT, CODE, "``` ```` `````\n~~~\n" + HTML, "nul\x00 esc\x1b[2J cr\r\nline\u2028sep \u202eevil", "# heading\n**bold** _em_ | pipe |\n- list\n> quote",
     'q"' * 20_000 + "`" * 50],
    ids=["html-and-links-across-newlines", "code-injection", "fence-breakers", "control-chars", "markdown-syntax", "long-quotes-and-backticks"],
)
def test_card_prompt_is_data_in_the_snippet(prompt):
    """A held-out prompt (scraped text) is a Python string literal in the card's snippet, equal to the prompt."""
    text, pc = card(prompt)
    path, got = t2i_snippet(check_card(text, pc))
    assert got == prompt and path == str(Path("runs/store") / "export" / "k")


@pytest.mark.parametrize("store", [CODE, 'runs/"store\'\\', "runs/st\nore```" + HTML])
def test_card_store_path_is_a_literal_in_both_snippets(store):
    text, pc = card(store=store)
    path, _ = t2i_snippet(check_card(text, pc))
    assert path == str(Path(store) / "export" / "k")
    text, pc = card(store=store, text=False)
    module = check_card(text, pc, clip=False)
    assert sorted(calls(module)) == ["OneStepPipeline.from_pretrained", "pipe"] and len(module.body) == 3
    assert ast.literal_eval(module.body[1].value.args[0]) == str(Path(store) / "export" / "k")


@pytest.mark.parametrize(
    "setting",
    ["teacher", "train", "held_out", "clip", "generator"],
)
def test_card_paths_and_names_are_inert(setting):
    """Paths and names from the config (teacher, prompt files, CLIP model, generator) cannot open markup."""
    for value in ["t`" + HTML + "`" + JS_LINK, "a|b|c\\|d`|`", "x\n\n# Pwned\n\n" + JS_LINK, "``` \n```\n" + HTML]:
        text, pc = card(**{setting: value})
        check_card(text, pc)


def test_card_of_a_one_megabyte_prompt():
    prompt = ("<b>x</b> `" + "y" * 1000 + "\n") * 1000
    text, pc = card(prompt)
    assert t2i_snippet(check_card(text, pc))[1] == prompt


# ---- Prefect artifacts (built without a server)


def test_export_link_text_cannot_leave_the_link(tmp_path):
    from prefect.artifacts import LinkArtifact

    from flows.pipeline import export_link

    store = tmp_path / f"s](javascript:alert(1)) {HTML}\n\n# Pwned\x1b[2J"  # a path holds anything but NUL
    link = export_link(store / "export" / "k")
    card = (store / "export" / "k" / "README.md").resolve()
    tokens = check_markdown(LinkArtifact(**link)._format(), links=(card.as_uri(),))
    shown = "".join(t.content for t in walk(tokens) if t.type == "text")
    assert shown.startswith("model card: ") and "README.md" in shown
    assert not any(c in shown for c in "\x1b\n") and not headings(tokens)


def test_metrics_table_cells_are_escaped():
    from flows.pipeline import metrics_table

    ev = {**metrics(), "teacher_class_accuracy": HTML + JS_LINK, "student_class_accuracy": "a|b\n\n# h"}
    results = {"evaluate": {"manifest": {"info": {"metrics": ev}}}, "distill": {"manifest": {"info": {"steps": 2}, "wall_time_s": 1.0}}}
    rows = metrics_table(results, {"distill": "miss"}, {})
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {r['metric']} | {r['value']} |" for r in rows)
    tokens = check_markdown(table)
    assert sum(t.type == "td_open" for t in tokens) == 2 * len(rows) and not headings(tokens)
    assert [r["value"] for r in rows if r["metric"] == "fd_ratio"] == [2.0]  # numbers stay numbers


# ---- grid captions


@pytest.mark.parametrize(
    "caption",
    ["x" * 1_000_000, "nul\x00 esc\x1b[2J\ttab\nnewline", "lone \ud800 surrogate", "emoji \U0001f600\u200d\U0001f4bb rtl \u05e9\u05dc\u05d5\u05dd \u202eevil" + "\u0301" * 500],
    ids=["one-megabyte", "control-chars", "lone-surrogate", "emoji-rtl-combining"],
)
def test_grid_captions_never_fail(caption):
    from dmd_core.images import caption_columns, grid_image

    grid = grid_image(torch.zeros(4, 1, 8, 8), nrow=2)
    out = caption_columns(grid, [caption, ""])
    header = out.height - grid.height
    assert out.width == grid.width and 0 < header <= max(grid.height, 64) + 8
    assert np.array_equal(np.asarray(out)[header:], np.asarray(grid))


# ---- the terminal


def test_error_line_escapes_control_characters(tmp_path):
    line = assert_refused(["generate", "--config", str(tmp_path / "c\x1b[2J\x1b]0;title\x07\rx.yaml")], tmp_path / "store", "config file not found")
    assert "\x1b" not in line and "\r" not in line and "\x07" not in line and "\\x1b[2J" in line


def test_log_lines_escape_control_characters():
    from stages.cli import StderrHandler, setup_logging

    setup_logging()
    handler = next(h for h in logging.getLogger("dmd").handlers if isinstance(h, StderrHandler))
    record = logging.LogRecord("dmd", logging.INFO, __file__, 1, "cached output %s is complete", ("/s\x1b[2J\x9b31m/x",), None)
    assert handler.format(record) == "dmd: cached output /s\\x1b[2J\\x9b31m/x is complete"


def test_printed_path_is_escaped_on_a_terminal_only(capsys, monkeypatch):
    from stages.cli import guarded

    old = signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
        guarded(lambda: "/s\x1b[2J/export/k")
        assert capsys.readouterr().out == "/s\\x1b[2J/export/k\n"
        monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
        guarded(lambda: "/s\x1b[2J/export/k")  # a pipe (the flow, $(...)) gets the path itself
        assert capsys.readouterr().out == "/s\x1b[2J/export/k\n"
    finally:
        signal.signal(signal.SIGTERM, old)

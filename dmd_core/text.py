"""Prompts of text-to-image teachers: prompt files, and their embeddings through the pipeline's own
tokenizer and text encoder, as diffusers' ``StableDiffusionPipeline.encode_prompt`` computes them.

A text-conditioned denoiser holds a *prompt table*: the embeddings of N prompts plus the empty
prompt's as row N. Prompt indices then play the role class labels play for class-conditional models
(pair i uses prompt i mod N; the distribution matching term draws indices uniformly; row N is the
unconditional branch of classifier-free guidance), so the solvers, the DMD losses and the shards need
nothing text-specific (docs/math.md §3).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import InputError, shown
from .rows import PromptRows

Tensor = torch.Tensor


MAX_PROMPT_CHARS = 10_000  # far beyond what text encoders read (CLIP 77 tokens, T5 512): a longer "prompt" is a mistake
# C0 control characters and DEL, except tab, newline and carriage return (whitespace to a tokenizer)
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
_FIX_COLUMN = "Fix: write the prompts as a string column (pyarrow: pa.array(prompts, pa.string()))."


@dataclass
class PromptFile:
    """The prompts of a prompt file and, when asked for, each prompt's class label (row for row)."""

    prompts: list[str]
    labels: list[int] | None = None


def read_prompts(path: str | Path, column: str = "prompt", section: str | None = None) -> list[str]:
    """Prompts from a Parquet file (``column``) or a text file (one per line, blank lines skipped), checked."""
    return read_prompt_file(path, column, section=section).prompts


def read_prompt_file(
    path: str | Path, column: str = "prompt", labels: str | None = None, num_classes: int | None = None, section: str | None = None
) -> PromptFile:
    """Prompts (and the integer ``labels`` column, Parquet only) from one read of the file, so rows stay aligned.

    Every prompt is text of 1 to MAX_PROMPT_CHARS characters, not only whitespace, without control characters
    (tab and newline allowed); labels are non-null integers in ``[0, num_classes)``. Anything else is refused
    (InputError naming the setting, the row and the fix), never dropped or converted. ``section`` (``generate``,
    ``evaluate``) names the settings in the messages.
    """
    path = Path(path)
    where = f"{section}.prompts {shown(str(path))}" if section else f"prompt file {shown(str(path))}"
    fix_path = f"Fix: point {f'{section}.prompts' if section else 'the prompts setting'} at a .parquet file or a text file, one prompt per line."
    if path.is_dir():
        raise InputError(f"{where} is a directory. {fix_path}")
    if not path.is_file():
        raise InputError(f"{where}: no such file. {fix_path}")
    if path.suffix != ".parquet":
        if labels:
            raise InputError(f"{section or 'evaluate'}.prompt_labels={shown(labels)} needs a Parquet prompt file; {where} is text. "
                             "Fix: write the prompts and their labels as columns of a .parquet file, or drop prompt_labels.")  # fmt: skip
        return PromptFile(_read_text_prompts(path, where))
    table = _read_parquet_columns(path, [column, labels] if labels else [column], where, section)
    prompts = _checked_prompts(table.column(column), column, where)
    label_list = None
    if labels:
        label_where = f"{section}.prompt_labels: column {shown(labels)} of {where}" if section else f"label column {shown(labels)} of {where}"
        label_list = _checked_labels(table.column(labels), num_classes, label_where)
    return PromptFile(prompts, label_list)


def iter_prompts(path: str | Path, column: str = "prompt", batch: int = 1024) -> Iterator[str]:
    """The prompts of a file that ``read_prompt_file`` accepted, streamed in file order (a batch of rows at a time)."""
    path = Path(path)
    if path.suffix != ".parquet":
        with open(path, encoding="utf-8") as f:  # the lines of str.splitlines, as _read_text_prompts splits them
            yield from (q.strip() for line in f for q in line.splitlines() if q.strip())
        return
    import pyarrow.parquet as pq

    for rows in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=[column]):
        col = rows.column(0)
        yield from (col.dictionary_decode() if hasattr(col, "dictionary_decode") else col).to_pylist()


def read_label_column(path: str | Path, column: str):
    """The integer column ``column`` of a Parquet prompt file that ``read_prompt_file`` accepted, as int64 numpy."""
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[column]).column(0).to_numpy().astype("int64")


def _read_parquet_columns(path: Path, columns: list[str], where: str, section: str | None):
    """Just ``columns`` of a Parquet file (a missing one names those present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fix = f"Fix: rewrite it with pyarrow.parquet.write_table, a string column {shown(columns[0])} holding one prompt per row."
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{where} is not a readable Parquet file ({shown(str(e), 100)}). {fix}") from None
    for i, name in enumerate(columns):
        setting = f"{section}.{'prompt_column' if i == 0 else 'prompt_labels'}" if section else ("the prompt column" if i == 0 else "the label column")
        if name not in names:
            raise InputError(f"{where} has no column {shown(name)} (columns: {shown(names)}). Fix: --set {setting}=NAME, one of its columns.")
        if names.count(name) > 1:
            raise InputError(f"{where} has {names.count(name)} columns named {shown(name)}. Fix: give each column its own name.")
    try:
        return parquet.read(columns=list(dict.fromkeys(columns)))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{where} is not a readable Parquet file ({shown(str(e), 100)}). {fix}") from None


def _rows(mask) -> str:
    """'row 3 (counting from 0)' or 'rows 1, 4, 9, 10, 11 and 12 more (...)' for the true entries of a boolean Arrow column."""
    import pyarrow.compute as pc

    return _numbers("row", pc.indices_nonzero(pc.fill_null(mask, False)).to_numpy()) + " (counting from 0)"


def _checked_prompts(col, column: str, where: str) -> list[str]:
    """The prompt column as a list, after every rule of ``read_prompt_file`` held (pyarrow.compute over the column)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
        col = col.cast(t.value_type)  # dictionary-encoded strings are legal Parquet: decoded, as the text they hold
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise InputError(f"{where}: column {shown(column)} is {shown(str(t), 80)}, not string. {_FIX_COLUMN}")
    try:
        col.validate(full=True)
    except pa.ArrowInvalid:
        raise InputError(f"{where}: column {shown(column)} holds bytes that are not valid UTF-8. {_FIX_COLUMN}") from None
    if len(col) == 0:
        raise InputError(f"{where} has no prompts (0 rows). Fix: add at least one prompt.")
    keep = "Fix: give every row a prompt, or delete the row."
    if col.null_count:
        raise InputError(f"{where}: column {shown(column)} is null at {_rows(pc.is_null(col))}. {keep}")
    lengths = pc.utf8_length(col)
    blank = pc.or_(pc.equal(lengths, 0), pc.utf8_is_space(col))
    if pc.any(blank).as_py():
        raise InputError(f"{where}: empty or whitespace-only prompts at {_rows(blank)}. {keep}")
    longest = pc.max(lengths).as_py()
    if longest > MAX_PROMPT_CHARS:
        raise InputError(_too_long(where, _rows(pc.greater(lengths, MAX_PROMPT_CHARS)), longest))
    control = pc.match_substring_regex(col, CONTROL_CHARS)
    if pc.any(control).as_py():
        raise InputError(f"{where}: a control character (NUL, ESC, ...) in the prompt at {_rows(control)}. Fix: remove it (tab and newline are fine).")
    return col.to_pylist()


def _checked_labels(col, num_classes: int | None, where: str) -> list[int]:
    """The label column as a list of ints: integer-typed, non-null, in ``[0, num_classes)`` (non-negative when unknown)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_integer(col.type):
        raise InputError(f"{where} is {shown(str(col.type), 80)}; class labels must be integers. Fix: write it as an integer "
                         "column (pyarrow: pa.array(labels, pa.int64())).")  # fmt: skip
    if col.null_count:
        raise InputError(f"{where} is null at {_rows(pc.is_null(col))}. Fix: give every prompt its class.")
    bad = pc.less(col, 0) if num_classes is None else pc.or_(pc.less(col, 0), pc.greater_equal(col, num_classes))
    if pc.any(bad).as_py():
        outside = "negative labels" if num_classes is None else f"labels outside the classifier's classes [0, {num_classes})"
        raise InputError(f"{where}: {outside} at {_rows(bad)}. Fix: label each prompt with the class it names.")
    return col.to_pylist()


def _read_text_prompts(path: Path, where: str) -> list[str]:
    """One prompt per line, blank lines skipped; the Parquet rules on length and control characters (by line number)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{where} is not UTF-8 text (nor .parquet). Fix: one prompt per line, UTF-8.") from None
    lines = text.splitlines()
    control = re.compile(CONTROL_CHARS)
    if control.search(text):  # one scan in C; the line loop only names the lines
        bad = [n for n, line in enumerate(lines, 1) if control.search(line)]
        raise InputError(f"{where}: a control character (NUL, ESC, ...) on {_numbers('line', bad)}. Fix: remove it (tab is fine).")
    longest = max(map(len, lines), default=0)
    if longest > MAX_PROMPT_CHARS:
        raise InputError(_too_long(where, _numbers("line", [n for n, line in enumerate(lines, 1) if len(line) > MAX_PROMPT_CHARS]), longest))
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"{where} has no prompts. Fix: add at least one prompt, one per line.")
    return prompts


def _numbers(what: str, numbers) -> str:
    """'line 3' or 'lines 1, 4, 9, 10, 11 and 12 more': the first few of ``numbers``."""
    more = f" and {len(numbers) - 5} more" if len(numbers) > 5 else ""
    return f"{what}{'s' if len(numbers) > 1 else ''} {', '.join(str(int(n)) for n in numbers[:5])}{more}"


def _too_long(where: str, at: str, longest: int) -> str:
    return (f"{where}: a prompt over {MAX_PROMPT_CHARS} characters at {at}, the longest {longest} characters "
            "(text encoders read 77-512 tokens). Fix: shorten it.")  # fmt: skip


class PromptEncoder:
    """prompts -> {"hidden": (N, L, D)}: tokenizer padding to max length, the text encoder's last hidden state.

    A layout whose pipeline encodes more (a pooled embedding, several encoders) subclasses it: ``encode``
    returns every table its UNet reads, ``encode_null`` the unconditional row of CFG as its pipeline makes it.
    """

    def __init__(self, tokenizer, text_encoder, batch_size: int = 256):
        self.tokenizer, self.text_encoder, self.batch_size = tokenizer, text_encoder, batch_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        dev = next(self.text_encoder.parameters()).device
        out = []
        for s in range(0, len(prompts), self.batch_size):
            ids = self.tokenizer(
                prompts[s : s + self.batch_size], padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids.to(dev)  # fmt: skip
            # As diffusers' encode_prompt: an attention mask only for encoders configured to use one.
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = (ids != self.tokenizer.pad_token_id).long()
            out.append(self.text_encoder(ids, attention_mask=mask)[0])
        return {"hidden": torch.cat(out)}

    def encode_null(self) -> dict[str, Tensor]:
        """The row of CFG's unconditional branch: the empty prompt's embeddings (SD 1.x/2.x)."""
        return self.encode([""])

    def __call__(self, prompts: list[str]) -> Tensor:
        """The token embeddings of ``prompts`` (what a user's call computes first)."""
        return self.encode(prompts)["hidden"]

    def table(self, prompts: list[str]) -> PromptRows:
        """In-memory prompt rows of ``prompts`` and, as the last row, the unconditional one (small tables; a
        stage streams them from the store instead)."""
        rows, null = self.encode(list(prompts)), self.encode_null()
        return PromptRows({k: torch.cat([v, null[k]]) for k, v in rows.items()}, list(prompts))


def write_clip_tokenizer(out_dir: str | Path, words: list[str], max_length: int = 8):
    """A ``CLIPTokenizer`` whose vocabulary is exactly ``words`` (lowercase), saved to ``out_dir``.

    Written here because no tokenizer can be downloaded: CLIP's byte-pair encoding splits a word into
    characters (the last one marked ``</w>``) and applies the merges in order, so for each word the
    merges that rebuild it left to right, and every intermediate token, go into the files.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(out))
    return tokenizer

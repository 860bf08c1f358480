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
from pathlib import Path

import torch

from .errors import InputError

Tensor = torch.Tensor


def read_prompts(path: str | Path, column: str = "prompt") -> list[str]:
    """Prompts from a Parquet file (``column``) or a text file (one per line, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}. Fix: point the prompts setting at a .parquet file or a text file, one prompt per line.")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise InputError(f"prompt file {path} is not a readable Parquet file: {e}") from None
        if column not in table.column_names:
            raise InputError(f"prompt file {path} has no column {column!r} (columns: {', '.join(table.column_names)}). Fix: set the prompt column setting.")
        prompts = [str(p) for p in table.column(column).to_pylist() if p is not None]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"prompt file {path} is not UTF-8 text (nor .parquet). Fix: one prompt per line, UTF-8.") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts. Fix: add at least one prompt.")
    return prompts


def read_prompt_labels(path: str | Path, column: str) -> list[int]:
    """An integer label per prompt (e.g. the digit a prompt names) from a Parquet prompt file."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if column not in table.column_names:
        raise InputError(f"prompt file {path} has no label column {column!r} (columns: {', '.join(table.column_names)}).")
    return [int(v) for v in table.column(column).to_pylist()]


class PromptEncoder:
    """prompts -> (N, L, D) embeddings: tokenizer padding to max length, the text encoder's last hidden state."""

    def __init__(self, tokenizer, text_encoder, batch_size: int = 256):
        self.tokenizer, self.text_encoder, self.batch_size = tokenizer, text_encoder, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
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
        return torch.cat(out)

    def table(self, prompts: list[str]) -> Tensor:
        """The prompt table: embeddings of ``prompts`` and, as the last row, of the empty prompt (CFG)."""
        return self([*prompts, ""])


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

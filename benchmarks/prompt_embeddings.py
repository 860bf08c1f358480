"""Prompt embeddings: a table computed once vs encoding each batch's prompts, for SD v1.x's text encoder.

    python benchmarks/prompt_embeddings.py [--batch 64] [--repeats 5]

CLIP ViT-L/14's text tower in SD v1.5's config (123 M parameters, random weights: same cost), 77 tokens.
Prints the table's bytes per prompt and the time of one text-encoder call on a batch (this machine's
device), i.e. what distill would add per DMD iteration (two batches: DM and regression) by encoding on
the fly instead of looking rows up in the table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)  # fmt: skip


def main() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        enc = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval()
    ids = torch.randint(0, SD15_TEXT["vocab_size"], (args.batch, 77), device=device)
    with torch.no_grad():
        states = enc(ids)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            enc(ids)
        if device == "cuda":
            torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.repeats * 1e3
    per_prompt = states[0].numel() * 4
    print(json.dumps({
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "text_encoder_parameters": sum(p.numel() for p in enc.parameters()),
        "table_bytes_per_prompt_fp32": per_prompt, "table_gib_for_4096_prompts": round(4096 * per_prompt / 2**30, 3),
        "batch": args.batch, "encode_ms_per_batch": round(ms, 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

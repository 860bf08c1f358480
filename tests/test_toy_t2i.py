"""The embedded text-to-image digits teacher: prompts, the project's CLIP tokenizer, a short training run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from conftest import ROOT
from dmd_core.digits import load_digits_data
from dmd_core.digits_t2i import (
    MAX_LENGTH,
    T2ITraining,
    choose_guidance,
    digit_prompts,
    prompt_words,
    save_t2i_pipeline,
    t2i_report,
    train_toy_t2i_teacher,
    write_clip_tokenizer,
)

TINY = dict(vae_steps=6, vae_batch_size=16, steps=6, batch_size=16, warmup=2)


@pytest.fixture()
def one_thread():
    """Bit-identical runs need the same reduction order: one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [train_toy_t2i_teacher(T2ITraining(**TINY), progress=False) for _ in range(2)]
    finally:
        torch.set_num_threads(before)
    out = save_t2i_pipeline(runs[0][0], tmp_path_factory.mktemp("t2i") / "teacher")
    return out, runs


def test_prompt_splits_are_disjoint_and_cover_every_digit():
    train, held_out = digit_prompts("train"), digit_prompts("eval")
    assert len(train) == 50 and len(held_out) == 30
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    assert {d for _, d in train} == {d for _, d in held_out} == set(range(10))
    assert [d for _, d in held_out] == [i % 10 for i in range(30)]  # class-balanced when cycled
    assert set(w for p, _ in held_out for w in p.split()) <= set(w for p, _ in train for w in p.split())  # same vocabulary


def test_tokenizer_knows_every_word_and_round_trips(tmp_path):
    tok = write_clip_tokenizer(tmp_path, prompt_words(), max_length=MAX_LENGTH)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (bos, eos, tok.pad_token_id) == (0, 1, 1)
    assert tok("", padding="max_length", max_length=MAX_LENGTH).input_ids == [bos] + [eos] * (MAX_LENGTH - 1)
    prompts = [p for p, _ in digit_prompts("train") + digit_prompts("eval")]
    for p in prompts:
        assert tok.tokenize(p) == [w + "</w>" for w in p.split()]  # one known token per word, never split
        ids = tok(p, padding="max_length", max_length=MAX_LENGTH).input_ids
        n = len(p.split())
        assert ids[0] == bos and all(i > eos for i in ids[1 : n + 1]) and ids[n + 1 :] == [eos] * (MAX_LENGTH - n - 1)
    assert tok.tokenize("The Digit SEVEN") == ["the</w>", "digit</w>", "seven</w>"]  # lower-cased by the tokenizer
    again = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again(prompts, padding="max_length", max_length=MAX_LENGTH).input_ids == tok(prompts, padding="max_length", max_length=MAX_LENGTH).input_ids


def test_short_run_saves_a_stable_diffusion_pipeline_that_loads_offline(short_run, no_network):
    from diffusers import StableDiffusionPipeline

    out, runs = short_run
    assert {"model_index.json", "vae", "text_encoder", "tokenizer", "unet", "scheduler"} <= {p.name for p in out.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (out / "tokenizer").iterdir()}
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2 and type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    with torch.no_grad():
        img = pipe(prompt=["the digit 7"], num_inference_steps=3, guidance_scale=2.0, height=8, width=8, output_type="pt").images
        lat = pipe(prompt=["seven"], num_inference_steps=3, guidance_scale=1.0, height=8, width=8, output_type="latent").images
    assert img.shape == (1, 1, 8, 8) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert lat.shape == (1, 4, 4, 4) and torch.isfinite(lat).all()
    prompts = [p for p, _ in digit_prompts("eval")]
    fresh = write_clip_tokenizer(out.parent / "fresh-tokenizer", prompt_words())
    assert pipe.tokenizer(prompts).input_ids == fresh(prompts).input_ids
    info = runs[0][1]
    json.dumps(info)  # goes to <out>-training.json
    assert info["training"]["steps"] == TINY["steps"] and info["vae"]["held_out_reconstruction"]["num_images"] == 359


def test_scaling_factor_is_one_over_the_latent_std(short_run):
    from diffusers import AutoencoderKL

    out, runs = short_run
    vae = AutoencoderKL.from_pretrained(str(out / "vae"), local_files_only=True)
    images, _ = load_digits_data()
    with torch.no_grad():
        std = vae.encode(images).latent_dist.mean.std().item()
    assert vae.config.scaling_factor == pytest.approx(1.0 / std, rel=1e-5)
    assert vae.config.scaling_factor == pytest.approx(runs[0][1]["vae"]["scaling_factor"], rel=1e-7)


def test_same_seed_same_weights(short_run):
    (pipe_a, info_a), (pipe_b, info_b) = short_run[1]
    for a, b in ((pipe_a.unet, pipe_b.unet), (pipe_a.vae, pipe_b.vae), (pipe_a.text_encoder, pipe_b.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert info_a["unet_final_loss_mean_last_200"] == info_b["unet_final_loss_mean_last_200"]


def test_report_scores_held_out_prompts(short_run):
    out, _ = short_run
    r = t2i_report(out, ROOT / "data" / "classifier", guidance_scale=2.0, num_samples=60, steps=3)
    assert (r["solver"], r["nfe"], r["num_samples"]) == ("plms-3", 4, 60)
    assert 0.0 <= r["prompt_accuracy"] <= 1.0 and r["fd_digits"] > 0
    assert set(r["prompt_accuracy_by_template"]) == {"handwritten {d}", "the digit {word}", "a {d}"}


def test_guidance_choice_needs_accuracy_then_takes_the_best_fd():
    sweep = [{"guidance_scale": 1.0, "fd_digits": 2.0, "prompt_accuracy": 0.85},
             {"guidance_scale": 2.0, "fd_digits": 3.0, "prompt_accuracy": 0.95},
             {"guidance_scale": 3.0, "fd_digits": 4.0, "prompt_accuracy": 0.97}]  # fmt: skip
    assert choose_guidance(sweep) == 2.0
    assert choose_guidance(sweep, min_accuracy=0.99) == 3.0  # none qualifies: the most accurate


def test_make_teacher_t2i_writes_folder_and_training_json(tmp_path, monkeypatch, one_thread):
    from stages import toy

    monkeypatch.setattr(toy, "T2ITraining", lambda steps, seed: T2ITraining(**{**TINY, "steps": steps, "seed": seed}))
    out = Path(toy.make_teacher(tmp_path / "teacher-t2i", steps=4, seed=1, classifier_dir=None, kind="t2i"))
    info = json.loads((tmp_path / "teacher-t2i-training.json").read_text())
    assert (out / "model_index.json").is_file() and toy.is_t2i_folder(out)
    assert info["kind"] == "t2i" and info["training"]["steps"] == 4 and info["training"]["seed"] == 1
    assert not (tmp_path / "teacher-t2i-quality.json").exists()  # no classifier given

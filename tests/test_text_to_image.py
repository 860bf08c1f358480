"""Text-to-image (Stable Diffusion layout) teachers: loading, prompt files, pairs against diffusers' own pipeline."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from conftest import make_tiny_clip, write_config
from dmd_core.errors import InputError
from dmd_core.loading import read_parametrization
from dmd_core.text import PromptEncoder, read_prompts
from stages import chain
from stages.config import load_config
from stages.contract import pair_prompts

PROMPTS = ["the digit 7", "a handwritten seven", "3"]


def read_pairs(out: Path) -> list[dict]:
    samples = []
    for shard in sorted(out.glob("pairs-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            samples.append({
                "noise": np.load(io.BytesIO(s["noise.npy"])), "image": np.load(io.BytesIO(s["image.npy"])),
                "index": int(s["cls.txt"]), "prompt": s["prompt.txt"].decode(),
            })  # fmt: skip
    return samples


def test_stable_diffusion_folder_is_a_text_to_image_teacher(sd_teacher):
    p = read_parametrization(sd_teacher)
    assert (p.kind, p.text_conditioned, p.num_classes, p.image_shape, p.prediction_type) == ("vp", True, 0, (4, 4, 4), "epsilon")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pairs_equal_diffusers_stable_diffusion_pipeline(tmp_path, sd_teacher, guidance):
    """The stored image latent = StableDiffusionPipeline(prompt, latents=z, 50 PLMS steps, guidance g, output_type="latent")."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", solver="pndm", steps=50, num_samples=6, shard_size=6,
                       prompts=str(tmp_path / "prompts.txt"), guidance_scale=guidance)  # fmt: skip
    m = chain.run(load_config(cfg), "generate", progress=False).manifest
    pairs = read_pairs(Path(load_config(cfg).store) / "generate" / m.key)
    assert [s["index"] for s in pairs] == [i % 3 for i in range(6)] and [s["prompt"] for s in pairs] == [PROMPTS[i % 3] for i in range(6)]
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_teacher))
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    z = torch.from_numpy(np.stack([s["noise"] for s in pairs]))
    with torch.no_grad():
        want = pipe([s["prompt"] for s in pairs], latents=z, num_inference_steps=50, guidance_scale=guidance, output_type="latent").images
    got = torch.from_numpy(np.stack([s["image"] for s in pairs]))
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\n  b  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a", "b"]
    pq.write_table(pa.table({"caption": ["x", "y"], "digit": [1, 2]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet", "caption") == ["x", "y"]
    with pytest.raises(InputError, match="no column 'prompt'.*'caption', 'digit'"):
        read_prompts(tmp_path / "p.parquet")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InputError, match="has no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="missing.txt'?: no such file"):
        read_prompts(tmp_path / "missing.txt")


def test_text_teacher_needs_prompts_and_others_refuse_them(tmp_path, sd_teacher, vp_teacher):
    from stages import chain

    cfg = write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", solver="pndm")
    with pytest.raises(InputError, match="text-to-image: generate.prompts must name a prompt file"):
        chain.plan(load_config(cfg), "generate")
    (tmp_path / "p.txt").write_text("7\n")
    cfg = write_config(tmp_path / "c.yaml", vp_teacher, tmp_path / "store", solver="pndm", prompts=str(tmp_path / "p.txt"))
    with pytest.raises(InputError, match="not text-conditioned"):
        chain.plan(load_config(cfg), "generate")


def test_dm_term_guides_the_real_score_only(sd_teacher):
    """d loss_DM / dx by hand: real = CFG of the text-conditioned teacher (empty prompt as the null branch), fake unguided."""
    import copy

    from dmd_core.dmd import DistributionMatchingLoss, DMDSettings, SampleRNG, dm_timestep_range
    from dmd_core.loading import load_denoiser, load_prompt_encoder

    torch.manual_seed(0)
    real = load_denoiser(sd_teacher)
    table = load_prompt_encoder(sd_teacher).table(PROMPTS)
    real.set_prompts(table)
    fake = copy.deepcopy(real)
    with torch.no_grad():
        for p in fake.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g, labels = 3.0, torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 4, 4, 4, requires_grad=True)
    settings = DMDSettings(guidance_scale=g)
    DistributionMatchingLoss(settings)(x, labels, real, fake, SampleRNG(0, 0, 0, range(4))).backward()

    rng = SampleRNG(0, 0, 0, range(4))  # the same draws, replayed
    t = rng.randint(*dm_timestep_range(settings))
    eps = rng.randn((4, 4, 4))
    abar = real.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    xd = x.detach().double()
    x_t = (a * xd + s * eps.double()).float()
    hidden = table.parts["hidden"]
    cond, null = hidden[labels], hidden[-1:].expand(4, -1, -1)

    def x0(net, emb):
        with torch.no_grad():
            return (x_t.double() - s * net.unet(x_t, t, encoder_hidden_states=emb).sample.double()) / a

    real_u, real_c, fake_c, fake_u = x0(real, null), x0(real, cond), x0(fake, cond), x0(fake, null)

    def grad(p_real, p_fake):
        w = (xd - p_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        return ((p_fake - p_real) / w / xd.numel()).float()

    want = grad(real_u + g * (real_c - real_u), fake_c)
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-7)
    # the two mistakes this guards against give other gradients
    for wrong in (grad(real_c, fake_c), grad(real_u + g * (real_c - real_u), fake_u + g * (fake_c - fake_u))):
        assert float((wrong - want).abs().max()) > 100 * float((x.grad - want).abs().max())


def test_text_distill_runs_and_saves_a_text_generator(tmp_path, sd_teacher):
    import json

    from dmd_core.loading import load_denoiser

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config(write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", distill={"steps": 2, "guidance_scale": 3.0},
                                   solver="pndm", steps=4, num_samples=8, shard_size=8, prompts=str(tmp_path / "prompts.txt")))  # fmt: skip
    m = chain.run(cfg, "distill", progress=False).manifest
    out = Path(cfg.store) / "distill" / m.key
    spec = json.loads((out / "generator" / "denoiser.json").read_text())
    assert spec["text_conditioned"] and spec["one_step_timestep"] == 500
    assert load_denoiser(out / "generator").unet.__class__.__name__ == "UNet2DConditionModel"
    assert (out / "samples.png").is_file()


@pytest.fixture(scope="module")
def exported_t2i(tmp_path_factory, sd_teacher):
    from conftest import ROOT

    tmp = tmp_path_factory.mktemp("t2i")
    (tmp / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    pq.write_table(pa.table({"prompt": ["the digit 3", "seven", "a handwritten 7"], "digit": [3, 7, 7]}), tmp / "eval.parquet")
    cfg = write_config(tmp / "c.yaml", sd_teacher, tmp / "store", distill={"steps": 2, "guidance_scale": 3.0},
                       solver="pndm", steps=4, num_samples=8, shard_size=8, prompts=str(tmp / "train.txt"))  # fmt: skip
    overrides = [f"evaluate.prompts={tmp / 'eval.parquet'}", "evaluate.prompt_labels=digit", "evaluate.num_samples=80", "evaluate.batch_size=40",
                 "evaluate.features=digits", f"evaluate.classifier={ROOT / 'data' / 'classifier'}", "evaluate.speed_batch_size=4",
                 "evaluate.speed_repeats=1", "export.parity_samples=4", f"evaluate.clip_model={make_tiny_clip(tmp / 'clip')}"]  # fmt: skip
    c = load_config(cfg, overrides)
    # every PromptEncoder.encode call's prompt count, while distill is first stopped by a full disk and rerun
    calls: list[int] = []
    real = PromptEncoder.encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PromptEncoder, "encode", lambda self, prompts: calls.append(len(prompts)) or real(self, prompts))
        mp.setenv("DMD_FAULT", "distill.before-manifest:1:enospc")
        with pytest.raises(InputError, match="disk full"):
            chain.run(c, "distill", progress=False)
        mp.delenv("DMD_FAULT")
        m = chain.run(c, "export", progress=False).manifest
    ENCODED[tmp] = calls
    return c, m


ENCODED: dict = {}


def test_prompts_are_encoded_once_across_stages_and_a_resumed_distill(exported_t2i):
    """Generate encodes the empty row and the 3 training prompts once; distill and its rerun after the crash
    encode nothing; evaluate encodes the empty row and the 3 held-out prompts once. Then evaluate's speed
    comparison times a user's call, prompt encoding included (4 prompts, once per sampler), and export's
    parity check encodes its 4 prompts and the empty row as the exported pipeline will. Before all of it, distill's
    memory plan probes the real score once per store and device with a one-prompt table (the empty prompt, and the
    unconditional row)."""
    c, _ = exported_t2i
    (calls,) = [v for k, v in ENCODED.items() if str(k) in c.store]
    assert calls == [1, 1, 1, len(PROMPTS), 1, 3, 4, 4, 4, 1], str(calls)


def test_evaluate_decodes_latents_and_scores_prompts(exported_t2i):
    c, m = exported_t2i
    r = m.info["metrics"]
    assert r["teacher_nfe"] == 5 and r["student_nfe"] == 1
    # the digits classifier saw decoded 1x8x8 images; accuracy is against the digit each prompt names
    assert 0.0 <= r["student_class_accuracy"] <= 1.0 and r["student_fd"] > 0
    # speed: measured, not compared (a loaded machine times anything); benchmarks/ holds the speed numbers
    speeds = [r["teacher_images_per_s"], r["student_images_per_s"]]
    assert all(math.isfinite(v) and v > 0 for v in speeds) and r["speedup"] == pytest.approx(speeds[1] / speeds[0], rel=1e-12)
    # CLIP score of both samplers' decoded images against their prompts (the tiny CLIP: random weights)
    assert 0.0 <= r["student_clip_score"] <= 100.0 and 0.0 <= r["teacher_clip_score"] <= 100.0
    assert r["student_clip_score"] != r["teacher_clip_score"]
    card = (Path(c.store) / "export" / m.key / "README.md").read_text()
    assert f"| {r['teacher_clip_score']:.2f} | {r['student_clip_score']:.2f} |" in card


def test_clip_score_is_the_mean_cosine_of_matching_pairs(tmp_path):
    """100 * mean cos(image embedding, embedding of the image's own prompt), by hand with the same CLIP."""
    from transformers import CLIPModel, CLIPProcessor

    from dmd_core.metrics import make_clip_score, to_uint8_rgb

    clip_dir = make_tiny_clip(tmp_path / "clip")
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["the digit 7", "a handwritten seven", "3", "the digit three"]
    u8 = to_uint8_rgb(x)
    assert u8.dtype == torch.uint8 and u8.shape == (4, 3, 8, 8) and int(u8[0, 0, 0, 0]) == round((float(x[0, 0, 0, 0]) + 1) * 127.5)
    model, proc = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        fi = model.get_image_features(pixel_values=proc(images=list(u8), return_tensors="pt")["pixel_values"]).pooler_output
        ft = model.get_text_features(**proc(text=prompts, return_tensors="pt", padding=True)).pooler_output
    cos = torch.nn.functional.cosine_similarity(fi, ft)
    want = 100 * float(cos.mean())
    assert want > 5  # not clamped

    def score(texts):
        metric = make_clip_score(clip_dir)
        metric.update(u8, texts)
        return float(metric.compute())

    assert score(prompts) == pytest.approx(want, abs=1e-3)
    assert abs(score(prompts[1:] + prompts[:1]) - want) > 0.5  # pairing matters


def test_clip_model_is_checked(tmp_path, exported_t2i, edm_teacher):
    from stages import chain

    c, _ = exported_t2i
    bad = c.model_copy(update={"evaluate": c.evaluate.model_copy(update={"clip_model": str(tmp_path / "nope")})})
    with pytest.raises(InputError, match="not a local CLIP model directory"):
        chain.plan(bad, "evaluate")
    with pytest.raises(InputError, match="evaluate.clip_model scores images against their prompts"):
        load_config(write_config(tmp_path / "e.yaml", edm_teacher, tmp_path / "store"), [f"evaluate.clip_model={tmp_path}"])


def test_export_is_a_plain_stable_diffusion_pipeline(exported_t2i):
    """StableDiffusionPipeline.from_pretrained(export)(prompt, num_inference_steps=1, guidance_scale=1, latents=z) = G(z, prompt)."""
    from diffusers import StableDiffusionPipeline

    from dmd_core.dmd import OneStep
    from dmd_core.loading import load_denoiser, load_prompt_encoder

    c, m = exported_t2i
    out = Path(c.store) / "export" / m.key
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["the digit 3", "seven", "3 seven"]
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pipe(prompts, latents=z, num_inference_steps=1, guidance_scale=1.0, output_type="latent").images
        gen = load_denoiser(out / "unet")
        gen.set_prompts(load_prompt_encoder(out).table(prompts))
        want = OneStep.of(gen)(gen, z, torch.arange(3))
    assert pipe.scheduler.timesteps.tolist() == [gen.param.one_step_timestep]
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5


def test_k_step_export_is_a_plain_stable_diffusion_pipeline(tmp_path, sd_teacher):
    """A 2-step text-to-image generator exports with diffusers' LCMScheduler: pipe(prompts, num_inference_steps=2,
    generator=g) = MultiStep with the later noise drawn from g in diffusers' order; evaluate counts 2 evaluations."""
    from diffusers import StableDiffusionPipeline

    from conftest import ROOT
    from dmd_core.dmd import MultiStep
    from dmd_core.loading import load_denoiser, load_prompt_encoder

    (tmp_path / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    pq.write_table(pa.table({"prompt": ["the digit 3", "seven"], "digit": [3, 7]}), tmp_path / "eval.parquet")
    cfg = write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", distill={"steps": 2, "generator_timesteps": [999, 499], "regression_weight": 0.0},
                       solver="pndm", steps=4, num_samples=8, shard_size=8, prompts=str(tmp_path / "train.txt"))  # fmt: skip
    c = load_config(cfg, [f"evaluate.prompts={tmp_path / 'eval.parquet'}", "evaluate.num_samples=80", "evaluate.batch_size=40", "evaluate.features=digits",
                          f"evaluate.classifier={ROOT / 'data' / 'classifier'}", "evaluate.speed_batch_size=2", "evaluate.speed_repeats=1", "export.parity_samples=3"])  # fmt: skip
    m = chain.run(c, "export", progress=False).manifest
    assert m.info["metrics"]["student_nfe"] == 2 and m.info["network_evaluations"] == 2
    assert m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5
    out = Path(c.store) / "export" / m.key
    assert "num_inference_steps=2" in (out / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["the digit 3", "seven", "3 seven"]
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pipe(prompts, latents=z, num_inference_steps=2, guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(9)).images
        gen = load_denoiser(out / "unet")
        gen.set_prompts(load_prompt_encoder(out).table(prompts))
        g = torch.Generator().manual_seed(9)
        want = MultiStep.of(gen)(gen, z, torch.arange(3), lambda j: torch.randn(z.shape, generator=g))
        one = MultiStep.of(gen).first(gen, z, torch.arange(3))
    assert pipe.scheduler.timesteps.tolist() == [999, 499]
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((got - one).abs().max()) > 1e-3  # the second step did something


def test_memory_options_keep_the_step(tmp_path, sd_teacher):
    """Gradient checkpointing changes memory, not the update: same generator weights after 2 steps."""
    from safetensors.torch import load_file


    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    base = write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", distill={"steps": 2, "ema_decay": 0.0},
                        solver="pndm", steps=4, num_samples=8, shard_size=8, prompts=str(tmp_path / "prompts.txt"))  # fmt: skip
    weights = []
    for overrides in ([], ["distill.gradient_checkpointing=true"]):
        cfg = load_config(base, overrides)
        m = chain.run(cfg, "distill", progress=False).manifest
        weights.append(load_file(str(Path(cfg.store) / "distill" / m.key / "generator" / "diffusion_pytorch_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]) <= 1e-6
    cfg = load_config(base, ["distill.frozen_dtype=float16"])
    with pytest.raises(InputError, match="frozen_dtype=float16 needs a CUDA GPU"):
        chain.run(cfg, "distill", progress=False).manifest


def test_lpips_on_decoded_images_reaches_the_latents(sd_teacher):
    """DecodedLoss = l(decode(x), decode(y)); its gradient flows through the frozen decoder into x only."""
    from dmd_core.loading import latent_decoder
    from dmd_core.losses import DecodedLoss, l2_loss

    decode = latent_decoder(sd_teacher)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    y = torch.randn(2, 4, 4, 4, requires_grad=True)
    loss = DecodedLoss(l2_loss, decode)(x, y)
    x2 = x.detach().clone().requires_grad_(True)
    want = l2_loss(decode(x2), decode(y).detach())
    torch.testing.assert_close(loss, want)
    loss.backward()
    want.backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert float(x.grad.abs().sum()) > 0 and y.grad is None
    resized = DecodedLoss(l2_loss, decode, size=4)(x, y)
    assert float(resized) != float(loss)


def test_a_cached_stable_diffusion_repo_id_is_a_teacher(tmp_path, sd_teacher):
    """teacher.path=org/name of a StableDiffusionPipeline in the HF cache layout, offline, as SD v1.5 would be."""
    import json
    import shutil

    from conftest import run_cli

    repo = tmp_path / "hub" / "models--tiny-org--sd-digits"
    rev = "89abcdef0123456789abcdef0123456789abcdef"
    shutil.copytree(sd_teacher, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    (tmp_path / "p.txt").write_text("7\nthe digit 3\n")
    cfg = write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", solver="pndm", num_samples=4, shard_size=4, steps=3, prompts=str(tmp_path / "p.txt"))
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("generate", "--config", str(cfg), "--set", "teacher.path=tiny-org/sd-digits", "-q", env=env)
    out = Path(proc.stdout.strip().splitlines()[-1])
    m = json.loads((out / "manifest.json").read_text())
    assert m["info"]["teacher_path"].endswith(rev) and m["info"]["num_prompts"] == 2
    texts = pair_prompts(out)
    assert [texts[i] for i in range(len(texts))] == ["7", "the digit 3"]


def test_prompt_settings_change_no_key_without_prompts(tmp_path, edm_teacher, sd_teacher):
    """Prompt settings enter the keys only with a prompt file: other configs keep their cached outputs."""
    from stages import chain

    cfg = write_config(tmp_path / "c.yaml", edm_teacher, tmp_path / "store")
    keys = {chain.plan(load_config(cfg, o), "generate").key for o in ([], ["generate.prompt_column=caption"])}
    assert len(keys) == 1
    pq.write_table(pa.table({"prompt": ["7"], "caption": ["3"]}), tmp_path / "p.parquet")
    cfg = write_config(tmp_path / "t.yaml", sd_teacher, tmp_path / "store", solver="pndm", prompts=str(tmp_path / "p.parquet"))
    keys = {chain.plan(load_config(cfg, o), "generate").key for o in ([], ["generate.prompt_column=caption"])}
    assert len(keys) == 2


def test_grid_captions_sit_above_their_columns():
    from dmd_core.images import caption_columns, grid_image

    grid = grid_image(torch.zeros(20, 1, 8, 8), nrow=10)  # mid-grey cells, white padding
    out = caption_columns(grid, [f"prompt {i}" for i in range(10)])
    a, g = np.asarray(out), np.asarray(grid)
    header = out.height - grid.height
    assert header > 30 and out.width == grid.width
    assert np.array_equal(a[header:], g)  # the grid itself is unchanged, below the captions
    cell = (grid.width - 2) / 10
    for i in range(10):  # ink inside each column's span, none on the padding between columns
        assert (a[:header, round(2 + i * cell) : round(2 + (i + 1) * cell - 2)] < 128).any()
        assert (a[:header, round(i * cell) : round(i * cell) + 2] > 200).all()


def test_frozen_vae_in_bfloat16_decodes_to_float32(sd_teacher):
    """distill.frozen_dtype also casts the VAE: images come back float32, within bfloat16's precision of float32's."""
    from dmd_core.loading import latent_decoder

    z = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = latent_decoder(sd_teacher)(z)
        half = latent_decoder(sd_teacher, dtype=torch.bfloat16)(z)
    assert half.dtype == torch.float32 and half.shape == full.shape == (4, 1, 8, 8)
    err = float((half - full).abs().max()) / float(full.abs().max())
    assert 0 < err < 0.05  # bfloat16 changed the numbers, within its 8-bit mantissa


def test_text_distill_without_regression_reads_the_prompt_file(tmp_path, sd_teacher):
    """No pairs: the prompt table comes from generate.prompts, and generate does not run."""

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = load_config(write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", distill={"steps": 2, "regression_weight": 0.0},
                                   solver="pndm", steps=4, prompts=str(tmp_path / "prompts.txt")))  # fmt: skip
    m = chain.run(cfg, "distill", progress=False).manifest
    assert not (tmp_path / "store" / "generate").exists() and m.upstream["prompts"].endswith(":prompt")

"""SDXL teachers (StableDiffusionXLPipeline folders): two text encoders, pooled embeddings, size conditioning;
pairs, the DM gradient and the exports against diffusers' own StableDiffusionXLPipeline as the oracle."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, SD_WORDS, diffusers_pipeline, export_of_chain, generate_prompt_pairs, make_tiny_clip, text_to_image_chain, tiny_vae, write_config
from dmd_core.errors import InputError
from dmd_core.layouts import StableDiffusionXLLayout, detect
from dmd_core.loading import load_denoiser, load_prompt_encoder, read_parametrization
from stages import chain
from stages.config import load_config

PROMPTS = ["the digit 7", "a handwritten seven", "3"]
ADD_DIM, POOLED = 4, 8  # addition_time_embed_dim, text_encoder_2's projection_dim


def make_sdxl_teacher(path: Path, seed: int = 0, force_zeros: bool = True) -> Path:
    """A tiny SDXL pipeline (random weights): two CLIP encoders (16 wide each, the second projected to 8), a UNet with
    SDXL's text_time conditioning (8 + 6 x 4 inputs), 1x8x8 images as 4x4x4 latents, SD's schedule (PLMS)."""
    from diffusers import PNDMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dmd_core.text import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(path.parent / f"{path.name}-tokenizer", SD_WORDS, max_length=8)
    torch.manual_seed(seed)
    clip = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    text, text_2 = CLIPTextModel(CLIPTextConfig(**clip)), CLIPTextModelWithProjection(CLIPTextConfig(**clip, projection_dim=POOLED))
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
        addition_embed_type="text_time", addition_time_embed_dim=ADD_DIM, projection_class_embeddings_input_dim=POOLED + 6 * ADD_DIM,
    )  # fmt: skip
    vae = tiny_vae(scaling_factor=0.13025)  # SDXL's VAE scale
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=sched,
        force_zeros_for_empty_prompt=force_zeros,
    )  # fmt: skip
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory) -> Path:
    return make_sdxl_teacher(tmp_path_factory.mktemp("teacher") / "sdxl")


def sdxl_pipe(folder: Path):
    from diffusers import PNDMScheduler

    pipe = diffusers_pipeline(folder)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    return pipe


# ---------------------------------------------------------------- the layout


def test_sdxl_folder_is_a_size_conditioned_text_to_image_teacher(sdxl_teacher):
    assert isinstance(detect(sdxl_teacher), StableDiffusionXLLayout)
    p = read_parametrization(sdxl_teacher)
    assert (p.kind, p.text_conditioned, p.image_shape, p.prediction_type) == ("vp", True, (4, 4, 4), "epsilon")
    assert p.add_time_ids == (8, 8, 0, 0, 8, 8)  # the image's (H, W) twice, no crop: the pipeline's defaults


@pytest.mark.parametrize("force_zeros", [True, False])
def test_prompt_rows_equal_the_pipelines_encode_prompt(tmp_path, sdxl_teacher, force_zeros):
    """Both encoders' penultimate states side by side, the second's pooled projection; the unconditional row is zeros
    under force_zeros_for_empty_prompt, else the empty prompt's embeddings, as the pipeline makes them."""
    folder = sdxl_teacher if force_zeros else make_sdxl_teacher(tmp_path / "sdxl", force_zeros=False)
    rows = load_prompt_encoder(folder).table(PROMPTS).rows(range(4))
    assert rows["hidden"].shape == (4, 8, 32) and rows["pooled"].shape == (4, POOLED)
    with torch.no_grad():
        hidden, neg, pooled, neg_pooled = sdxl_pipe(folder).encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(rows["hidden"][:3], hidden) and torch.equal(rows["pooled"][:3], pooled)
    # encoded alone, the pipeline's in a batch of 3: the same up to the matmul's batch-size rounding
    torch.testing.assert_close(rows["hidden"][3], neg[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(rows["pooled"][3], neg_pooled[0], rtol=0, atol=1e-6)
    assert bool((neg == 0).all()) == force_zeros


def test_layout_checks_widths_and_refuses_the_refiner(tmp_path, sdxl_teacher):
    import shutil

    def edited(name: str, rel: str, **changes) -> Path:
        t = shutil.copytree(sdxl_teacher, tmp_path / name)
        cfg = json.loads((t / rel).read_text())
        (t / rel).write_text(json.dumps({**cfg, **changes}))
        return t

    with pytest.raises(InputError, match=r"cross_attention_dim 40 but the text encoders' hidden sizes are 16 \+ 16 = 32"):
        read_parametrization(edited("width", "unet/config.json", cross_attention_dim=40))
    with pytest.raises(InputError, match=r"projection_class_embeddings_input_dim 36 but text_encoder_2's projection_dim 8 \+ 6 x"):
        read_parametrization(edited("added", "unet/config.json", projection_class_embeddings_input_dim=36))
    with pytest.raises(InputError, match="SDXL refiner.*out of scope"):  # original size, crop, aesthetic score: 5 numbers
        read_parametrization(edited("refiner-unet", "unet/config.json", projection_class_embeddings_input_dim=POOLED + 5 * ADD_DIM))
    with pytest.raises(InputError, match="SDXL refiner.*out of scope.*StableDiffusionXLPipeline"):
        read_parametrization(edited("refiner", "model_index.json", _class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None],
                                    tokenizer=[None, None], requires_aesthetics_score=True))  # fmt: skip
    with pytest.raises(InputError, match="SDXL pipeline folder without text_encoder_2/"):
        t = shutil.copytree(sdxl_teacher, tmp_path / "no-te2")
        shutil.rmtree(t / "text_encoder_2")
        read_parametrization(t)
    # an SD 1.x folder holding an SDXL UNet is pointed at the SDXL layout
    with pytest.raises(InputError, match="addition_embed_type 'text_time'.*StableDiffusionXLPipeline folder"):
        read_parametrization(edited("sd", "model_index.json", _class_name="StableDiffusionPipeline", text_encoder_2=[None, None], tokenizer_2=[None, None]))


def test_latent_codec_reads_the_vae_scale_and_statistics(tmp_path, sdxl_teacher):
    """Decode = vae.decode(z * std / scaling_factor + mean), as the pipeline does; encode is its inverse on the means."""
    import shutil

    from diffusers import AutoencoderKL

    layout = detect(sdxl_teacher)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    vae = AutoencoderKL.from_pretrained(str(sdxl_teacher / "vae"))
    with torch.no_grad():
        assert torch.equal(layout.pixel_decoder(sdxl_teacher)(z), vae.decode(z / 0.13025).sample)
        t = shutil.copytree(sdxl_teacher, tmp_path / "stats")
        cfg = json.loads((t / "vae" / "config.json").read_text())
        mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.5, 1.0, 2.0]
        (t / "vae" / "config.json").write_text(json.dumps({**cfg, "latents_mean": mean, "latents_std": std}))
        m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
        torch.testing.assert_close(layout.pixel_decoder(t)(z), vae.decode(z * s / 0.13025 + m).sample)
        x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
        torch.testing.assert_close(layout.encode_pixels(t, x), (vae.encode(x).latent_dist.mean - m) * 0.13025 / s)


# ---------------------------------------------------------------- pairs = StableDiffusionXLPipeline


SIZES = {"original_size": [16, 12], "crop_top_left": [2, 1], "target_size": [8, 6]}


@pytest.mark.parametrize("guidance, teacher", [(1.0, {}), (5.0, {}), (5.0, {"guidance_rescale": 0.7, **SIZES})], ids=["g1", "g5", "g5-rescale-sizes"])
def test_pairs_equal_diffusers_sdxl_pipeline(tmp_path, sdxl_teacher, guidance, teacher):
    """The stored image latent = StableDiffusionXLPipeline(prompt, latents=z, 50 PLMS steps, guidance g, output_type="latent")
    (with teacher.guidance_rescale / sizes: the pipeline's guidance_rescale, original_size, crops_coords_top_left, target_size)."""
    overrides = [f"teacher.{k}={json.dumps(v)}" for k, v in teacher.items()]
    c, m, pairs = generate_prompt_pairs(tmp_path, sdxl_teacher, PROMPTS, overrides, solver="pndm", steps=50, num_samples=6, shard_size=6,
                                        guidance_scale=guidance)  # fmt: skip
    if teacher:  # the settings are in the key: another output than the defaults'
        assert m.key != chain.plan(load_config(tmp_path / "c.yaml"), "generate").key
    assert [s["index"] for s in pairs] == [i % 3 for i in range(6)]
    call = {"guidance_rescale": teacher.get("guidance_rescale", 0.0)}
    if "original_size" in teacher:
        call.update(original_size=tuple(SIZES["original_size"]), crops_coords_top_left=tuple(SIZES["crop_top_left"]), target_size=tuple(SIZES["target_size"]))
    z = torch.from_numpy(np.stack([s["noise"] for s in pairs]))
    with torch.no_grad():
        want = sdxl_pipe(sdxl_teacher)([PROMPTS[s["index"]] for s in pairs], latents=z, num_inference_steps=50, guidance_scale=guidance,
                                       output_type="latent", **call).images  # fmt: skip
    got = torch.from_numpy(np.stack([s["image"] for s in pairs]))
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4


def test_size_settings_are_refused_for_other_teachers(tmp_path, sd_teacher, sdxl_teacher, edm_teacher):
    """SDXL's size settings where there is no size conditioning; teacher.image_size (SD3's and Flux's) where the
    network runs at its own size: SD's and SDXL's UNets (their exports run at sample_size), a denoiser directory."""
    (tmp_path / "p.txt").write_text("7\n")
    cfg = write_config(tmp_path / "c.yaml", sd_teacher, tmp_path / "store", solver="pndm", prompts=str(tmp_path / "p.txt"))
    with pytest.raises(InputError, match=r"teacher.original_size sets SDXL's size conditioning.*sd_pipeline teacher.*Fix: drop teacher.original_size"):
        chain.plan(load_config(cfg, ["teacher.original_size=[64, 64]"]), "generate")
    for teacher, name in [(sd_teacher, "sd_pipeline"), (sdxl_teacher, "sdxl_pipeline"), (edm_teacher, "denoiser_dir")]:
        prompts = {"solver": "pndm", "prompts": str(tmp_path / "p.txt")} if name != "denoiser_dir" else {}
        cfg = write_config(tmp_path / f"{name}.yaml", teacher, tmp_path / "store", **prompts)
        with pytest.raises(InputError, match=rf"teacher.image_size sets the size an SD3 or Flux teacher is distilled at, but .* is a {name} teacher.*Fix: drop teacher.image_size\.$"):
            chain.plan(load_config(cfg, ["teacher.image_size=[16, 16]"]), "generate")
    cfg = write_config(tmp_path / "e.yaml", edm_teacher, tmp_path / "store")
    with pytest.raises(InputError, match="guidance_rescale rescales a VP teacher's"):
        chain.plan(load_config(cfg, ["teacher.guidance_rescale=0.5"]), "generate")


# ---------------------------------------------------------------- distillation: the DM gradient


class _ZeroTimeIds:
    """A fake score's text inputs with the size conditioning zeroed (a mistake the DM gradient must show)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, rows):
        kw = self.inner(rows)
        return {**kw, "added_cond_kwargs": {**kw["added_cond_kwargs"], "time_ids": torch.zeros_like(kw["added_cond_kwargs"]["time_ids"])}}


class _ZeroPooled(_ZeroTimeIds):
    def __call__(self, rows):
        return self.inner({**rows, "pooled": torch.zeros_like(rows["pooled"])})


def test_dm_gradient_by_hand_with_pooled_embeddings_and_time_ids(sdxl_teacher):
    """d loss_DM / dx from raw UNet calls (encoder_hidden_states, text_embeds, time_ids): real = CFG with the
    unconditional row (zeros), fake unguided; a fake score fed no or wrong size ids or pooled embedding is caught."""
    from dmd_core.denoisers import hidden_states_kwargs
    from dmd_core.dmd import DistributionMatchingLoss, DMDSettings, SampleRNG, dm_timestep_range

    torch.manual_seed(0)
    real = load_denoiser(sdxl_teacher)
    table = load_prompt_encoder(sdxl_teacher).table(PROMPTS)
    real.set_prompts(table)
    fake = copy.deepcopy(real)
    with torch.no_grad():
        for p in fake.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g, labels = 5.0, torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 4, 4, 4, requires_grad=True)
    settings = DMDSettings(guidance_scale=g)

    def dm_grad(fake_net) -> torch.Tensor:
        xg = x.detach().clone().requires_grad_(True)
        DistributionMatchingLoss(settings)(xg, labels, real, fake_net, SampleRNG(0, 0, 0, range(4))).backward()
        return xg.grad

    got = dm_grad(fake)
    rng = SampleRNG(0, 0, 0, range(4))  # the same draws, replayed
    t = rng.randint(*dm_timestep_range(settings))
    eps = rng.randn((4, 4, 4))
    abar = real.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    xd = x.detach().double()
    x_t = (a * xd + s * eps.double()).float()
    hidden, pooled = table.parts["hidden"], table.parts["pooled"]
    cond = (hidden[labels], pooled[labels])
    null = (hidden[-1:].expand(4, -1, -1), pooled[-1:].expand(4, -1))
    assert float(null[0].abs().max()) == 0 and float(null[1].abs().max()) == 0  # force_zeros_for_empty_prompt
    time_ids = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).expand(4, -1)

    def x0(net, emb):
        with torch.no_grad():
            out = net.unet(x_t, t, encoder_hidden_states=emb[0], added_cond_kwargs={"text_embeds": emb[1], "time_ids": time_ids}).sample
            return (x_t.double() - s * out.double()) / a

    real_u, real_c, fake_c = x0(real, null), x0(real, cond), x0(fake, cond)
    w = (xd - (real_u + g * (real_c - real_u))).abs().mean(dim=(1, 2, 3), keepdim=True)
    want = ((fake_c - (real_u + g * (real_c - real_u))) / w / xd.numel()).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    err = float((got - want).abs().max())
    # the mistakes: the fake score without its size ids or its pooled embedding
    for wrong_kwargs in (_ZeroTimeIds(fake.text_kwargs), _ZeroPooled(fake.text_kwargs)):
        wrong = copy.deepcopy(fake)
        wrong.text_kwargs = wrong_kwargs
        assert float((dm_grad(wrong) - want).abs().max()) > 100 * err
    dropped = copy.deepcopy(fake)
    dropped.text_kwargs = hidden_states_kwargs  # no added_cond_kwargs at all: the SDXL UNet cannot run
    with pytest.raises(TypeError, match="NoneType"):
        dm_grad(dropped)


def test_guidance_rescale_applies_on_the_noise_prediction(sdxl_teacher):
    """x0 of the rescaled CFG = (x - sigma eps') / alpha with eps' = diffusers' rescale_noise_cfg of the guided eps."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    den = load_denoiser(sdxl_teacher)
    den.set_prompts(load_prompt_encoder(sdxl_teacher).table(PROMPTS))
    x, t, labels = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 500, 900]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eps_c = den.model_output(x, t, labels, 1.0).double()
        eps_u = den.model_output(x, t, None, 1.0).double()
        den.guidance_rescale = 0.7
        got = den(x, t, labels, 5.0).double()
    eps = rescale_noise_cfg(eps_u + 5.0 * (eps_c - eps_u), eps_c, guidance_rescale=0.7)
    alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in den.alpha_sigma(t))
    torch.testing.assert_close(got, (x.double() - sigma * eps) / alpha, rtol=1e-5, atol=1e-5)
    unscaled = (x.double() - sigma * (eps_u + 5.0 * (eps_c - eps_u))) / alpha
    assert float((got - unscaled).abs().max()) > 1e-2  # the rescale changed the prediction


# ---------------------------------------------------------------- the whole chain, and the exports


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, sdxl_teacher):
    """generate -> distill -> evaluate -> export on the tiny SDXL teacher with two prompt files (what `dmd run` walks)."""
    tmp = tmp_path_factory.mktemp("sdxl-run")
    return text_to_image_chain(tmp, sdxl_teacher, PROMPTS, "pndm", {"guidance_scale": 3.0}, [f"evaluate.clip_model={make_tiny_clip(tmp / 'clip')}"])


def test_chain_runs_end_to_end_on_sdxl(sdxl_run):
    _, spec = export_of_chain(*sdxl_run, "StableDiffusionXLPipeline", teacher_nfe=5)
    assert spec["add_time_ids"] == [8, 8, 0, 0, 8, 8] and spec["text_conditioned"]  # the generator keeps its size conditioning


def test_export_is_a_plain_sdxl_pipeline(sdxl_run):
    """StableDiffusionXLPipeline.from_pretrained(export)(prompts, num_inference_steps=1, guidance_scale=1, latents=z) = G(z, prompt)
    (export checked it in a fresh process on the held-out prompts: plain_diffusers_parity; here on other prompts)."""
    from diffusers import StableDiffusionXLPipeline

    from dmd_core.dmd import OneStep

    c, m = sdxl_run
    out = Path(c.store) / "export" / m.key
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
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
    assert m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5 and m.info["plain_diffusers_parity"]["inputs"] == 4


def test_k_step_export_is_a_plain_sdxl_pipeline_with_lcm(tmp_path, sdxl_teacher):
    """A 4-step SDXL generator exports with diffusers' LCMScheduler: pipe(prompts, num_inference_steps=4, generator=g)
    = MultiStep with the later noise drawn from g in diffusers' order. Trained with sizes other than the defaults,
    which travel with the generator (denoiser.json) into the export's call."""
    from diffusers import StableDiffusionXLPipeline

    from dmd_core.dmd import MultiStep

    (tmp_path / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    pq.write_table(pa.table({"prompt": ["the digit 3", "seven"], "digit": [3, 7]}), tmp_path / "eval.parquet")
    cfg = write_config(tmp_path / "c.yaml", sdxl_teacher, tmp_path / "store", distill={"steps": 2, "generator_timesteps": [999, 749, 499, 249], "regression_weight": 0.0},
                       solver="pndm", steps=4, prompts=str(tmp_path / "train.txt"))  # fmt: skip
    c = load_config(cfg, [f"evaluate.prompts={tmp_path / 'eval.parquet'}", "evaluate.num_samples=80", "evaluate.batch_size=40", "evaluate.features=digits",
                          f"evaluate.classifier={ROOT / 'data' / 'classifier'}", "evaluate.speed_batch_size=2", "evaluate.speed_repeats=1", "export.parity_samples=3",
                          "teacher.original_size=[16, 16]", "teacher.crop_top_left=[4, 0]"])  # fmt: skip
    m = chain.run(c, "export", progress=False).manifest
    assert m.info["metrics"]["student_nfe"] == 4 and m.info["network_evaluations"] == 4 and m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5
    sizes = {"original_size": [16, 16], "crops_coords_top_left": [4, 0], "target_size": [8, 8]}
    assert m.info["size_conditioning"] == sizes
    out = Path(c.store) / "export" / m.key
    assert json.loads((out / "unet" / "denoiser.json").read_text())["add_time_ids"] == [16, 16, 4, 0, 8, 8]
    assert "num_inference_steps=4, original_size=(16, 16), crops_coords_top_left=(4, 0), target_size=(8, 8)" in (out / "README.md").read_text()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["the digit 3", "seven", "3 seven"]
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pipe(prompts, latents=z, num_inference_steps=4, guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(9),
                   **{k: tuple(v) for k, v in sizes.items()}).images  # fmt: skip
        gen = load_denoiser(out / "unet")
        gen.set_prompts(load_prompt_encoder(out).table(prompts))
        g = torch.Generator().manual_seed(9)
        want = MultiStep.of(gen)(gen, z, torch.arange(3), lambda j: torch.randn(z.shape, generator=g))
        default = pipe(prompts, latents=z, num_inference_steps=4, guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(9)).images
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((default - want).abs().max()) > 1e-3  # the sizes matter: the pipeline's defaults give another image


@pytest.mark.slow  # a Prefect server of its own (the chain it walks is covered by sdxl_run)
def test_dmd_run_on_sdxl(sdxl_run, tmp_path):
    """`dmd run` (the Prefect flow, on its own local server) over the tiny SDXL teacher's config: every stage cached."""
    import os
    import subprocess
    import sys

    c, m = sdxl_run
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(c.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    r = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "run", "--config", str(cfg)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(Path(c.store) / "export" / m.key)


def test_cached_sdxl_repo_id_is_a_teacher(tmp_path, sdxl_teacher, monkeypatch):
    """teacher.path=org/name of an SDXL pipeline in the HF cache layout resolves to its snapshot, offline."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--sdxl-digits"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(sdxl_teacher, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert read_parametrization("tiny-org/sdxl-digits") == read_parametrization(sdxl_teacher)
    assert load_denoiser("tiny-org/sdxl-digits").text_kwargs.add_time_ids == (8, 8, 0, 0, 8, 8)

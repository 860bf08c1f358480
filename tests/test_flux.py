"""Flux teachers (FluxPipeline folders): CLIP's pooled output and T5's states, 2x2-packed latents with position ids,
the dynamic shift, guidance as an input (Flux-dev) or CFG (schnell); prompt rows, pairs and exports against diffusers'
own FluxPipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SD_WORDS, diffusers_pipeline, export_of_chain, generate_prompt_pairs, text_to_image_chain, tiny_vae
from dmd_core.errors import InputError
from dmd_core.layouts import FluxLayout, detect
from dmd_core.layouts.mmdit import FluxDenoiser, latent_image_ids, pack_latents, unpack_latents
from dmd_core.loading import load_denoiser, load_prompt_encoder, read_parametrization
from test_sd3 import edited, tiny_t5, write_t5_tokenizer

PROMPTS = ["the digit 7", "a handwritten seven", "3"]
CLIP_WIDTH, T5_WIDTH = 16, 24
TINY = "teacher.image_size=[8, 8]"  # FluxPipeline's default is 128 x 128 latents whatever the model: the tests set 4 x 4


def make_flux_teacher(path: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny Flux pipeline (random weights): CLIP 16 wide (pooled), T5 24 wide, a FluxTransformer2DModel of one double
    and one single block on 2x2-packed 4-channel latents (16 inputs per token), Flux's dynamic shift; ``guidance_embeds``:
    Flux-dev (guidance an input), else schnell. Run at 1x8x8 images (TINY) through a 2x VAE: 4x4x4 latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dmd_core.text import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(path.parent / f"{path.name}-tokenizer", SD_WORDS, max_length=8)
    t5_tokenizer = write_t5_tokenizer(path.parent / f"{path.name}-t5-tokenizer", SD_WORDS)
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    vae = tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)  # Flux's VAE scale and shift
    # Flux.1's scheduler config, its sequence lengths scaled down to the tiny latents (4 and 64 tokens)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=tiny_t5(len(t5_tokenizer), T5_WIDTH), tokenizer_2=t5_tokenizer)  # fmt: skip
    pipe.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def flux_teacher(tmp_path_factory) -> Path:
    return make_flux_teacher(tmp_path_factory.mktemp("teacher") / "flux")


# ---------------------------------------------------------------- the layout


def test_flux_folder_is_a_flow_text_to_image_teacher(flux_teacher):
    """Unset, teacher.image_size is FluxPipeline's default: 128 x 128 latents (1024 x 1024 images through Flux's 8x VAE,
    256 x 256 through the tiny 2x one); set, the latents are its sides over the VAE's factor, the dynamic shift's
    (H/2)(W/2) tokens counted on them."""
    from dmd_core.denoisers import flow_image_seq_len

    layout = detect(flux_teacher)
    assert isinstance(layout, FluxLayout)
    p = read_parametrization(flux_teacher)
    assert (p.kind, p.text_conditioned, p.image_shape, p.use_dynamic_shifting, p.guidance_embeds) == ("flow", True, (4, 128, 128), True, True)
    assert layout.pixel_shape(flux_teacher, p) == (1, 256, 256) and flow_image_seq_len(p) == 64 * 64
    q = layout.configure(flux_teacher, p, {"image_size": (8, 12)})
    assert q.image_shape == (4, 4, 6) and flow_image_seq_len(q) == 2 * 3 and layout.pixel_shape(flux_teacher, q) == (1, 8, 12)
    assert isinstance(load_denoiser(flux_teacher), FluxDenoiser)


def test_packing_is_the_pipelines(flux_teacher):
    """pack/unpack and the image ids are FluxPipeline's static methods' (a permutation, inverted exactly)."""
    from diffusers import FluxPipeline

    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 4, 6, 8)) and torch.equal(unpack_latents(packed, 6, 8), z)
    assert torch.equal(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 12, 16, 2))
    assert torch.equal(latent_image_ids(6, 8, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_prompt_rows_equal_the_pipelines_encode_prompt(flux_teacher):
    """pooled: CLIP's pooled output; hidden: T5's 512 states; the unconditional row: the empty prompt's."""
    rows = load_prompt_encoder(flux_teacher).table(PROMPTS).rows(range(4))
    assert rows["hidden"].shape == (4, 512, T5_WIDTH) and rows["pooled"].shape == (4, CLIP_WIDTH)
    pipe = diffusers_pipeline(flux_teacher)
    with torch.no_grad():
        hidden, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu")
        neg, neg_pooled, _ = pipe.encode_prompt([""], None, device="cpu")
    assert torch.equal(rows["hidden"][:3], hidden) and torch.equal(rows["pooled"][:3], pooled)
    assert torch.equal(rows["hidden"][3:], neg) and torch.equal(rows["pooled"][3:], neg_pooled)
    assert not text_ids.any()  # FluxPipeline's text ids are zeros: the denoiser makes them so


def test_layout_checks_widths_and_parts(tmp_path, flux_teacher):
    cases = [
        ("transformer/config.json", {"pooled_projection_dim": 12}, "hidden_size 16 but .*pooled_projection_dim 12"),
        ("transformer/config.json", {"joint_attention_dim": 32}, "d_model 24 but .*joint_attention_dim 32"),
        ("vae/config.json", {"latent_channels": 8}, r"latent_channels 8 but .*in_channels 16 \(4 per latent channel\)"),
        ("transformer/config.json", {"in_channels": 18}, "in_channels must be 4 x the VAE's latent channels"),
    ]
    for i, (rel, change, message) in enumerate(cases):
        t = edited(flux_teacher, tmp_path / str(i), rel, **change)
        with pytest.raises(InputError, match=message):
            read_parametrization(t)
    t = shutil.copytree(flux_teacher, tmp_path / "no-t5")
    shutil.rmtree(t / "text_encoder_2")
    with pytest.raises(InputError, match="FluxPipeline folder without text_encoder_2/"):
        read_parametrization(t)
    # even latent sides (2 x 2 packing) through the 2x VAE: pixel sides that are multiples of 4
    with pytest.raises(InputError, match=r"teacher.image_size \[8, 10\]: each side must be a multiple of 4 pixels .*patch 2\). Fix: .* \[8, 8\] or \[8, 12\]\."):
        detect(flux_teacher).configure(flux_teacher, read_parametrization(flux_teacher), {"image_size": (8, 10)})
    t = shutil.copytree(flux_teacher, tmp_path / "sized")
    (t / "denoiser.json").write_text(json.dumps({"image_shape": [4, 4, 4]}))  # the size file this layout once read
    with pytest.raises(InputError, match=r"denoiser.json sits beside .*Fix: remove denoiser.json and set teacher.image_size.*\(default \[256, 256\]\)"):
        read_parametrization(t)
    # SD3's CLIP (projected) in Flux's place: Flux reads the unprojected pooled output
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    t = edited(flux_teacher, tmp_path / "projected", "model_index.json", text_encoder=["transformers", "CLIPTextModelWithProjection"])
    config = CLIPTextConfig.from_pretrained(str(t / "text_encoder"))
    CLIPTextModelWithProjection(config).save_pretrained(str(t / "text_encoder"))
    with pytest.raises(InputError, match="names text_encoder with a projection.*CLIPTextModel"):
        load_prompt_encoder(t)


def test_one_step_at_s_1_is_the_pipelines(flux_teacher):
    """The denoiser's x0 at s = 1 (z - v(z, 1), guidance 3.5 as the network's input) = one FluxPipeline Euler step."""
    den = load_denoiser(flux_teacher)
    den.set_prompts(load_prompt_encoder(flux_teacher).table(PROMPTS))
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = diffusers_pipeline(flux_teacher)(PROMPTS, latents=pack_latents(z), height=8, width=8, num_inference_steps=1, guidance_scale=3.5,
                                                output_type="latent").images  # fmt: skip
        got = den(z, 1.0, torch.arange(3), 3.5)
        other = den(z, 1.0, torch.arange(3), 1.0)
    torch.testing.assert_close(got, unpack_latents(want, 4, 4), rtol=0, atol=1e-6)
    assert float((other - got).abs().max()) > 1e-3  # the guidance input matters


# ---------------------------------------------------------------- pairs = FluxPipeline


@pytest.fixture(scope="module")
def schnell_teacher(tmp_path_factory) -> Path:
    return make_flux_teacher(tmp_path_factory.mktemp("teacher") / "schnell", seed=1, guidance_embeds=False)


@pytest.mark.parametrize("kind, guidance, size", [("dev", 1.0, (8, 8)), ("dev", 3.5, (8, 8)), ("schnell", 1.0, (8, 8)), ("schnell", 4.0, (8, 8)),
                                                ("dev", 3.5, (12, 16))], ids=["dev-g1", "dev-g3.5", "schnell-g1", "schnell-cfg4", "dev-g3.5-12x16"])  # fmt: skip
def test_pairs_equal_diffusers_flux_pipeline(request, tmp_path, kind, guidance, size):
    """The stored image latent = FluxPipeline(prompt, latents=pack(z), height=H, width=W (teacher.image_size), 6 Euler
    steps on its linspace(1, 1/N, N) with the dynamic shift of the latents' tokens, output_type="latent"), unpacked:
    Flux-dev's guidance g is the network's input (guidance_scale=g); schnell's is CFG against the empty prompt
    (true_cfg_scale=g, negative_prompt="")."""
    import numpy as np

    teacher = request.getfixturevalue("flux_teacher" if kind == "dev" else "schnell_teacher")
    _, m, pairs = generate_prompt_pairs(tmp_path, teacher, PROMPTS, [f"teacher.image_size={list(size)}"], solver="euler", steps=6, num_samples=6,
                                        shard_size=6, guidance_scale=guidance)  # fmt: skip
    assert [s["index"] for s in pairs] == [i % 3 for i in range(6)] and m.info["nfe"] == 6
    z = torch.from_numpy(np.stack([s["noise"] for s in pairs]))
    h, w = size[0] // 2, size[1] // 2  # the tiny VAE's factor 2
    assert z.shape == (6, 4, h, w)
    call = {"guidance_scale": guidance} if kind == "dev" else {"true_cfg_scale": guidance, "negative_prompt": [""] * 6}
    with torch.no_grad():
        want = diffusers_pipeline(teacher)([PROMPTS[s["index"]] for s in pairs], latents=pack_latents(z), height=size[0], width=size[1],
                                           num_inference_steps=6, output_type="latent", **call).images  # fmt: skip
    got = torch.from_numpy(np.stack([s["image"] for s in pairs]))
    assert float((got - unpack_latents(want, h, w)).abs().max()) <= 1e-4


# ---------------------------------------------------------------- the whole chain, and the exports


def flux_chain(tmp: Path, teacher: Path, distill: dict, parity: int = 4):
    """generate -> distill -> evaluate -> export on a tiny Flux teacher at 8 x 8 pixels, with two prompt files."""
    return text_to_image_chain(tmp, teacher, PROMPTS, "euler", distill, [TINY], parity)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, flux_teacher):
    """Flux-dev distilled with the real score guided by the network's guidance input 3.5."""
    return flux_chain(tmp_path_factory.mktemp("flux-run"), flux_teacher, {"guidance_scale": 3.5})


def test_chain_runs_end_to_end_on_flux(flux_run):
    c, m = flux_run
    out, _ = export_of_chain(c, m, "FluxPipeline", teacher_nfe=4)
    assert m.info["call_arguments"] == {"height": 8, "width": 8}  # one step at s = 1: num_inference_steps=1
    spec = json.loads((out / "transformer" / "denoiser.json").read_text())
    assert (spec["kind"], spec["use_dynamic_shifting"], spec["guidance_embeds"], spec["image_shape"]) == ("flow", True, True, [4, 4, 4])
    assert "height=8, width=8, num_inference_steps=1" in (out / "README.md").read_text()


def test_export_is_a_plain_flux_pipeline(flux_run):
    """FluxPipeline.from_pretrained(export)(prompts, latents=pack(z), num_inference_steps=1, guidance_scale=1) = G(z, prompt):
    the generator is called, as in training, with the guidance input 1."""
    from dmd_core.dmd import OneStep

    c, m = flux_run
    out = Path(c.store) / "export" / m.key
    pipe = diffusers_pipeline(out)
    prompts = ["the digit 3", "seven", "3 seven"]
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pipe(prompts, latents=pack_latents(z), height=8, width=8, num_inference_steps=1, guidance_scale=1.0, output_type="latent").images
        gen = load_denoiser(out / "transformer")
        gen.set_prompts(load_prompt_encoder(out).table(prompts))
        want = OneStep.of(gen)(gen, z, torch.arange(3))
    assert isinstance(gen, FluxDenoiser) and pipe.scheduler.sigmas.tolist() == [1.0, 0.0]
    assert float((unpack_latents(got, 4, 4) - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.slow  # a variant of the one-step chain above (k steps): make test-slow
def test_k_step_export_of_schnell(tmp_path, schnell_teacher):
    """A 2-step generator of Flux-schnell (its real score guided by CFG, no guidance input): torch.manual_seed(s);
    FluxPipeline(prompts, sigmas=[s_0, s_1]) = MultiStep, the later noise drawn in the packed latents' order."""
    from dmd_core.dmd import MultiStep, noise_levels

    c, m = flux_chain(tmp_path, schnell_teacher, {"guidance_scale": 2.0, "generator_timesteps": [999, 499], "regression_weight": 0.0}, parity=3)
    assert m.info["network_evaluations"] == 2 and m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5
    out = Path(c.store) / "export" / m.key
    gen = load_denoiser(out / "transformer")
    sigmas = [1.0, float(noise_levels(gen.param, torch.tensor([499]))[1][0])]
    assert m.info["call_arguments"] == {"height": 8, "width": 8, "sigmas": sigmas}
    pipe = diffusers_pipeline(out)
    prompts = ["the digit 3", "seven", "3 seven"]
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.manual_seed(9)  # the pipeline hands the scheduler's stochastic steps no generator: they draw from the global one
        got = unpack_latents(pipe(prompts, latents=pack_latents(z), height=8, width=8, sigmas=sigmas, guidance_scale=1.0, output_type="latent").images, 4, 4)
        gen.set_prompts(load_prompt_encoder(out).table(prompts))
        g = torch.Generator().manual_seed(9)
        want = MultiStep.of(gen)(gen, z, torch.arange(3), lambda j: unpack_latents(torch.randn(3, 4, 16, generator=g), 4, 4))
        unpacked_order = MultiStep.of(gen)(gen, z, torch.arange(3), lambda j: torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(9)))
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((got - unpacked_order).abs().max()) > 1e-3  # the noise's order matters: drawn packed, as the scheduler draws it

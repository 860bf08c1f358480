"""Flux teachers (FluxPipeline folders): CLIP's pooled output and T5's states, 2x2-packed latents with position ids,
the dynamic shift, guidance as an input (Flux-dev) or CFG (schnell); prompt rows, pairs and exports against diffusers'
own FluxPipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SD_WORDS
from dmd_core.errors import InputError
from dmd_core.layouts import FluxLayout, detect
from dmd_core.layouts.mmdit import FluxDenoiser, latent_image_ids, pack_latents, unpack_latents
from dmd_core.loading import load_denoiser, load_prompt_encoder, read_parametrization
from test_sd3 import edited, tiny_t5, write_t5_tokenizer

PROMPTS = ["the digit 7", "a handwritten seven", "3"]
CLIP_WIDTH, T5_WIDTH = 16, 24


def make_flux_teacher(path: Path, seed: int = 0, guidance_embeds: bool = True, image_shape: list[int] | None = (4, 4, 4)) -> Path:
    """A tiny Flux pipeline (random weights): CLIP 16 wide (pooled), T5 24 wide, a FluxTransformer2DModel of one double
    and one single block on 2x2-packed 4-channel latents (16 inputs per token), Flux's dynamic shift; ``guidance_embeds``:
    Flux-dev (guidance an input), else schnell. 1x8x8 images through a 2x VAE: 4x4x4 latents, set by ``image_shape``
    in a denoiser.json beside the pipeline (Flux's default is 1024 x 1024)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
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
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=8, scaling_factor=0.3611, shift_factor=0.1159,  # Flux's VAE scale and shift
    )  # fmt: skip
    # Flux.1's scheduler config, its sequence lengths scaled down to the tiny latents (4 and 64 tokens)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=tiny_t5(len(t5_tokenizer), T5_WIDTH), tokenizer_2=t5_tokenizer)  # fmt: skip
    pipe.save_pretrained(str(path))
    if image_shape is not None:
        (path / "denoiser.json").write_text(json.dumps({"image_shape": list(image_shape)}))
    return path


@pytest.fixture(scope="module")
def flux_teacher(tmp_path_factory) -> Path:
    return make_flux_teacher(tmp_path_factory.mktemp("teacher") / "flux")


def flux_pipe(folder: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- the layout


def test_flux_folder_is_a_flow_text_to_image_teacher(tmp_path, flux_teacher):
    assert isinstance(detect(flux_teacher), FluxLayout)
    p = read_parametrization(flux_teacher)
    assert (p.kind, p.text_conditioned, p.image_shape, p.use_dynamic_shifting, p.guidance_embeds) == ("flow", True, (4, 4, 4), True, True)
    assert isinstance(load_denoiser(flux_teacher), FluxDenoiser)
    # without the size file: FluxPipeline's default, 128 x 128 latents (1024 x 1024 images through Flux's VAE)
    t = shutil.copytree(flux_teacher, tmp_path / "default")
    (t / "denoiser.json").unlink()
    assert read_parametrization(t).image_shape == (4, 128, 128) and detect(t).pixel_shape(t, read_parametrization(t)) == (1, 256, 256)


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
    pipe = flux_pipe(flux_teacher)
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
    with pytest.raises(InputError, match="multiples of 2"):
        read_parametrization(edited(flux_teacher, tmp_path / "odd", "denoiser.json", image_shape=[4, 5, 4]))
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
        want = flux_pipe(flux_teacher)(PROMPTS, latents=pack_latents(z), height=8, width=8, num_inference_steps=1, guidance_scale=3.5,
                                       output_type="latent").images  # fmt: skip
        got = den(z, 1.0, torch.arange(3), 3.5)
        other = den(z, 1.0, torch.arange(3), 1.0)
    torch.testing.assert_close(got, unpack_latents(want, 4, 4), rtol=0, atol=1e-6)
    assert float((other - got).abs().max()) > 1e-3  # the guidance input matters

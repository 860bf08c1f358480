"""A damaged or inconsistent teacher directory: `dmd generate` refuses it with one line naming the file and
the problem, exit 2, no traceback, nothing written.

One row per damage, over the three teacher layouts: an EDM denoiser directory (and its VP sibling with
scheduler/), a diffusers DDPMPipeline folder and a Stable Diffusion pipeline folder. Each row copies a
session-built teacher, damages the copy and runs the command in this process. Then the folders of families
the project knows but does not load (LDM, SDXL, SD3, Flux, inpainting, single-file checkpoints), each
refused by name, the folders whose old refusal pointed the wrong way (zero-terminal SNR), and damaged fp16
variant weights (save_pretrained(..., variant="fp16")), refused as the plain ones are.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors.torch import load_file

from conftest import tiny_unet, write_config
from refusal import assert_refused

W = "diffusion_pytorch_model.safetensors"
GARBAGE = random.Random(0).randbytes(4096)
NOT_UTF8 = b'{"_class_name": "\xff\xfe caf\xe9"}'
READ = ("is not a readable safetensors file", "Fix: re-save or re-download the teacher")
FIXTURES = {"edm": "edm_teacher", "vp": "vp_teacher", "ddpm": "ddpm_teacher", "sd": "sd_teacher", "ldm": "ldm_teacher", "identity": "identity_teacher"}
NO_LAYOUT = "Fix: distil a teacher of a supported layout"


@pytest.fixture(scope="module")
def ddpm_teacher(tmp_path_factory) -> Path:
    """What a diffusers user has: DDPMPipeline(unet, scheduler).save_pretrained(dir), nothing else."""
    path = tmp_path_factory.mktemp("teacher") / "ddpm"
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    DDPMPipeline(unet=tiny_unet(11), scheduler=sched).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def ldm_teacher(tmp_path_factory) -> Path:
    """diffusers' LDMPipeline: a UNet on the latents of a VQ autoencoder (vqvae/), beside unet/ and scheduler/."""
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    vqvae = VQModel(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=1, norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=1,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("teacher") / "ldm"
    LDMPipeline(vqvae=vqvae, unet=tiny_unet(None), scheduler=DDIMScheduler()).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def identity_teacher(tmp_path_factory) -> Path:
    """A DDPMPipeline whose UNet adds class_labels to the time embedding as they are (class_embed_type "identity")."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), class_embed_type="identity",
    )  # fmt: skip
    path = tmp_path_factory.mktemp("teacher") / "identity"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(path))
    return path


# ---------------------------------------------------------------- damages


def truncate(rel: str):
    def damage(t: Path) -> None:
        data = (t / rel).read_bytes()
        (t / rel).write_bytes(data[: len(data) // 2])

    return damage


def write(rel: str, data: bytes | str):
    def damage(t: Path) -> None:
        (t / rel).write_bytes(data.encode() if isinstance(data, str) else data)

    return damage


def remove(rel: str):
    def damage(t: Path) -> None:
        p = t / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return damage


def edit(rel: str, **changes):
    """Set keys of a JSON object file (json.dumps writes NaN / Infinity as Python's json reads them)."""

    def damage(t: Path) -> None:
        d = json.loads((t / rel).read_text())
        d.update(changes)
        (t / rel).write_text(json.dumps(d))

    return damage


def only_pickle(t: Path) -> None:
    """The safetensors weights replaced by a torch.save pickle of the same tensors."""
    torch.save(load_file(str(t / W)), t / "diffusion_pytorch_model.bin")
    (t / W).unlink()


def to_variant(rel: str, variant: str = "fp16"):
    """Only the variant file, as save_pretrained(..., variant="fp16") names it: model.safetensors -> model.fp16.safetensors."""

    def damage(t: Path) -> None:
        stem, suffix = (t / rel).name.split(".", 1)
        (t / rel).rename((t / rel).with_name(f"{stem}.{variant}.{suffix}"))

    return damage


def then(*damages):
    """The damages one after the other (e.g. the fp16 variant of every part, then one of them cut)."""

    def damage(t: Path) -> None:
        for d in damages:
            d(t)

    return damage


SD_FP16 = then(to_variant(f"unet/{W}"), to_variant(f"vae/{W}"), to_variant("text_encoder/model.safetensors"))  # an fp16-only pipeline
W16, TW16 = "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"


def index(class_name: str, **parts):
    """model_index.json of a pipeline of another family (as its save_pretrained writes it), the unet/ of the copy removed."""

    def damage(t: Path) -> None:
        shutil.rmtree(t / "unet")
        entries = {k: list(v) for k, v in parts.items()}
        (t / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1", **entries}))
        for part in parts:
            (t / part).mkdir(exist_ok=True)

    return damage


CLIP = {"text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer")}
SDXL = {**CLIP, "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"), "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"), "scheduler": ("diffusers", "EulerDiscreteScheduler")}  # fmt: skip
SD3 = {**CLIP, "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"), "text_encoder_3": ("transformers", "T5EncoderModel"),
       "transformer": ("diffusers", "SD3Transformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
       "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}  # fmt: skip
FLUX = {**CLIP, "text_encoder_2": ("transformers", "T5EncoderModel"), "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}  # fmt: skip
DIT = {"transformer": ("diffusers", "DiTTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"), "scheduler": ("diffusers", "DPMSolverMultistepScheduler")}
ZERO_SNR_BETAS = [0.0001 + i * (0.02 - 0.0001) / 998 for i in range(999)] + [1.0]  # the last step all noise: alphas_cumprod[-1] = 0


def p(layout, case_id, damage, *needles):
    return pytest.param(layout, damage, needles, id=f"{layout}-{case_id}")


CASES = [
    # EDM denoiser directory: config.json + weights + denoiser.json
    p("edm", "weights-truncated", truncate(W), W, *READ),
    p("edm", "weights-empty", write(W, b""), W, *READ),
    p("edm", "weights-garbage", write(W, GARBAGE), W, *READ),
    p("edm", "weights-missing", remove(W), "weights missing", W),
    p("edm", "weights-only-pickle", only_pickle, "diffusion_pytorch_model.bin", "pickle", "safe_serialization=True"),
    p("edm", "config-missing", remove("config.json"), "UNet config missing", "config.json"),
    p("edm", "config-list", write("config.json", "[1, 2]"), "config.json", "must be a JSON object, not an array"),
    p("edm", "config-string", write("config.json", '"UNet2DModel"'), "config.json", "must be a JSON object, not a string"),
    p("edm", "config-invalid-json", write("config.json", '{"in_channels": 1,'), "config.json", "is not valid JSON"),
    p("edm", "config-not-utf8", write("config.json", NOT_UTF8), "config.json", "is not UTF-8"),
    p("edm", "denoiser-not-utf8", write("denoiser.json", NOT_UTF8), "denoiser.json", "is not UTF-8"),
    p("edm", "denoiser-invalid-json", write("denoiser.json", "{'kind': 'edm'}"), "denoiser.json", "is not valid JSON"),
    p("edm", "denoiser-list", write("denoiser.json", '["edm"]'), "denoiser.json", "must be a JSON object", '"kind"'),
    p("edm", "sigma_min-string", edit("denoiser.json", sigma_min="abc"), "denoiser.json", "sigma_min must be a finite number > 0", '"abc"'),
    p("edm", "sigma_min-zero", edit("denoiser.json", sigma_min=0), "denoiser.json", "sigma_min must be a finite number > 0, got 0"),
    p("edm", "sigma_min-negative", edit("denoiser.json", sigma_min=-0.5), "denoiser.json", "sigma_min", "got -0.5"),
    p("edm", "sigma_max-below-min", edit("denoiser.json", sigma_max=0.001), "denoiser.json", "sigma_max (0.001) must be greater than sigma_min (0.002)"),
    p("edm", "sigma_data-zero", edit("denoiser.json", sigma_data=0), "denoiser.json", "sigma_data must be a finite number > 0"),
    p("edm", "sigma_max-infinity", edit("denoiser.json", sigma_max=float("inf")), "denoiser.json", "sigma_max", "got Infinity"),
    p("edm", "sigma_data-nan", edit("denoiser.json", sigma_data=float("nan")), "denoiser.json", "sigma_data", "got NaN"),
    p("edm", "num_classes-negative", edit("denoiser.json", num_classes=-1), "denoiser.json", "num_classes must be an integer >= 0, got -1"),
    p("edm", "num_classes-string", edit("denoiser.json", num_classes="10"), "denoiser.json", "num_classes must be an integer", '"10"'),
    p("edm", "null_class-out-of-range", edit("denoiser.json", null_class=11), "denoiser.json", "null_class", "[0, num_classes=10]", "got 11"),
    p("edm", "image_shape-two-values", edit("denoiser.json", image_shape=[1, 8]), "denoiser.json", "image_shape must be [C, H, W]", "[1, 8]"),
    p("edm", "image_shape-zero", edit("denoiser.json", image_shape=[1, 0, 8]), "denoiser.json", "image_shape", "[1, 0, 8]"),
    p("edm", "data_range-reversed", edit("denoiser.json", data_range=[1, -1]), "denoiser.json", "data_range", "[1, -1]"),
    p("edm", "kind-unknown", edit("denoiser.json", kind="ve"), "denoiser.json", "kind must be 'edm' or 'vp'", "'ve'"),
    p("edm", "unknown-key", edit("denoiser.json", sigma_mn=0.1), "denoiser.json", "unknown keys ['sigma_mn']"),
    # denoiser.json against the UNet config (1x8x8, 11 class embeddings: 10 classes + the null class)
    p("edm", "channels-vs-unet", edit("denoiser.json", image_shape=[3, 16, 16]), "denoiser.json", "config.json", "[3, 16, 16]", "in_channels 1"),
    p("edm", "size-vs-unet", edit("denoiser.json", image_shape=[1, 16, 16]), "denoiser.json", "config.json", "16x16", "sample_size 8"),
    p("edm", "num_classes-vs-unet", edit("denoiser.json", num_classes=20, null_class=20), "denoiser.json", "config.json", "num_classes 20", "num_class_embeds 11"),
    p("edm", "unconditional-vs-unet", edit("denoiser.json", num_classes=0, null_class=None), "denoiser.json", "num_classes 0", "num_class_embeds 11"),
    p("edm", "text-vs-unet", edit("denoiser.json", text_conditioned=True), "denoiser.json", "text_conditioned true", "UNet2DModel"),
    p("edm", "out_channels-vs-in", edit("config.json", out_channels=2), "config.json", "out_channels 2", "in_channels 1"),
    # VP denoiser directory: the same plus scheduler/
    p("vp", "prediction_type-unknown", edit("denoiser.json", prediction_type="eps"), "denoiser.json", "prediction_type must be one of", "'eps'"),
    p("vp", "scheduler-missing", remove("scheduler/scheduler_config.json"), "scheduler config missing", "scheduler/scheduler_config.json"),
    p("vp", "scheduler-beta_schedule", edit("scheduler/scheduler_config.json", beta_schedule="cosine"), "scheduler/scheduler_config.json", "does not build"),
    p("vp", "scheduler-betas-above-one", edit("scheduler/scheduler_config.json", beta_schedule="linear", beta_end=1.5), "scheduler_config.json", "alphas_cumprod"),
    # DDPMPipeline folder: model_index.json, unet/, scheduler/
    p("ddpm", "unet-weights-truncated", truncate(f"unet/{W}"), f"unet/{W}", *READ),
    p("ddpm", "unet-weights-garbage", write(f"unet/{W}", GARBAGE), f"unet/{W}", *READ),
    p("ddpm", "unet-weights-empty", write(f"unet/{W}", b""), f"unet/{W}", *READ),
    p("ddpm", "unet-config-invalid-json", write("unet/config.json", "{"), "unet/config.json", "is not valid JSON"),
    p("ddpm", "unet-num_class_embeds-string", edit("unet/config.json", num_class_embeds="11"), "unet/config.json", "num_class_embeds must be a positive integer"),
    p("ddpm", "model_index-not-utf8", write("model_index.json", NOT_UTF8), "model_index.json", "is not UTF-8"),
    p("ddpm", "model_index-list", write("model_index.json", '["DDPMPipeline"]'), "model_index.json", "must be a JSON object, not an array"),
    p("ddpm", "scheduler-not-utf8", write("scheduler/scheduler_config.json", NOT_UTF8), "scheduler/scheduler_config.json", "is not UTF-8"),
    p("ddpm", "scheduler-invalid-json", write("scheduler/scheduler_config.json", "num_train_timesteps: 1000"), "scheduler/scheduler_config.json", "is not valid JSON"),
    p("ddpm", "timesteps-zero", edit("scheduler/scheduler_config.json", num_train_timesteps=0), "scheduler_config.json", "num_train_timesteps must be an integer > 0, got 0"),
    p("ddpm", "timesteps-string", edit("scheduler/scheduler_config.json", num_train_timesteps="1000"), "scheduler_config.json", "num_train_timesteps", '"1000"'),
    p("ddpm", "scheduler-prediction-unknown", edit("scheduler/scheduler_config.json", prediction_type="eps"), "scheduler_config.json", "prediction_type must be one of", "'eps'"),
    p("ddpm", "override-num_classes", write("denoiser.json", '{"num_classes": 20, "null_class": 20}'), "denoiser.json", "unet/config.json", "num_classes 20", "num_class_embeds 11"),
    p("ddpm", "override-channels", write("denoiser.json", '{"image_shape": [3, 8, 8]}'), "denoiser.json", "unet/config.json", "in_channels 1"),
    p("ddpm", "override-sigma-nan", write("denoiser.json", '{"sigma_data": NaN}'), "denoiser.json", "sigma_data", "NaN"),
    # Stable Diffusion pipeline folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/
    p("sd", "unet-weights-garbage", write(f"unet/{W}", GARBAGE), f"unet/{W}", *READ),
    p("sd", "vae-weights-truncated", truncate(f"vae/{W}"), f"vae/{W}", *READ),
    p("sd", "vae-weights-empty", write(f"vae/{W}", b""), f"vae/{W}", *READ),
    p("sd", "vae-config-missing", remove("vae/config.json"), "vae/config.json", "missing"),
    p("sd", "vae-missing", remove("vae"), "vae/", "StableDiffusionPipeline.save_pretrained"),
    p("sd", "text_encoder-weights-truncated", truncate("text_encoder/model.safetensors"), "text_encoder/model.safetensors", *READ),
    p("sd", "text_encoder-weights-garbage", write("text_encoder/model.safetensors", GARBAGE), "text_encoder/model.safetensors", *READ),
    p("sd", "text_encoder-weights-missing", remove("text_encoder/model.safetensors"), "weights missing", "text_encoder/model.safetensors"),
    p("sd", "text_encoder-missing", remove("text_encoder"), "text_encoder/", "save the whole pipeline"),
    p("sd", "text_encoder-config-invalid", write("text_encoder/config.json", "{]"), "text_encoder/config.json", "is not valid JSON"),
    p("sd", "text_encoder-width-vs-unet", edit("text_encoder/config.json", hidden_size=32), "text_encoder/config.json", "hidden_size 32", "cross_attention_dim 16"),
    p("sd", "text_encoder-config-vs-weights", edit("text_encoder/config.json", num_hidden_layers=2), "text_encoder/model.safetensors", "do not match", "text_encoder/config.json"),
    p("sd", "vae-config-vs-weights", edit("vae/config.json", layers_per_block=2), "vae/diffusion_pytorch_model.safetensors", "do not match", "vae/config.json"),
    p("sd", "vae-shape-vs-weights", edit("vae/config.json", norm_num_groups=2, block_out_channels=[8, 32]), "vae/diffusion_pytorch_model.safetensors", "do not match", "expected shape"),
    p("sd", "vae-latents-vs-unet", edit("vae/config.json", latent_channels=8), "vae/config.json", "latent_channels 8", "in_channels 4"),
    p("sd", "vae-scaling_factor-string", edit("vae/config.json", scaling_factor="x"), "vae/config.json", "scaling_factor must be a finite number > 0"),
    p("sd", "tokenizer-missing", remove("tokenizer"), "tokenizer/", "save the whole pipeline"),
    p("sd", "tokenizer-vocab-garbage", write("tokenizer/vocab.json", GARBAGE), "tokenizer/vocab.json", "is not UTF-8"),
    p("sd", "tokenizer-vocab-list", write("tokenizer/vocab.json", '["a", "b"]'), "tokenizer/vocab.json", "must be a JSON object"),
    p("sd", "tokenizer-json-incomplete", write("tokenizer/tokenizer.json", '{"version": "1.0"}'), "tokenizer", "does not load"),
    p("sd", "tokenizer-json-garbage", write("tokenizer/tokenizer.json", GARBAGE), "tokenizer/tokenizer.json", "is not UTF-8"),
    p("sd", "tokenizer-config-invalid", write("tokenizer/tokenizer_config.json", '{"model_max_length": 8'), "tokenizer/tokenizer_config.json", "is not valid JSON"),
    p("sd", "tokenizer-empty", lambda t: [f.unlink() for f in (t / "tokenizer").iterdir()], "tokenizer", "no vocabulary"),
    p("sd", "tokenizer-merges-not-utf8", write("tokenizer/merges.txt", b"#version: 0.2\n\xff\xfe\n"), "tokenizer/merges.txt", "is not UTF-8"),
    p("sd", "model_index-invalid-json", write("model_index.json", "{"), "model_index.json", "is not valid JSON"),
    p("sd", "scheduler-timesteps-negative", edit("scheduler/scheduler_config.json", num_train_timesteps=-1), "scheduler_config.json", "num_train_timesteps", "got -1"),
    # folders of families the project knows but does not load: refused by name, before any weights
    p("ldm", "vq-latents", lambda t: None, "model_index.json", "LDMPipeline", "vqvae/", "VQ", NO_LAYOUT),
    p("ddpm", "vqvae-without-class-name", edit("model_index.json", _class_name=None, vqvae=["diffusers", "VQModel"]), "model_index.json", "vqvae/"),
    p("identity", "class-embedding", lambda t: None, "unet/config.json", "class_embed_type 'identity'", "integer labels", "learned label table"),
    p("identity", "class-embedding-with-denoiser-json", write("denoiser.json", '{"num_classes": 10, "null_class": 10}'), "class_embed_type 'identity'"),
    p("ddpm", "timestep-class-embedding", edit("unet/config.json", class_embed_type="timestep", num_class_embeds=None), "class_embed_type 'timestep'"),
    p("sd", "inpainting-unet", edit("unet/config.json", in_channels=9), "unet/config.json", "in_channels 9 and out_channels 4", "inpainting UNet", "base"),
    p("sd", "inpainting-pipeline", edit("model_index.json", _class_name="StableDiffusionInpaintPipeline"), "StableDiffusionInpaintPipeline", "inpainting"),
    p("sd", "sdxl-refiner", index("StableDiffusionXLImg2ImgPipeline", **{k: v for k, v in SDXL.items() if k not in CLIP}), "model_index.json",
      "SDXL refiner", "out of scope", "StableDiffusionXLPipeline"),
    p("sd", "sdxl-added-conditions", edit("unet/config.json", addition_embed_type="text_time"), "unet/config.json", "addition_embed_type 'text_time'",
      "StableDiffusionXLPipeline folder"),
    # SD3 and Flux folders are loaded by their layouts: an incomplete one is told what it lacks
    p("sd", "sd3", index("StableDiffusion3Pipeline", **SD3), "StableDiffusion3Pipeline folder without tokenizer_2/", "save the whole pipeline"),
    p("sd", "flux", index("FluxPipeline", **FLUX), "transformer config missing", "transformer/config.json"),
    p("sd", "dit-without-transformer", index("DiTPipeline", **DIT), "transformer/config.json", "DiT transformer config missing"),
    p("ddpm", "unknown-pipeline", edit("model_index.json", _class_name="KarrasVePipeline"), "KarrasVePipeline", "no layout here loads", "DDPMPipeline", "StableDiffusionPipeline", "denoiser.json"),
    p("sd", "text_encoder-class-not-transformers", edit("model_index.json", text_encoder=["diffusers", "UNet2DModel"]), "model_index.json", "text_encoder", "not a PreTrainedModel"),
    # fp16 variant weights: damaged ones refused as the plain ones are; parts of different kinds, no one kind to read
    p("ddpm", "unet-fp16-truncated", then(to_variant(f"unet/{W}"), truncate(f"unet/{W16}")), f"unet/{W16}", *READ),
    p("ddpm", "unet-fp16-garbage", then(to_variant(f"unet/{W}"), write(f"unet/{W16}", GARBAGE)), f"unet/{W16}", *READ),
    p("edm", "fp16-empty", then(to_variant(W), write(W16, b"")), W16, *READ),
    p("edm", "fp16-config-vs-weights", then(to_variant(W), edit("config.json", layers_per_block=2)), W16, "do not match", "config.json"),
    p("sd", "unet-fp16-garbage", then(SD_FP16, write(f"unet/{W16}", GARBAGE)), f"unet/{W16}", *READ),
    p("sd", "vae-fp16-truncated", then(SD_FP16, truncate(f"vae/{W16}")), f"vae/{W16}", *READ),
    p("sd", "text_encoder-fp16-garbage", then(SD_FP16, write(f"text_encoder/{TW16}", GARBAGE)), f"text_encoder/{TW16}", *READ),
    p("sd", "text_encoder-fp16-config-vs-weights", then(SD_FP16, edit("text_encoder/config.json", num_hidden_layers=2)), f"text_encoder/{TW16}", "do not match"),
    p("sd", "vae-fp16-config-vs-weights", then(SD_FP16, edit("vae/config.json", layers_per_block=2)), f"vae/{W16}", "do not match", "vae/config.json"),
    p("sd", "text_encoder-fp16-only", to_variant("text_encoder/model.safetensors"), f"text_encoder/: {TW16}", f"unet/: {W}", "no one kind", "save_pretrained"),
    # refusals that once pointed the wrong way
    p("ddpm", "zero-terminal-snr", edit("scheduler/scheduler_config.json", rescale_betas_zero_snr=True), "scheduler_config.json", "rescale_betas_zero_snr", "zero-terminal-SNR"),
    p("ddpm", "zero-terminal-snr-betas", edit("scheduler/scheduler_config.json", trained_betas=ZERO_SNR_BETAS), "scheduler_config.json", "zero-terminal-SNR", "alphas_cumprod[-1] = 0"),
]


@pytest.mark.parametrize("layout, damage, needles", CASES)
def test_a_damaged_teacher_is_refused(request, tmp_path, layout, damage, needles):
    teacher = Path(shutil.copytree(request.getfixturevalue(FIXTURES[layout]), tmp_path / "teacher"))
    damage(teacher)
    generate = {} if layout == "edm" else {"solver": "pndm"}
    if layout == "sd":
        (tmp_path / "prompts.txt").write_text("the digit 7\n")
        generate["prompts"] = str(tmp_path / "prompts.txt")
    cfg = write_config(tmp_path / "c.yaml", teacher, tmp_path / "store", **generate)
    line = assert_refused(["generate", "--config", str(cfg)], tmp_path / "store", *needles)
    assert "weights_only=False" not in line  # never the advice to unpickle an untrusted file


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_single_file_checkpoint_is_refused_with_the_conversion(tmp_path, edm_teacher, suffix):
    """teacher.path at one file (what from_single_file reads): it exists, so "not found" would point the wrong way."""
    single = tmp_path / f"model{suffix}"
    shutil.copy(edm_teacher / W, single)
    cfg = write_config(tmp_path / "c.yaml", single, tmp_path / "store")
    line = assert_refused(["generate", "--config", str(cfg)], tmp_path / "store", str(single), "single-file checkpoint", "from_single_file", "save_pretrained")
    assert "not found" not in line and ("pickle" in line) == (suffix == ".ckpt")


def test_the_installed_command_refuses_too(tmp_path, edm_teacher):
    """The same refusal through the real entry point (a fresh interpreter), for one damage."""
    teacher = Path(shutil.copytree(edm_teacher, tmp_path / "teacher"))
    truncate(W)(teacher)
    cfg = write_config(tmp_path / "c.yaml", teacher, tmp_path / "store")
    assert_refused(["generate", "--config", str(cfg)], tmp_path / "store", W, *READ, subprocess_=True)

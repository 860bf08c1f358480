"""Teachers in the layouts people have: a diffusers DDPMPipeline folder, the same in the HF cache, Stable Diffusion
folders as diffusers saves them (float16, encoder_hid_dim, another text encoder); the layout interface; one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from conftest import make_vp_teacher, run_cli, tiny_unet, write_config
from dmd_core.denoisers import Parametrization
from dmd_core.errors import InputError
from dmd_core.layouts import DDPMPipelineLayout, DenoiserDirLayout, DiTPipelineLayout, FluxLayout, Layout, StableDiffusion3Layout, StableDiffusionLayout, StableDiffusionXLLayout, detect, register, registered
from dmd_core.loading import load_denoiser, read_parametrization


def ddpm_pipeline(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """What a diffusers user has: DDPMPipeline(unet, scheduler).save_pretrained(dir), nothing else."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    DDPMPipeline(unet=tiny_unet(11, seed), scheduler=sched).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same UNet and scheduler as a pipeline folder and as a denoiser directory."""
    tmp = tmp_path_factory.mktemp("layouts")
    return ddpm_pipeline(tmp / "pipeline"), make_vp_teacher(tmp / "denoiser")


def test_pipeline_folder_is_a_teacher_with_no_extra_file(both):
    pipe_dir, den_dir = both
    assert not (pipe_dir / "denoiser.json").exists()
    derived = read_parametrization(pipe_dir)
    assert derived == read_parametrization(den_dir)
    assert derived == Parametrization(kind="vp", num_classes=10, null_class=10, prediction_type="epsilon", image_shape=(1, 8, 8))
    a, b = load_denoiser(pipe_dir), load_denoiser(den_dir)
    x, t, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500, 999]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        assert torch.equal(a(x, t, labels, 2.0), b(x, t, labels, 2.0))
    assert torch.equal(a.alphas_cumprod, b.alphas_cumprod)


def test_pipeline_folder_and_denoiser_dir_give_the_same_pairs(both, tmp_path):
    outs = []
    for name, teacher in zip(("pipe", "den"), both):
        cfg = write_config(tmp_path / f"{name}.yaml", teacher, tmp_path / f"store-{name}", solver="pndm", num_samples=16, steps=3, guidance_scale=1.5)
        outs.append(Path(run_cli("generate", "--config", str(cfg), "-q").stdout.strip().splitlines()[-1]))
    shards = [sorted(p.read_bytes() for p in out.glob("pairs-*.tar")) for out in outs]
    assert shards[0] == shards[1] and len(shards[0]) == 1


def test_a_cached_hugging_face_repo_id_is_a_teacher(both, tmp_path):
    """The HF cache layout (models--org--name/snapshots/<rev>, refs/main), offline: teacher.path=org/name."""
    pipe_dir, _ = both
    repo = tmp_path / "hub" / "models--tiny-org--ddpm-digits"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(pipe_dir, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    cfg = write_config(tmp_path / "c.yaml", pipe_dir, tmp_path / "store", solver="pndm", num_samples=16, steps=3)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("generate", "--config", str(cfg), "--set", "teacher.path=tiny-org/ddpm-digits", "-q", env=env)
    m = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())
    assert m["info"]["teacher_path"].endswith(rev) and m["info"]["parametrization"] == "vp"


def test_an_override_must_agree_with_the_scheduler(both, tmp_path):
    pipe = shutil.copytree(both[0], tmp_path / "pipe")
    (pipe / "denoiser.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    with pytest.raises(InputError, match="'v_prediction' but .*scheduler_config.json says 'epsilon'"):
        read_parametrization(pipe)
    (pipe / "denoiser.json").write_text(json.dumps({"num_classes": 9, "null_class": 9}))  # overrides what may differ
    assert read_parametrization(pipe).num_classes == 9


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.mark.slow  # subprocesses; tests/bad_input/test_teacher_cases.py refuses 80 damaged teachers in process in make test
@pytest.mark.parametrize("case", ["eps", "scheduler_disagrees", "no_unet", "nothing"])
def test_bad_teachers_give_one_line(both, tmp_path, case):
    pipe_dir, den_dir = both
    if case == "eps":
        teacher = shutil.copytree(den_dir, tmp_path / "t")
        (teacher / "denoiser.json").write_text(json.dumps({**json.loads((teacher / "denoiser.json").read_text()), "prediction_type": "eps"}))
        needles = ("prediction_type must be one of epsilon, v_prediction, sample", "'eps'")
    elif case == "scheduler_disagrees":
        teacher = shutil.copytree(den_dir, tmp_path / "t")
        cfg = teacher / "scheduler" / "scheduler_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "v_prediction"}))
        needles = ("'epsilon'", "'v_prediction'", "Fix:")
    elif case == "no_unet":
        teacher = shutil.copytree(pipe_dir, tmp_path / "t")
        shutil.rmtree(teacher / "unet")
        needles = ("pipeline folder without unet/", "save_pretrained")
    else:
        teacher = tmp_path / "t"
        teacher.mkdir()
        needles = ("not a teacher", "model_index.json", "denoiser.json")
    cfg = write_config(tmp_path / "c.yaml", teacher, tmp_path / "store", solver="pndm")
    assert_one_line_error(run_cli("generate", "--config", str(cfg), check=False), *needles)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_pairs_equal_plain_diffusers_plms(both, tmp_path, guidance):
    """The stored pairs, recomputed from noise.npy with DDPMPipeline + PNDMScheduler(skip_prk_steps=True) (README)."""
    import numpy as np
    import webdataset as wds
    from diffusers import PNDMScheduler

    pipe_dir, _ = both
    cfg = write_config(tmp_path / "c.yaml", pipe_dir, tmp_path / "store", solver="pndm", num_samples=6, steps=10, shard_size=6, batch_size=6, guidance_scale=guidance)
    out = Path(run_cli("generate", "--config", str(cfg), "-q").stdout.strip().splitlines()[-1])
    samples = list(wds.WebDataset(str(out / "pairs-000000.tar"), shardshuffle=False).decode())
    z = torch.from_numpy(np.stack([s["noise.npy"] for s in samples]))
    c = torch.tensor([int(s["cls.txt"]) for s in samples])
    pipe = DDPMPipeline.from_pretrained(str(pipe_dir))
    sched = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    sched.set_timesteps(10)
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = pipe.unet(x, t, class_labels=c).sample
            if guidance != 1.0:
                uncond = pipe.unet(x, t, class_labels=torch.full_like(c, 10)).sample
                eps = uncond + guidance * (eps - uncond)
            x = sched.step(eps, t, x).prev_sample
    stored = torch.from_numpy(np.stack([s["image.npy"] for s in samples]))
    torch.testing.assert_close(stored, x, rtol=1e-5, atol=1e-5)


def test_toy_vp_teacher_is_a_plain_ddpm_pipeline(tmp_path):
    """`dmd toy teacher --kind vp` writes what a diffusers user has: no denoiser.json, loads as a teacher."""
    from stages import toy

    out = Path(toy.make_teacher(tmp_path / "teacher-vp", steps=2, kind="vp"))
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert read_parametrization(out) == Parametrization(kind="vp", num_classes=10, null_class=10, prediction_type="epsilon", image_shape=(1, 8, 8))
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)


def test_ddpm_loss_is_its_formula(both):
    from dmd_core.losses import ddpm_denoising_loss

    den = load_denoiser(both[1])
    g = torch.Generator().manual_seed(1)
    x, noise, t, labels = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 10, 500, 999]), torch.arange(4)
    abar = den.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        eps = den.unet(abar.sqrt() * x + (1 - abar).sqrt() * noise, t, class_labels=labels).sample
        assert float(ddpm_denoising_loss(den, x, t, noise, labels)) == pytest.approx(float(((eps - noise) ** 2).mean()), rel=1e-6)


# ---------------------------------------------------------------- the layout interface


def test_detect_names_each_layout_and_what_it_answers(both, edm_teacher, sd_teacher):
    pipe_dir, den_dir = both
    assert [type(layout) for layout in registered()] == [
        StableDiffusionLayout, StableDiffusionXLLayout, StableDiffusion3Layout, FluxLayout, DDPMPipelineLayout, DiTPipelineLayout, DenoiserDirLayout,
    ]  # fmt: skip
    for folder, cls in ((edm_teacher, DenoiserDirLayout), (den_dir, DenoiserDirLayout), (pipe_dir, DDPMPipelineLayout), (sd_teacher, StableDiffusionLayout)):
        layout = detect(folder)
        assert type(layout) is cls and detect(str(folder)) is layout
        assert layout.parametrization(folder) == read_parametrization(folder)
    sd, ddpm = detect(sd_teacher), detect(pipe_dir)
    assert (sd.takes_prompts, sd.pipeline_class, ddpm.takes_prompts, ddpm.pipeline_class) == (True, "StableDiffusionPipeline", False, None)
    assert sd.pixel_shape(sd_teacher, sd.parametrization(sd_teacher)) == (1, 8, 8)  # 4x4x4 latents, one 2x down block
    assert ddpm.pixel_shape(pipe_dir, ddpm.parametrization(pipe_dir)) == (1, 8, 8)
    x = torch.randn(2, 1, 8, 8)
    assert ddpm.pixel_decoder(pipe_dir)(x) is x and torch.equal(ddpm.encode_pixels(pipe_dir, x), x)
    with pytest.raises(InputError, match="conditioned on class labels: it has no text encoder"):
        ddpm.prompt_encoder(pipe_dir)


def test_the_latent_codec_is_the_pipelines_vae(sd_teacher):
    """encode_pixels = vae.encode(x).latent_dist.mean * scaling_factor; pixel_decoder = vae.decode(z / scaling_factor)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(sd_teacher / "vae"))
    layout, images = detect(sd_teacher), torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        torch.testing.assert_close(layout.encode_pixels(sd_teacher, images), latents, rtol=0, atol=0)
        torch.testing.assert_close(layout.encode_pixels(sd_teacher, images, batch_size=2), latents, rtol=0, atol=1e-6)  # in batches
        torch.testing.assert_close(layout.pixel_decoder(sd_teacher)(latents), vae.decode(latents / vae.config.scaling_factor).sample, rtol=0, atol=0)


def test_a_registered_layout_is_asked(tmp_path, monkeypatch):
    """Adding a layout is a module and a register line (docs/layouts.md): detect then answers with it."""
    import dmd_core.layouts as layouts

    class Marked(Layout):
        name, description = "marked", "a folder with marked.txt"

        def matches(self, folder: Path) -> bool:
            return (folder / "marked.txt").is_file()

    monkeypatch.setattr(layouts, "_REGISTRY", list(layouts._REGISTRY))
    (tmp_path / "marked.txt").write_text("")
    with pytest.raises(InputError, match="not a teacher.*Fix: point teacher.path at .*denoiser directory"):
        detect(tmp_path)
    layout = register(Marked())
    assert detect(tmp_path) is layout and registered()[-1] is layout
    with pytest.raises(ValueError, match="registered already"):
        register(Marked())


# ---------------------------------------------------------------- Stable Diffusion folders as diffusers saves them


def sd_variant(sd_teacher: Path, path: Path, **components) -> Path:
    """The session's tiny Stable Diffusion pipeline with some components replaced, saved by diffusers."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_teacher))
    StableDiffusionPipeline(**{**pipe.components, **components}).save_pretrained(str(path))
    return path


def conditional_unet(**changes):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    return UNet2DConditionModel(**{
        "sample_size": 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (8, 16),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 16, "norm_num_groups": 4, "attention_head_dim": 4, **changes,
    })  # fmt: skip


def pairs_against_diffusers(teacher: Path, tmp_path: Path, guidance: float = 3.0) -> float:
    """Max |stored latent - StableDiffusionPipeline(prompt, latents=z, 50 PLMS steps, output_type="latent")|, the oracle in float32."""
    import io

    import numpy as np
    import webdataset as wds
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    (tmp_path / "prompts.txt").write_text("the digit 7\na handwritten seven\n3\n")
    cfg = write_config(tmp_path / "c.yaml", teacher, tmp_path / "store", solver="pndm", steps=50, num_samples=6, shard_size=6,
                       prompts=str(tmp_path / "prompts.txt"), guidance_scale=guidance)  # fmt: skip
    out = Path(run_cli("generate", "--config", str(cfg), "-q").stdout.strip().splitlines()[-1])
    samples = list(wds.WebDataset(str(out / "pairs-000000.tar"), shardshuffle=False))
    z, got = (torch.from_numpy(np.stack([np.load(io.BytesIO(s[k])) for s in samples])) for k in ("noise.npy", "image.npy"))
    pipe = StableDiffusionPipeline.from_pretrained(str(teacher), dtype=torch.float32)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe([s["prompt.txt"].decode() for s in samples], latents=z, num_inference_steps=50, guidance_scale=guidance, output_type="latent").images
    assert got.shape == want.shape
    return float((got - want).abs().max())


def test_a_pipeline_saved_in_float16_gives_the_float32_pairs(tmp_path, sd_teacher):
    """from_pretrained(..., torch_dtype=float16).save_pretrained(d): every part loads in float32, as the UNet does."""
    from diffusers import StableDiffusionPipeline

    half = tmp_path / "sd-fp16"
    StableDiffusionPipeline.from_pretrained(str(sd_teacher), dtype=torch.float16).save_pretrained(str(half))
    layout = detect(half)
    encoder = layout.prompt_encoder(half)
    assert {p.dtype for p in encoder.text_encoder.parameters()} == {torch.float32}
    assert {p.dtype for p in layout.load_vae(half).parameters()} == {torch.float32}
    assert layout.load_denoiser(half).dtype == torch.float32
    assert pairs_against_diffusers(half, tmp_path) <= 1e-4  # a float16 text encoder: 3.2e-3


def test_a_unet_with_encoder_hid_dim_is_a_teacher(tmp_path, sd_teacher):
    """The UNet projects the 16-wide prompt embeddings to its 24-wide cross-attention itself (encoder_hid_dim)."""
    teacher = sd_variant(sd_teacher, tmp_path / "sd-hid", unet=conditional_unet(encoder_hid_dim=16, cross_attention_dim=24))
    assert read_parametrization(teacher).text_conditioned
    assert pairs_against_diffusers(teacher, tmp_path) <= 1e-4


def test_the_text_encoder_and_tokenizer_are_the_classes_model_index_names(tmp_path, sd_teacher):
    """A BERT text encoder and WordPiece tokenizer (as LDM's text-to-image models have): the prompt table is
    what StableDiffusionPipeline.encode_prompt computes from the same folder, to the bit."""
    from diffusers import StableDiffusionPipeline
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "handwritten", "the", "digit", "seven", "three", "7", "3"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(2)
    bert = BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=8))
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"), model_max_length=8)
    teacher = sd_variant(sd_teacher, tmp_path / "sd-bert", text_encoder=bert, tokenizer=tokenizer)
    assert json.loads((teacher / "model_index.json").read_text())["text_encoder"] == ["transformers", "BertModel"]
    encoder = detect(teacher).prompt_encoder(teacher)
    assert (type(encoder.tokenizer).__name__, type(encoder.text_encoder).__name__) == ("BertTokenizer", "BertModel")
    prompts = ["the digit 7", "a handwritten seven", ""]
    oracle = StableDiffusionPipeline.from_pretrained(str(teacher), dtype=torch.float32)
    with torch.no_grad():
        want, _ = oracle.encode_prompt(prompts, "cpu", 1, False)
    assert torch.equal(encoder(prompts), want)

"""Class-conditional DiT teachers (DiTPipeline folders: VP with learned variance, or flow) and DiT networks in denoiser
directories (the embedded flow teacher, generators): the layout, pairs against diffusers' own DiTPipeline, save/load."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import write_config
from dmd_core.denoisers import FlowDenoiser, Parametrization, VPDenoiser
from dmd_core.errors import InputError
from dmd_core.layouts import DiTPipelineLayout, detect
from dmd_core.loading import load_denoiser, read_parametrization, save_denoiser
from stages import chain
from stages.config import load_config


def tiny_dit(classes: int, in_channels: int = 4, learned_sigma: bool = True, size: int = 4, seed: int = 0):
    """A 2-block DiT (16 wide, 2x2 patches) with random weights."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=in_channels, out_channels=2 * in_channels if learned_sigma else in_channels,
        num_layers=2, sample_size=size, patch_size=2, num_embeds_ada_norm=classes,
    )  # fmt: skip


def make_dit_teacher(path: Path, classes: int = 1000, flow: bool = False, seed: int = 0) -> Path:
    """A tiny DiTPipeline folder: 1x8x8 images as 4x4x4 latents; DiT-XL-2's DDIM schedule (linear betas) and learned
    variance, or (``flow``) a FlowMatchEulerDiscreteScheduler (shift 3, SD3's) and v prediction."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, FlowMatchEulerDiscreteScheduler

    transformer = tiny_dit(classes, learned_sigma=not flow, seed=seed)
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=8,
    )  # fmt: skip
    if flow:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        sched = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False, set_alpha_to_one=True)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=sched).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def dit_imagenet(tmp_path_factory) -> Path:
    """1000 classes: DiTPipeline's unconditional label is the literal 1000, so only such a DiT can be guided there."""
    return make_dit_teacher(tmp_path_factory.mktemp("teacher") / "dit")


@pytest.fixture(scope="module")
def dit_digits(tmp_path_factory) -> Path:
    return make_dit_teacher(tmp_path_factory.mktemp("teacher") / "dit10", classes=10)


def read_pairs(out: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, image, class) of every stored pair, in order."""
    z, x, c = [], [], []
    for shard in sorted(out.glob("pairs-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            z.append(np.load(io.BytesIO(s["noise.npy"])))
            x.append(np.load(io.BytesIO(s["image.npy"])))
            c.append(int(s["cls.txt"]))
    return torch.from_numpy(np.stack(z)), torch.from_numpy(np.stack(x)), torch.tensor(c)


def dit_pipeline_latents(folder: Path, labels: torch.Tensor, z: torch.Tensor, steps: int, guidance: float, monkeypatch, scheduler=None) -> torch.Tensor:
    """``DiTPipeline(labels, guidance_scale, num_inference_steps)``'s final latents from the noise ``z``: its noise draw
    returns ``z`` and its VAE decode records what it is given (the pipeline has no latents argument and decodes always)."""
    from diffusers import DiTPipeline
    from diffusers.pipelines.dit import pipeline_dit

    pipe = DiTPipeline.from_pretrained(str(folder))
    if scheduler is not None:
        pipe.scheduler = scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(pipeline_dit, "randn_tensor", lambda shape, **kw: z.clone())
    seen, decode = [], pipe.vae.decode
    pipe.vae.decode = lambda latents, *a, **k: (seen.append(latents), decode(latents, *a, **k))[1]
    with torch.no_grad():
        pipe(labels.tolist(), guidance_scale=guidance, num_inference_steps=steps, output_type="pt")
    return seen[0] * pipe.vae.config.scaling_factor


def plms(config):
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(config, skip_prk_steps=True)


# ---------------------------------------------------------------- the layout


def test_dit_folder_is_a_class_conditional_latent_teacher(dit_imagenet):
    """VP on the VAE's latents; 1000 classes, null class 1000 (the label-dropout row); x0 from the mean channels."""
    layout = detect(dit_imagenet)
    assert isinstance(layout, DiTPipelineLayout) and (layout.takes_prompts, layout.pipeline_class) == (False, "DiTPipeline")
    p = read_parametrization(dit_imagenet)
    assert (p.kind, p.prediction_type, p.num_classes, p.null_class, p.image_shape) == ("vp", "epsilon", 1000, 1000, (4, 4, 4))
    assert layout.pixel_shape(dit_imagenet, p) == (1, 8, 8)
    den = load_denoiser(dit_imagenet)
    assert isinstance(den, VPDenoiser) and den.unet.config.out_channels == 8
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(3, 4, 4, 4, generator=g), torch.tensor([10, 500, 999]), torch.tensor([0, 7, 1000])
    abar = den.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    with torch.no_grad():
        eps = den.unet(x, t, class_labels=c).sample[:, :4].double()
        want = (x.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
        torch.testing.assert_close(den(x, t, c).double(), want, rtol=0, atol=1e-5)
    # DiT's own label dropout (p = 0.1 in train mode) is off: a network in training sees the labels it is given
    den.unet.train()
    with torch.no_grad():
        assert torch.equal(den.unet(x, t, class_labels=c).sample, den.unet(x, t, class_labels=c).sample)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_pairs_equal_diffusers_dit_pipeline(tmp_path, dit_imagenet, guidance, monkeypatch):
    """The stored latents = DiTPipeline(labels, guidance_scale=g, num_inference_steps=10) from the same noise with the same
    scheduler (PLMS, the generate stage's VP solver). At g = 4 the pipeline guides epsilon (its first 4 channels), the
    project guides x0: the same map, as x0 is affine in epsilon with label-free coefficients. Within 1e-4 of the latents'
    scale: a random DiT under DiT's linear schedule (alpha_999 = 0.006) ends at latents up to ~200 at g = 4, where
    float32 itself resolves only ~1e-5."""
    cfg = write_config(tmp_path / "c.yaml", dit_imagenet, tmp_path / "store", solver="pndm", steps=10, num_samples=6, shard_size=6, guidance_scale=guidance)
    c = load_config(cfg)
    m = chain.run(c, "generate", progress=False).manifest
    z, got, labels = read_pairs(Path(c.store) / "generate" / m.key)
    assert labels.tolist() == list(range(6))
    want = dit_pipeline_latents(dit_imagenet, labels, z, 10, guidance, monkeypatch, scheduler=plms)
    assert got.shape == want.shape == (6, 4, 4, 4) and float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


def test_the_null_class_is_the_models_own(dit_digits, monkeypatch):
    """A 10-class DiT is guided here with null class 10; DiTPipeline's unconditional label is the literal 1000 (ImageNet's),
    out of its label table, so the pipeline cannot guide it (docs/layouts.md, DiT)."""
    p = read_parametrization(dit_digits)
    assert (p.num_classes, p.null_class) == (10, 10)
    den = load_denoiser(dit_digits)
    x, c = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    with torch.no_grad():
        u, k = den(x, 500, torch.tensor([10, 10])), den(x, 500, c)
        torch.testing.assert_close(den(x, 500, c, 2.5), u + 2.5 * (k - u), rtol=0, atol=1e-5)
    with pytest.raises(IndexError):
        dit_pipeline_latents(dit_digits, c, x, 2, 2.5, monkeypatch)


def test_a_flow_scheduler_in_a_dit_pipeline_is_refused(tmp_path):
    """DiTPipeline cannot run a FlowMatch scheduler (no scale_model_input): such a folder is told to be a denoiser directory."""
    folder = make_dit_teacher(tmp_path / "dit-flow", classes=10, flow=True)
    with pytest.raises(InputError, match="cannot run a flow-matching scheduler.*denoiser directory"):
        read_parametrization(folder)


# ---------------------------------------------------------------- DiT networks in denoiser directories (flow teachers, generators)


def flow_dit_dir(path: Path, shift: float = 1.0, seed: int = 0) -> Path:
    """A tiny class-conditional flow DiT on 1x8x8 pixels as a denoiser directory (data/teacher-flow's layout)."""
    param = Parametrization(kind="flow", num_classes=10, null_class=10, image_shape=(1, 8, 8), shift=shift)
    return save_denoiser(FlowDenoiser(tiny_dit(10, in_channels=1, learned_sigma=False, size=8, seed=seed), param), path)


def test_dit_generators_save_and_load(tmp_path):
    """A flow DiT and a learned-variance VP DiT (a DiTPipeline teacher's generator) saved as denoiser directories load back
    as the same denoiser: config.json of the DiTTransformer2DModel, denoiser.json, and for VP its scheduler."""
    from diffusers import DDIMScheduler

    flow = load_denoiser(flow_dit_dir(tmp_path / "flow", shift=3.0))
    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    param = Parametrization(kind="vp", num_classes=10, null_class=10, image_shape=(4, 4, 4), one_step_timestep=500)
    vp = VPDenoiser(tiny_dit(10, seed=1).eval(), param, sched.alphas_cumprod, dict(sched.config))  # eval: DiT drops labels in train mode
    for den, path, level in ((flow, tmp_path / "flow-again", 0.7), (vp, tmp_path / "vp", 500)):
        back = load_denoiser(save_denoiser(den, path))
        assert type(back) is type(den) and back.param == den.param and json.loads((path / "config.json").read_text())["_class_name"] == "DiTTransformer2DModel"
        x = torch.randn(3, *den.param.image_shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.equal(back(x, level, torch.tensor([1, 2, 10]), 2.0), den(x, level, torch.tensor([1, 2, 10]), 2.0))
    assert flow.param.shift == 3.0 and back.unet.config.out_channels == 8


@pytest.mark.parametrize("solver, guidance", [("heun", 1.0), ("euler", 3.0)])
def test_flow_dit_pairs_equal_diffusers_flow_match_loops(tmp_path, solver, guidance):
    """The stored pairs of a flow DiT denoiser directory = diffusers' FlowMatch{Heun,Euler}DiscreteScheduler loop over the
    transformer (timestep s x 1000, CFG on v with the null class 10), from the same noise and levels (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    teacher = flow_dit_dir(tmp_path / "teacher", shift=3.0)
    cfg = write_config(tmp_path / "c.yaml", teacher, tmp_path / "store", solver=solver, steps=6, num_samples=6, shard_size=6, guidance_scale=guidance)
    c = load_config(cfg)
    m = chain.run(c, "generate", progress=False).manifest
    z, got, labels = read_pairs(Path(c.store) / "generate" / m.key)
    net = load_denoiser(teacher).unet
    sched = (FlowMatchHeunDiscreteScheduler if solver == "heun" else FlowMatchEulerDiscreteScheduler)(shift=3.0)
    sched.set_timesteps(6)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            ts = t.expand(len(x))
            v = net(x, ts, class_labels=labels).sample
            if guidance != 1.0:
                u = net(x, ts, class_labels=torch.full_like(labels, 10)).sample
                v = u + guidance * (v - u)
            x = sched.step(v, t, x).prev_sample
    assert float((got - x).abs().max()) <= 1e-4 * max(1.0, float(x.abs().max()))


def test_toy_flow_teacher_is_a_dit_denoiser_directory(tmp_path):
    """`dmd toy teacher --kind flow` writes a denoiser directory of a DiT (no scheduler: denoiser.json holds the flow
    parametrisation); the denoiser's x0 = x_s - s v, v the transformer's output at timestep 1000 s; the training loss is
    rectified flow's ||v - (eps - x0)||^2."""
    from dmd_core.digits_flow import FlowTraining, flow_matching_loss, flow_parametrization
    from stages import toy

    out = Path(toy.make_teacher(tmp_path / "teacher-flow", steps=2, kind="flow"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "denoiser.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((out / "config.json").read_text())["_class_name"] == "DiTTransformer2DModel"
    assert read_parametrization(out) == flow_parametrization()
    info = json.loads((tmp_path / "teacher-flow-training.json").read_text())
    assert info["kind"] == "flow" and info["training"]["steps"] == 2 and info["training"] == {**vars(FlowTraining()), "steps": 2}
    den = load_denoiser(out)
    assert isinstance(den, FlowDenoiser)
    g = torch.Generator().manual_seed(0)
    x0, eps, s, c = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0.1, 0.4, 0.7, 1.0]), torch.tensor([0, 3, 9, 10])
    x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        v = den.unet(x_s, s * 1000, class_labels=c).sample
        torch.testing.assert_close(den(x_s, s, c), x_s - s.view(-1, 1, 1, 1) * v, rtol=0, atol=1e-6)
        assert float(flow_matching_loss(den, x0, s, eps, c)) == pytest.approx(float(((v - (eps - x0)) ** 2).mean()), rel=1e-6)


# ---------------------------------------------------------------- generate -> distill -> evaluate -> export


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory, dit_digits):
    """The chain on the tiny 10-class DiT (PLMS pairs, 2 distill steps, evaluation decoded through its VAE)."""
    from conftest import ROOT

    tmp = tmp_path_factory.mktemp("dit-run")
    cfg = write_config(tmp / "c.yaml", dit_digits, tmp / "store", distill={"steps": 2, "guidance_scale": 2.0}, solver="pndm", steps=4, num_samples=8, shard_size=8)
    overrides = ["evaluate.num_samples=80", "evaluate.batch_size=40", "evaluate.features=digits", f"evaluate.classifier={ROOT / 'data' / 'classifier'}",
                 "evaluate.speed_batch_size=4", "evaluate.speed_repeats=1", "export.parity_samples=4"]  # fmt: skip
    c = load_config(cfg, overrides)
    return c, chain.run(c, "export", progress=False).manifest


def test_chain_runs_end_to_end_on_a_dit_teacher(dit_run):
    """The generator is a DiT in a denoiser directory (learned variance kept, mean read); evaluation decodes with the VAE;
    the export is a DiTPipeline that reproduces the generator in a fresh process."""
    c, m = dit_run
    r = m.info["metrics"]
    assert r["teacher_nfe"] == 5 and r["student_nfe"] == 1 and r["student_fd"] > 0 and 0.0 <= r["student_class_accuracy"] <= 1.0
    assert m.info["layout"] == "DiTPipeline" and m.info["plain_diffusers_parity"]["max_rel_diff"] <= 1e-5
    gen_dir = next((Path(c.store) / "distill").glob("*/generator"))
    assert json.loads((gen_dir / "config.json").read_text())["_class_name"] == "DiTTransformer2DModel"
    gen = load_denoiser(gen_dir)
    assert isinstance(gen, VPDenoiser) and gen.param.num_classes == 10 and gen.unet.config.out_channels == 8
    card = (Path(c.store) / "export" / m.key / "README.md").read_text()
    assert "DiTPipeline.from_pretrained" in card and "guidance_scale=1.0" in card


def test_export_is_a_plain_dit_pipeline(dit_run):
    """DiTPipeline.from_pretrained(export)(labels, guidance_scale=1, num_inference_steps=1, generator=g) decodes G(z), z the
    pipeline's own draw from g, and its images are the VAE's decode of G(z)."""
    from diffusers import DiTPipeline

    from dmd_core.dmd import OneStep

    c, m = dit_run
    out = Path(c.store) / "export" / m.key
    pipe = DiTPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 1, 4, 1, 5]
    with torch.no_grad():
        got = pipe(labels, guidance_scale=1.0, num_inference_steps=1, generator=torch.Generator().manual_seed(5), output_type="pt").images
        gen = load_denoiser(out / "transformer")
        z = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(5))
        latents = OneStep.of(gen)(gen, z, torch.tensor(labels))
        want = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert pipe.scheduler.timesteps.tolist() == [OneStep.of(gen).level]
    assert float((got - want).abs().max()) <= 1e-5


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """The chain on a tiny flow DiT denoiser directory (pixel space, Heun pairs): the embedded flow teacher's path."""
    from conftest import ROOT

    tmp = tmp_path_factory.mktemp("flow-run")
    teacher = flow_dit_dir(tmp / "teacher")
    cfg = write_config(tmp / "c.yaml", teacher, tmp / "store", distill={"steps": 2, "guidance_scale": 2.0}, solver="heun", steps=3, num_samples=8, shard_size=8)
    overrides = ["evaluate.num_samples=80", "evaluate.batch_size=40", "evaluate.features=digits", f"evaluate.classifier={ROOT / 'data' / 'classifier'}",
                 "evaluate.speed_batch_size=4", "evaluate.speed_repeats=1", "export.parity_samples=4"]  # fmt: skip
    c = load_config(cfg, overrides)
    return c, chain.run(c, "export", progress=False).manifest


def test_flow_dit_exports_as_a_one_step_pipeline(flow_run):
    """OneStepPipeline.from_pretrained(export) holds the DiT and the flow parametrisation; its images are
    G(z) = z - v(z, 1), v the DiT's output at timestep 1000 (by hand here); ONNX and a fresh process reproduce it."""
    from dmd_core.pipeline import OneStepPipeline

    c, m = flow_run
    r = m.info["metrics"]
    assert r["teacher_nfe"] == 5 and r["student_nfe"] == 1 and m.info["torch_parity"]["bit_identical"] and m.info["onnx"]["max_rel_diff"] <= 1e-5
    out = Path(c.store) / "export" / m.key
    pipe = OneStepPipeline.from_pretrained(str(out))
    den = pipe.denoiser()
    assert isinstance(den, FlowDenoiser) and den.param.kind == "flow" and type(pipe.generator).__name__ == "DiTTransformer2DModel"
    z, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 4, 9, 2])
    with torch.no_grad():
        got = pipe(class_labels=labels, noise=z, output_type="pt")
        want = z - pipe.generator(z, torch.full((4,), 1000.0), class_labels=labels).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert "DiTTransformer2DModel.from_pretrained" in (out / "README.md").read_text()


def test_k_step_dit_export_runs_dmd2s_sampler_through_lcm(tmp_path, dit_digits):
    """A 4-step generator in a DiTPipeline with LCM (what the export writes): the pipeline's latents from
    generator=manual_seed(s) after torch.manual_seed(s) = MultiStep with the later noise in that global RNG's order."""
    import dataclasses

    from diffusers import DiTPipeline

    from dmd_core.layouts import detect
    from dmd_core.pipeline import multi_step_scheduler
    from stages.export.dit import dit_latents_to_file, reference_latents

    den = load_denoiser(dit_digits)
    den.set_param(dataclasses.replace(den.param, one_step_timestep=999, generator_timesteps=(999, 749, 499, 249)))
    sched = multi_step_scheduler(json.loads((dit_digits / "scheduler" / "scheduler_config.json").read_text()))
    DiTPipeline(transformer=den.unet, vae=detect(dit_digits).load_vae(dit_digits), scheduler=sched).save_pretrained(str(tmp_path / "export"))
    dit_latents_to_file(str(tmp_path / "export"), 3, 11, 4, str(tmp_path / "x.npy"))
    got, want = np.load(tmp_path / "x.npy"), reference_latents(den, 3, 11)
    assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())
    assert float(np.abs(reference_latents(den, 3, 12) - want).max()) > 1e-2  # the seed matters

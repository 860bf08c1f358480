"""Stage ``export``: the one-step generator as something others load without this project.

Output ``<store>/export/<key>/``:
- ``generator/``: diffusers ``save_pretrained`` layout (+ ``denoiser.json``): ``UNet2DModel.from_pretrained``;
- ``model_index.json``: ``OneStepPipeline.from_pretrained(<export>)`` (this project's diffusers pipeline);
- ``one_step.json``: everything needed to call the UNet once by hand;
- ``generator.onnx`` (opset ``export.opset``), checked against PyTorch with onnxruntime;
- ``grid.png``, ``README.md`` (model card), ``config.yaml`` and ``manifest.json``.
Export always follows an evaluation (run first by the chain when missing), so every card carries its metrics.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from dmd_core.denoisers import FLOW_FIELDS, VPDenoiser
from dmd_core.dmd import MultiStep, OneStep, noise_levels, step_noise
from dmd_core.errors import InputError
from dmd_core.faults import fault_point
from dmd_core.loading import PARAM_FILE, load_denoiser
from dmd_core.lora import LORA_DIR, network_folder, read_adapter, save_pipeline_lora
from dmd_core.pipeline import DenoiserCallModule, OneStepModule, OneStepPipeline
from dmd_core.render import md_code, md_fenced, py_literal
from dmd_core.shards import sample_labels, sample_noise
from dmd_core.text import iter_prompts

from ..config import PipelineConfig
from ..evaluate import missing_metrics
from ..gate import EXAMPLE, parse
from ..contract import FileEntry, Manifest, Plan, StageOutput, Teacher, file_entry, spec, stage_manifest
from ..files import Timer, write_text_atomic
from ..store import open_store
from .dit import PIPELINE as DIT_PIPELINE, dit_export

STAGE = "export"
SPEC = spec(STAGE)
log = logging.getLogger("dmd")


def check(cfg: PipelineConfig, teacher: Teacher) -> None:
    """export.promote_if reads only metrics evaluate measures for this config and teacher: a gate on one it cannot
    measure would fail every run, after the whole pipeline ran."""
    if cfg.export.promote_if is None:
        return
    missing = missing_metrics(cfg, teacher)
    unmeasured = sorted(m for m in parse(cfg.export.promote_if).metrics() if m in missing)
    if unmeasured:
        fixes = "; ".join(dict.fromkeys(missing[m] for m in unmeasured))
        raise InputError(f"export.promote_if reads {', '.join(unmeasured)}, which evaluate does not measure with these settings. "
                         f"Fix: {fixes}, or gate on what it measures (e.g. {EXAMPLE!r}).")  # fmt: skip


def generator_here(cfg: PipelineConfig, info: dict) -> str:
    """The evaluated generator's folder on this machine. Evaluate records where it read it; an object store's
    outputs live in each machine's own cache, so one recorded elsewhere is found (and fetched) through the store."""
    gen, distilled = Path(info["generator_dir"]), Path(info.get("distill_dir") or "")
    if gen.exists() or distilled.parent.name != "distill" or not gen.is_relative_to(distilled):
        return str(gen)
    store = open_store(cfg.store)
    out = store.output_dir("distill", distilled.name)
    if out == distilled or store.verified(out) is None:
        return str(gen)  # not the store's (an evaluate.distill folder elsewhere): its absence is reported where it is read
    return str(out / gen.relative_to(distilled))


def plan(cfg: PipelineConfig, teacher: Teacher, evaluation: StageOutput) -> Plan:
    """Key = (export config, the evaluation's digest); every card carries its evaluation's metrics."""
    up = {"evaluate": evaluation.manifest.digest}
    gen_dir = generator_here(cfg, evaluation.manifest.info)
    key = SPEC.key(cfg, up)
    info = {"generator_dir": gen_dir, "teacher_digest": teacher.digest}
    return Plan(STAGE, key, open_store(cfg.store).output_dir(STAGE, key), up, {"teacher": str(teacher.path), "evaluate": str(evaluation.out_dir)}, info)


def one_step_spec(den) -> dict:
    p = den.param
    spec = {
        "parametrization": p.kind,
        "network_evaluations": 1,
        "image_shape": list(p.image_shape) if p.image_shape else None,
        "data_range": list(p.data_range),
        "num_classes": p.num_classes,
        "null_class": p.null_class,
    }
    if p.kind == "edm":
        spec.update(alpha=1.0, sigma=p.sigma_max, sigma_max=p.sigma_max, sigma_data=p.sigma_data,
                    recipe="x = c_skip*(sigma_max*z) + c_out*UNet(c_in*(sigma_max*z), ln(sigma_max)/4, class); "
                           "c_skip = sd^2/(s^2+sd^2), c_out = s*sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), s = sigma_max, sd = sigma_data")  # fmt: skip
    elif p.kind == "flow":
        g = OneStep.of(den)
        spec.update(level=g.level, timestep=g.level * p.num_train_timesteps, alpha=1 - g.level, sigma=g.level, input_scale=g.scale,
                    recipe="x = input_scale*z (= z, as x at level s = sigma); v = network(x, timestep = s * num_train_timesteps, prompt); x0 = x - s*v")  # fmt: skip
    else:
        g = OneStep.of(den)
        abar = float(den.alphas_cumprod[g.level])
        spec.update(timestep=g.level, alpha=abar**0.5, sigma=(1 - abar) ** 0.5, input_scale=g.scale, prediction_type=p.prediction_type,
                    recipe="x = input_scale*z (= z); out = UNet(x, timestep, class); x0 = (x - sigma*out)/alpha (epsilon), alpha*x - sigma*out (v_prediction), out (sample)")  # fmt: skip
    steps = MultiStep.of(den)
    if steps.num_steps > 1:  # DMD2's k-step sampler: x_j = alpha_j x0 + sigma_j eps_j (fresh), then one call at t_j
        later = []
        for t in steps.later:
            alpha, sigma, level = noise_levels(p, torch.tensor([t]), getattr(den, "alphas_cumprod", None))
            later.append({"timestep": t, "level": float(level[0]), "alpha": float(alpha[0]), "sigma": float(sigma[0])})
        spec.update(network_evaluations=steps.num_steps, generator_timesteps=list(p.generator_timesteps), later_steps=later,
                    later_recipe="for each later step: x = alpha*x0 + sigma*eps (eps ~ N(0, I), fresh); x0 = the same one-call "
                                 "formula at that step's level (EDM: sigma = level; VP: timestep; flow: s = level)")  # fmt: skip
    return spec


def pipeline_for(den) -> OneStepPipeline:
    p = den.param
    abar = den.alphas_cumprod.tolist() if isinstance(den, VPDenoiser) else None
    return OneStepPipeline(
        den.unet, kind=p.kind, sigma_max=p.sigma_max, sigma_data=p.sigma_data, num_classes=p.num_classes,
        null_class=p.null_class, image_shape=list(p.image_shape) if p.image_shape else None,
        prediction_type=p.prediction_type, alphas_cumprod=abar, one_step_timestep=p.one_step_timestep,
        generator_timesteps=list(p.generator_timesteps) if p.generator_timesteps else None, sigma_min=p.sigma_min,
        flow={k: getattr(p, k) for k in FLOW_FIELDS} if p.kind == "flow" else None,
    )  # fmt: skip


def fixed_inputs(cfg: PipelineConfig, den) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The evaluate stage's first ``parity_samples`` noises and labels."""
    n = cfg.export.parity_samples
    return sample_noise(cfg.evaluate.seed, range(n), tuple(den.param.image_shape)), sample_labels(range(n), den.num_classes)


def write_onnx(cfg: PipelineConfig, den, out: Path, want: np.ndarray) -> dict:
    """generator.onnx and its parity with PyTorch (``want``: the generator on the fixed inputs) under onnxruntime, CPU.

    One-step: (noise, class_labels) -> image. k-step: one network call (x, level, class_labels) -> x0, which the
    parity check runs k times with one_step.json's schedule and the later steps' seeded noise."""
    import onnxruntime

    z, labels = fixed_inputs(cfg, den)
    steps = MultiStep.of(den)
    if steps.num_steps > 1:
        module = DenoiserCallModule(den).eval()
        args = (z * steps.first.scale, torch.full((len(z),), float(steps.first.level), dtype=torch.float64))
        args = (*args, labels) if labels is not None else args
        names = ["x", "level", "class_labels"][: len(args)]
    else:
        module = OneStepModule(den).eval()
        args = (z, labels) if labels is not None else (z,)
        names = ["noise", "class_labels"][: len(args)]
    tmp = out / ".generator.onnx.tmp"
    with warnings.catch_warnings():
        # diffusers' upsampler branches on the batch size (a memory-layout choice): harmless for the trace
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, args, str(tmp), opset_version=cfg.export.opset, dynamo=False, input_names=names, output_names=["image"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "image"]},
        )  # fmt: skip
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    if steps.num_steps > 1:
        def call(x, level, labels):  # the ONNX network call in place of the PyTorch one
            feed = {"x": x.numpy(), "level": torch.as_tensor(level, dtype=torch.float64).expand(len(x)).numpy()}
            return torch.from_numpy(session.run(None, {**feed, **({"class_labels": labels.numpy()} if labels is not None else {})})[0])

        got = steps(call, z, labels, step_noise(cfg.evaluate.seed, range(len(z)), tuple(den.param.image_shape))).numpy()
    else:
        got = session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
    diff = float(np.abs(got - want).max())
    # relative to the output's scale: a generator whose outputs span [-10, 6] carries larger float error
    rel = diff / max(float(np.abs(want).max()), 1e-12)
    if not rel <= cfg.export.onnx_tolerance:
        tmp.unlink()
        raise InputError(
            f"ONNX parity failed: max |ONNX - PyTorch| / max |PyTorch| = {rel:.3g} (absolute {diff:.3g}) > export.onnx_tolerance = "
            f"{cfg.export.onnx_tolerance} on {len(z)} fixed inputs. Fix: try another export.opset, or set export.onnx=false."
        )
    tmp.replace(out / "generator.onnx")
    return {"opset": cfg.export.opset, "max_abs_diff": diff, "max_rel_diff": rel, "inputs": len(z), "runtime": f"onnxruntime {onnxruntime.__version__}"}


def reference_output(cfg: PipelineConfig, den) -> np.ndarray:
    """The evaluated generator on the fixed inputs: what ONNX and a fresh process must reproduce."""
    z, labels = fixed_inputs(cfg, den)
    later = step_noise(cfg.evaluate.seed, range(len(z)), tuple(den.param.image_shape))  # k-step generators only
    with torch.no_grad():
        return MultiStep.of(den)(den, z, labels, later).numpy()


def fresh_process_parity(cfg: PipelineConfig, out: Path, want: np.ndarray, lora_of: tuple[str, str | None] | None = None) -> tuple[dict, np.ndarray | None]:
    """Load the export in a new Python process and compare with ``want``, bit for bit. ``lora_of`` = (the teacher's
    network folder, variant): also, in the same process, the export's pipeline with that network plus ``lora/`` as its
    generator (``dmd_core.lora.lora_sample_to_file``), whose images are returned (else None)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "x.npy"
        # the same torch thread count as here: CPU kernels round differently with another (about 3e-7)
        code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); from dmd_core.pipeline import sample_to_file; "
                "sample_to_file(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])")
        args = [str(out), str(cfg.evaluate.seed), str(len(want)), str(result)]
        if lora_of is not None:  # one process: each start imports torch and diffusers again (seconds)
            code += ("; import json; from dmd_core.lora import lora_sample_to_file; "
                     "lora_sample_to_file(sys.argv[1], sys.argv[5], json.loads(sys.argv[6]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[7])")
            args += [lora_of[0], json.dumps(lora_of[1]), str(Path(tmp) / "y.npy")]
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise InputError(f"the export in {out} does not load in a fresh process: {proc.stderr.strip().splitlines()[-1:]}")
        got = np.load(result, allow_pickle=False)
        got_lora = np.load(Path(tmp) / "y.npy", allow_pickle=False) if lora_of is not None else None
    identical = bool(got.shape == want.shape and np.array_equal(got, want))
    if not identical:
        raise InputError(f"the export in {out} does not reproduce the evaluated generator bit for bit (max diff {np.abs(got - want).max():.3g})")
    return {"bit_identical": True, "inputs": len(want)}, got_lora


def class_model_use(cfg: PipelineConfig, out: Path, info: dict) -> str:
    """The model card's "Use" section of a class-conditional (or unconditional) generator."""
    code = f"""from dmd_core.pipeline import OneStepPipeline
pipe = OneStepPipeline.from_pretrained({py_literal(open_store(cfg.store).final_dir(out))})
images = pipe(class_labels=[0, 1, 2, 3], seed=0)           # list of PIL images"""
    return f"""## Use

{md_fenced(code, "python")}
Without this project, with diffusers only, see `one_step.json` (the recipe) and `generator/`
(`{info.get('network_class', 'UNet2DModel')}.from_pretrained`). ONNX: `generator.onnx`, inputs `noise` (N, {', '.join(map(str, info['image_shape']))}) and
`class_labels` (N,), output `image` (data range {info['data_range']}; measured on {cfg.export.parity_samples} fixed inputs:
[{info['output_range'][0]:.3f}, {info['output_range'][1]:.3f}]), opset {info.get('onnx', {}).get('opset', 'n/a')}, max |ONNX - PyTorch| =
{info.get('onnx', {}).get('max_abs_diff', float('nan')):.2e} (relative to the output's scale
{info.get('onnx', {}).get('max_rel_diff', float('nan')):.2e}) on {cfg.export.parity_samples} fixed inputs. A fresh Python
process loading this directory reproduces the evaluated generator bit for bit on the same inputs.

"""


def network_class(out: Path) -> str:
    """The diffusers class of the export's generator/ (a UNet2DModel, or the DiTTransformer2DModel of a flow teacher)."""
    return json.loads((out / "generator" / "config.json").read_text()).get("_class_name", "UNet2DModel")


def model_card(cfg: PipelineConfig, em: Manifest, out: Path, info: dict, files: list[FileEntry], use: str) -> str:
    r = em.info["metrics"]
    pc = em.pipeline_config
    d, g = pc["distill"], pc["generate"]
    fd = "FD-digits" if r["features"] == "digits" else "FID"
    acc = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    text = bool(pc["evaluate"].get("prompts"))
    samples = "samples over the held-out prompts" if text else "class-balanced samples"
    accuracy = "prompt accuracy (the named class)" if text else "class accuracy"
    # user text (paths, names) is code or escaped text: a path cannot open markup in the card
    prompt_line = f"\n- Prompts: {md_code(g['prompts'])} (pairs, DM term), held-out {md_code(pc['evaluate']['prompts'])} (evaluation)." if text else ""
    clip_row = f"\n| CLIP score ({md_code(pc['evaluate']['clip_model'], cell=True)}) | {r['teacher_clip_score']:.2f} | {r['student_clip_score']:.2f} |" if "student_clip_score" in r else ""
    checksums = "\n".join(f"| {md_code(f.name, cell=True)} | {f.size} | {md_code(f.sha256, cell=True)} |" for f in files)
    k = r.get("student_nfe", 1)
    title, evals = ("One-step generator", "one network evaluation") if k == 1 else (f"{k}-step generator", f"{k} network evaluations")
    return f"""# {title} (DMD)

Distilled with dmd-pipeline by Distribution Matching Distillation
(Yin et al., CVPR 2024) from the teacher {md_code(pc['teacher']['path'])}: {evals} per image instead
of {r['teacher_nfe']}.

![teacher (left) and this generator (right), same noise and {"prompts (above each column)" if text else "labels"}](grid.png)

## Metrics (evaluate stage, {r['num_samples']} {samples})

| | teacher ({r['teacher_nfe']} NFE) | {"one-step" if k == 1 else f"{k}-step"} ({k} NFE) |
|---|---|---|
| {fd} | {r['teacher_fd']:.4f} | {r['student_fd']:.4f} |
| {accuracy} | {acc(r['teacher_class_accuracy'])} | {acc(r['student_class_accuracy'])} |{clip_row}
| images/s (same batch, same process) | {r['teacher_images_per_s']:.1f} | {r['student_images_per_s']:.1f} |

{fd} ratio (one-step / teacher): **{r['fd_ratio']:.3f}**; speedup **{r['speedup']:.1f}x**. Weights: {md_code(r['generator'])}.

## Training

- Data: {g['num_samples']} (noise, image) pairs from the teacher's {g['solver']} solver, {g['steps']} steps
  (guidance {g['guidance_scale']}).{prompt_line}
- Generator loss: distribution matching (real score = teacher with guidance {d['guidance_scale']}, fake score
  trained alongside) + {d['regression_weight']} x {d['regression_loss']} regression on the pairs.
- {d['steps']} steps, batch {d['batch_size']} per process, AdamW lr {d['generator_optimizer']['lr']} (generator) /
  {d['fake_optimizer']['lr']} (fake score), {d['fake_updates_per_generator_update']} fake update(s) per step,
  EMA {d['ema_decay']}, mixed precision {d['mixed_precision']}.

{use}
## Files

| file | bytes | sha256 |
|---|---|---|
{checksums}

## Resolved config

{md_fenced(yaml.safe_dump(pc, sort_keys=False), "yaml")}"""


def text_to_image_export(cfg: PipelineConfig, p: Plan, em: Manifest, den, out: Path) -> tuple[dict, str]:
    """A standard StableDiffusionPipeline (or SDXL, SD3, Flux) folder: the teacher's VAE, text encoders and tokenizers,
    the generator as ``unet/`` (``transformer/`` for SD3 and Flux) and a scheduler whose steps are the generator's
    (one-step DDIM, k-step LCM; for flow models FlowMatchEuler without shift); checked in a fresh process with plain diffusers."""
    import diffusers

    from dmd_core.pipeline import FLOW_PIPELINES, flow_export_scheduler, multi_step_scheduler, null_components, one_step_scheduler

    teacher_path = p.inputs["teacher"]
    name = p.teacher().pipeline_class
    pipeline_cls = getattr(diffusers, name)
    pipe = pipeline_cls.from_pretrained(teacher_path, variant=p.teacher().variant, dtype=torch.float32, **null_components(teacher_path))  # as the stages read it
    steps = MultiStep.of(den)
    k, timesteps = steps.num_steps, list(den.param.generator_timesteps or [])
    flow = name in FLOW_PIPELINES
    if flow:  # the generator's levels passed as sigmas to an unshifted FlowMatchEuler scheduler
        sched = flow_export_scheduler(dict(pipe.scheduler.config), k)
    elif k > 1:  # DMD2's k-step sampler as diffusers' LCM scheduler
        sched = multi_step_scheduler(dict(pipe.scheduler.config))
    else:
        sched = one_step_scheduler(dict(pipe.scheduler.config), OneStep.of(den).level)
    if name == "StableDiffusionPipeline":
        parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)  # fmt: skip
    elif flow:  # SD3 (T5 or null), Flux: every encoder and tokenizer the teacher has
        parts = dict(pipe.components)
    else:  # SDXL: both encoders and tokenizers, and the unconditional row the teacher's CFG used
        parts = {**pipe.components, "force_zeros_for_empty_prompt": pipe.config.force_zeros_for_empty_prompt}
    network = "transformer" if flow else "unet"
    pipeline_cls(**{**parts, network: den.unet, "scheduler": sched}).save_pretrained(str(out), safe_serialization=True)
    if flow:  # the image size and the generator's levels
        extra = flow_arguments(den, steps, p.teacher().pixel_shape())
    else:
        extra = size_arguments(den.param, p.teacher().pixel_shape())  # SDXL sizes other than the pipeline's defaults
    # unet/ (transformer/) is also a denoiser directory (load_denoiser): its parametrisation and training scheduler beside it
    gen_dir = Path(p.info["generator_dir"])
    shutil.copyfile(gen_dir / PARAM_FILE, out / network / PARAM_FILE)
    if (gen_dir / "scheduler").is_dir():  # VP only: a flow model's schedule is in denoiser.json
        shutil.copytree(gen_dir / "scheduler", out / network / "scheduler", dirs_exist_ok=True)
    # what the evaluated generator gives for the first parity_samples held-out prompts and noises (k steps: the later
    # noise drawn in diffusers' order from one generator seeded like the pipeline call's)
    n = cfg.export.parity_samples
    prompts = list(itertools.islice(iter_prompts(em.pipeline_config["evaluate"]["prompts"], cfg.evaluate.prompt_column), n))  # the first n: not the whole file
    batch = [prompts[i % len(prompts)] for i in range(n)]
    den.set_prompts(p.teacher().prompt_encoder().table(batch))
    z = sample_noise(cfg.evaluate.seed, range(n), tuple(den.param.image_shape))
    rng = torch.Generator().manual_seed(cfg.evaluate.seed)
    with torch.no_grad():
        want = steps(den, z, torch.arange(n), lambda j: later_noise(name, z.shape, rng)).numpy()
    adapter = gen_dir / LORA_DIR  # trained with LoRA: the adapter for the teacher's own pipeline, checked with the export
    lora_of = write_pipeline_lora(p, pipeline_cls, network, adapter, out) if adapter.is_dir() else None
    got, got_lora = pipeline_latents(out, name, batch, cfg.evaluate.seed, timesteps if k > 1 and not flow else None, extra, lora_of)
    rel = relative_difference(got, want)
    if not rel <= 1e-5:
        raise InputError(f"the {name} export does not reproduce the generator: max relative difference {rel:.3g} > 1e-5")
    info = {"layout": name, "scheduler": dict(sched.config), "plain_diffusers_parity": {"max_rel_diff": rel, "inputs": n},
            "output_range": [float(want.min()), float(want.max())]}  # fmt: skip
    prelude = ""
    if flow:
        call, how = flow_use(extra, k, n, rel, cfg.evaluate.seed)
        info["call_arguments"] = extra
        prelude = f"torch.manual_seed({cfg.evaluate.seed})  # the later steps' noise: the scheduler draws it from torch's global generator\n" if k > 1 else ""
    elif k > 1:
        sched.set_timesteps(k)
        call = f"num_inference_steps={k}" if sched.timesteps.tolist() == timesteps else f"timesteps={timesteps}"
        how = f"""`unet/` is the generator; it runs {k} steps at t = {timesteps} (DMD2's sampler). The scheduler is diffusers'
LCMScheduler with `timestep_scaling` 1e4, so each step returns the generator's x0 and re-noises it with fresh noise
to the next timestep; the last step returns x0. Checked in a fresh process on {n} held-out prompts (latents given,
later noise from `generator=torch.Generator().manual_seed({cfg.evaluate.seed})`): max relative difference to the
evaluated generator's latents {rel:.2e}."""
    else:
        call = "num_inference_steps=1"
        how = f"""`unet/` is the one-step generator; the scheduler is DDIM cut after t* = {OneStep.of(den).level} (`trained_betas` = the
teacher's first t* + 1 betas, `timestep_spacing="trailing"`, `set_alpha_to_one=True`), so one inference step runs at
t* and plain diffusers returns x0 = (z - sigma eps) / alpha there: the generator. Checked in a fresh process on {n} held-out prompts: max
relative difference to the evaluated generator's latents {rel:.2e}."""
    info["network_evaluations"] = k
    if extra and not flow:
        info["size_conditioning"] = extra
        call += "".join(f", {key}={tuple(v)}" for key, v in extra.items())
    load = "".join(f", {part}=None" for part in null_components(str(out)) if part in ("text_encoder_3", "tokenizer_3"))  # SD3 without T5
    use = text_to_image_use(open_store(cfg.store).final_dir(out), batch[0], call, how, name, load, prelude)
    if lora_of is not None:
        info["lora"] = lora_parity(adapter, "diffusers", got_lora, want, f"the teacher's {name}")
        use += pipeline_lora_use(cfg, p, out, info["lora"], network, (call, load, prelude, batch[0]))
    return info, use


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the parity measure of the plain-diffusers checks."""
    return float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12)


def pipeline_latents(out: Path, name: str, prompts: list[str], seed: int, timesteps: list[int] | None, extra: dict,
                     lora_of: tuple[str, str | None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """The export's pipeline (``name``) in a fresh process with plain diffusers: its latents for the prompts and the
    noise of (seed, i) (``dmd_core.pipeline.stable_diffusion_latents_to_file``). ``lora_of`` = (teacher path, variant):
    also, in the same process, the teacher's own pipeline with the export's ``lora/`` and scheduler in the same call
    (``dmd_core.lora.lora_latents_to_file``); else None for those."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "prompts.json").write_text(json.dumps(prompts))
        call = "(sys.argv[1], sys.argv[2], int(sys.argv[3]), {}, json.loads(sys.argv[5]), json.loads(sys.argv[6]){})"
        code = (f"import sys, json, torch; torch.set_num_threads({torch.get_num_threads()}); "
                "from dmd_core.pipeline import stable_diffusion_latents_to_file as f; f" + call.format("sys.argv[4] + '/x.npy'", ""))
        if lora_of is not None:  # one process: each start imports torch and diffusers again (seconds)
            code += "; from dmd_core.lora import lora_latents_to_file as g; g" + call.format("sys.argv[4] + '/y.npy'", ", teacher=sys.argv[7], variant=json.loads(sys.argv[8])")
        args = [str(out), str(Path(tmp) / "prompts.json"), str(seed), tmp, json.dumps(timesteps), json.dumps(extra)]
        args += [lora_of[0], json.dumps(lora_of[1])] if lora_of is not None else []
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise InputError(f"the export in {out} does not run as a {name}: {proc.stderr.strip().splitlines()[-1:]}")
        got = np.load(Path(tmp) / "x.npy", allow_pickle=False)
        return got, np.load(Path(tmp) / "y.npy", allow_pickle=False) if lora_of is not None else None


def write_pipeline_lora(p: Plan, pipeline_cls, network: str, adapter: Path, out: Path) -> tuple[str, str | None]:
    """``lora/``: the generator's adapter (peft's format in the distill output) in diffusers' LoRA format, for
    ``load_lora_weights`` on the teacher's own pipeline; returns (teacher path, variant) for the check that loads it."""
    save_pipeline_lora(pipeline_cls, network, adapter, out / LORA_DIR)
    return str(p.teacher().path), p.teacher().variant


def lora_parity(adapter: Path, fmt: str, got: np.ndarray, want: np.ndarray, host: str) -> dict:
    """The export's ``lora/`` on ``host`` against the evaluated generator: the same 1e-5 bound as the export's check."""
    rel = relative_difference(got, want)
    if not rel <= 1e-5:
        raise InputError(f"the export's lora/ on {host} does not reproduce the generator: max relative difference {rel:.3g} > 1e-5")
    return {**adapter_info(adapter), "format": fmt, "plain_diffusers_parity": {"max_rel_diff": rel, "inputs": len(want)}}


def pipeline_lora_use(cfg: PipelineConfig, p: Plan, out: Path, info: dict, network: str, card: tuple) -> str:
    """The card's LoRA section of a pipeline export; ``card``: (call, load, prelude, prompt) of its own recipe."""
    teacher = p.teacher()
    call, load, prelude, prompt = card
    scheduler = json.loads((out / "model_index.json").read_text())["scheduler"][1]
    variant = f", variant={py_literal(teacher.variant)}" if teacher.variant else ""
    export_dir = open_store(cfg.store).final_dir(out)
    code = f"""{"import torch" + chr(10) if prelude else ""}from diffusers import {teacher.pipeline_class}, {scheduler}
pipe = {teacher.pipeline_class}.from_pretrained({py_literal(teacher.path)}{variant}{load})  # the teacher
pipe.load_lora_weights({py_literal(export_dir / LORA_DIR)})
pipe.scheduler = {scheduler}.from_pretrained({py_literal(export_dir)}, subfolder="scheduler")
{prelude}image = pipe({py_literal(prompt)}, {call}, guidance_scale=1.0).images[0]"""
    return lora_use(info, code, "the teacher's own pipeline", network)


def adapter_info(adapter: Path) -> dict:
    """Rank, alpha and the adapted modules of a peft-format adapter folder (the card's LoRA section)."""
    config, tensors = read_adapter(adapter)
    # modules counted by their A matrices: peft may save target_modules shortened to name suffixes
    return {"rank": config["r"], "alpha": config["lora_alpha"], "modules": sum(k.endswith("lora_A.weight") for k in tensors),
            "parameters": sum(t.numel() for t in tensors.values())}  # fmt: skip


def lora_use(info: dict, code: str, host: str, network: str) -> str:
    """The card's LoRA section: what lora/ is, how to load it, and how well it reproduces the generator."""
    parity = info["plain_diffusers_parity"]
    return f"""## LoRA

`lora/` is the generator as a LoRA adapter of the teacher (rank {info['rank']}, alpha {info['alpha']}, {info['modules']} modules,
{info['parameters']} parameters), in {"diffusers' LoRA format" if info["format"] == "diffusers" else "peft's format"}; `{network}/` is the same generator
with the adapter fused in. On {host}:

{md_fenced(code, "python")}
Checked in a fresh process on {parity['inputs']} fixed inputs: max relative difference to the evaluated generator {parity['max_rel_diff']:.2e}.

"""


def flow_arguments(den, steps: MultiStep, pixel_shape: tuple[int, ...]) -> dict:
    """SD3's and Flux's call arguments for the generator: the image's height and width and, unless it is one step at
    s = 1 (what num_inference_steps=1 runs), its levels s_0 > s_1 > ... as ``sigmas``."""
    levels = [float(steps.first.level)]
    if steps.later:
        levels += [float(s) for s in noise_levels(den.param, torch.tensor(steps.later))[1]]
    args = {"height": int(pixel_shape[1]), "width": int(pixel_shape[2])}
    return args if levels == [1.0] else {**args, "sigmas": levels}


def later_noise(pipeline: str, shape: tuple[int, ...], rng: torch.Generator) -> torch.Tensor:
    """The noise of a k-step generator's later step as the export's scheduler draws it from the call's generator:
    in the latents' shape, which for Flux is the packed one (the same numbers, in the packed order)."""
    if pipeline != "FluxPipeline":
        return torch.randn(shape, generator=rng)
    from dmd_core.layouts.mmdit import unpack_latents

    b, c, h, w = shape
    return unpack_latents(torch.randn(b, (h // 2) * (w // 2), 4 * c, generator=rng), h, w)


def flow_use(extra: dict, k: int, n: int, rel: float, seed: int) -> tuple[str, str]:
    """The call of a flow (SD3, Flux) export and the story of its scheduler, for the model card."""
    size = f"height={extra['height']}, width={extra['width']}"
    checked = f"Checked in a fresh process on {n} held-out prompts: max relative difference to the evaluated generator's latents {rel:.2e}."
    plain = "diffusers' FlowMatchEulerDiscreteScheduler without shift (shift 1, no dynamic shifting)"
    if "sigmas" not in extra:
        how = f"""`transformer/` is the one-step generator; the scheduler is {plain}, so one inference step
runs at s = 1 (timestep 1000) and its Euler step to 0 returns z - v(z, 1): the generator. {checked}"""
        return f"{size}, num_inference_steps=1", how
    sigmas = extra["sigmas"]
    call = f"{size}, sigmas={sigmas}"
    if k == 1:
        return call, f"""`transformer/` is the one-step generator at s* = {sigmas[0]:.6g}; the scheduler is {plain}, so the step at
`sigmas=[s*]` returns z - s* v(z, s*): the generator. {checked}"""
    how = f"""`transformer/` is the generator; it runs {k} steps at s = {sigmas} (DMD2's sampler). The scheduler is {plain}
and with `stochastic_sampling`, so each step returns x0 = x - s v and re-noises it, (1 - s') x0 + s' eps, to the next
level; the last step returns x0. The pipeline does not hand its `generator` to the scheduler's step: eps comes from
torch's global generator, seeded here with `torch.manual_seed({seed})`. {checked}"""
    return call, how


def size_arguments(param, pixel_shape: tuple[int, ...]) -> dict:
    """SDXL's call arguments for the generator's size conditioning, where they differ from the pipeline's defaults
    (original and target size the image's, crop (0, 0)); {} for SD and for the defaults."""
    ids = param.add_time_ids
    h, w = pixel_shape[1:]
    if ids is None or tuple(ids) == (h, w, 0, 0, h, w):
        return {}
    return {"original_size": list(ids[0:2]), "crops_coords_top_left": list(ids[2:4]), "target_size": list(ids[4:6])}


def text_to_image_use(
    export_dir: Path, prompt: str, call: str, how: str, pipeline: str = "StableDiffusionPipeline", load: str = "", prelude: str = ""
) -> str:
    """The model card's "Use" section of a StableDiffusionPipeline (or SDXL, SD3, Flux) export: ``call`` the step arguments
    (ours), ``how`` the scheduler's story (markdown, ours), ``load`` more from_pretrained arguments and ``prelude`` a
    line before the call (ours). The prompt and the path are literals: prompts are scraped text."""
    code = f"""{"import torch" + chr(10) if prelude else ""}from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained({py_literal(export_dir)}{load})
{prelude}image = pipe({py_literal(prompt)}, {call}, guidance_scale=1.0).images[0]"""
    return f"""## Use

{md_fenced(code, "python")}
{how}

"""


def build(cfg: PipelineConfig, p: Plan, num_processes: int = 1, progress: bool = True) -> Manifest:
    """Write the export the plan names (one process)."""
    timer = Timer()
    out = p.out_dir
    eval_dir = Path(p.inputs["evaluate"])
    em = open_store(cfg.store).read_manifest(eval_dir)
    den = load_denoiser(Path(p.info["generator_dir"]))
    if p.teacher().pipeline_class is not None:  # a diffusers pipeline: text-to-image (SD, SDXL) or DiT
        export = dit_export if p.teacher().pipeline_class == DIT_PIPELINE else text_to_image_export
        info, use = export(cfg, p, em, den, out)
        write_text_atomic(out / "one_step.json", json.dumps(one_step_spec(den), indent=2) + "\n")
        shutil.copyfile(eval_dir / "grid.png", out / "grid.png")
        info.update(evaluation=str(eval_dir), metrics=em.info["metrics"], image_shape=list(den.param.image_shape))
    else:
        info, use = one_step_pipeline_export(cfg, p, em, den, out)
    if (Path(p.info["generator_dir"]) / LORA_DIR).is_dir() and "lora" not in info:  # DiTPipeline has no LoRA loader
        info["lora"] = {"format": None, "why": f"{p.teacher().pipeline_class} has no LoRA loader: the generator is exported fused only"}
    return finish(cfg, p, em, out, info, use, timer)


def one_step_pipeline_export(cfg: PipelineConfig, p: Plan, em: Manifest, den, out: Path) -> tuple[dict, str]:
    """The project's OneStepPipeline folder (diffusers layout), ONNX, both checked against the evaluated generator."""
    eval_dir, gen_dir = Path(p.inputs["evaluate"]), Path(p.info["generator_dir"])
    shutil.rmtree(out / "generator", ignore_errors=True)
    pipeline_for(den).save_pretrained(str(out), safe_serialization=True)  # generator/ + model_index.json
    shutil.copyfile(gen_dir / PARAM_FILE, out / "generator" / PARAM_FILE)
    if (gen_dir / "scheduler").is_dir():
        shutil.copytree(gen_dir / "scheduler", out / "generator" / "scheduler", dirs_exist_ok=True)
    write_text_atomic(out / "one_step.json", json.dumps(one_step_spec(den), indent=2) + "\n")
    shutil.copyfile(eval_dir / "grid.png", out / "grid.png")
    want = reference_output(cfg, den)  # computed once: the card's output range, the ONNX and fresh-process checks
    info: dict = {"evaluation": str(eval_dir), "metrics": em.info["metrics"], "image_shape": list(den.param.image_shape),
                  "output_range": [float(want.min()), float(want.max())], "data_range": list(den.param.data_range),
                  "network_class": network_class(out)}  # fmt: skip
    if cfg.export.onnx:
        info["onnx"] = write_onnx(cfg, den, out, want)
        fault_point("export.onnx-written")
    adapter = gen_dir / LORA_DIR  # trained with LoRA: the adapter for the teacher's own network, checked with the export
    lora_of = None
    if adapter.is_dir():
        shutil.copytree(adapter, out / LORA_DIR, dirs_exist_ok=True)  # peft's format, as distill wrote it
        lora_of = (str(network_folder(p.teacher().layout, p.teacher().path)), p.teacher().variant)
    info["torch_parity"], got_lora = fresh_process_parity(cfg, out, want, lora_of)
    use = class_model_use(cfg, out, info)
    if lora_of is not None:
        info["lora"] = lora_parity(adapter, "peft", got_lora, want, "the teacher's network")
        use += network_lora_use(cfg, p, out, info["lora"], Path(lora_of[0]))
    return info, use


def network_lora_use(cfg: PipelineConfig, p: Plan, out: Path, info: dict, net_dir: Path) -> str:
    """The card's LoRA section of a OneStepPipeline export: peft's ``PeftModel`` on the teacher's network (diffusers
    0.42 has no LoRA loader for a bare UNet2DModel), as the export's generator."""
    teacher = p.teacher()
    cls = network_class(out)
    export_dir = open_store(cfg.store).final_dir(out)
    variant = f", variant={py_literal(teacher.variant)}" if teacher.variant else ""
    code = f"""from diffusers import {cls}
from peft import PeftModel
from dmd_core.pipeline import OneStepPipeline
teacher = {cls}.from_pretrained({py_literal(net_dir)}{variant})
unet = PeftModel.from_pretrained(teacher, {py_literal(export_dir / LORA_DIR)}).merge_and_unload()  # or .get_base_model(): unfused
pipe = OneStepPipeline.from_pretrained({py_literal(export_dir)}, generator=unet)
images = pipe(class_labels=[0, 1, 2, 3], seed=0)"""
    return lora_use(info, code, "the teacher's network", "generator")


def finish(cfg: PipelineConfig, p: Plan, em: Manifest, out: Path, info: dict, use: str, timer: Timer) -> Manifest:
    """The model card with every file's sha256, then the manifest (last)."""
    files = [
        file_entry(f, name=str(f.relative_to(out)))
        for f in sorted(out.rglob("*"))
        if f.is_file() and f.name not in ("manifest.json", "README.md") and not f.name.startswith(".")
    ]
    write_text_atomic(out / "README.md", model_card(cfg, em, out, info, files, use))
    files.append(file_entry(out / "README.md"))
    m = stage_manifest(cfg, p, files, info, timer.seconds)
    fault_point("export.before-manifest")
    open_store(cfg.store).save_manifest(m, out)
    return m


def run_distributed(cfg: PipelineConfig, p: Plan, progress: bool = True) -> Manifest | None:
    raise InputError("export runs in one process; run `dmd export` without accelerate launch")

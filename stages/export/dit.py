"""The export of a generator distilled from a DiTPipeline teacher: a plain ``DiTPipeline`` folder.

``transformer/`` is the generator (also a denoiser directory: its ``denoiser.json`` and training scheduler beside it),
``vae/`` the teacher's, ``scheduler/`` the one-step DDIM scheduler cut at t* (``dmd_core.pipeline.one_step_scheduler``;
k-step generators: LCM, ``multi_step_scheduler``). ``DiTPipeline`` has no latents argument: its initial noise comes
from ``generator`` (``randn_tensor``), a k-step export's later noise from the global RNG (the pipeline does not pass
``generator`` to the scheduler's step). The parity check runs the pipeline in a fresh process from
``generator=torch.Generator().manual_seed(seed)`` after ``torch.manual_seed(seed)`` and compares the latents it
decodes with the evaluated generator's on the same noise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dmd_core.dmd import MultiStep, OneStep
from dmd_core.errors import InputError
from dmd_core.loading import PARAM_FILE
from dmd_core.render import md_fenced, py_literal
from dmd_core.shards import sample_labels

from ..config import PipelineConfig
from ..contract import Manifest, Plan
from ..store import open_store

PIPELINE = "DiTPipeline"


def dit_export(cfg: PipelineConfig, p: Plan, em: Manifest, den, out: Path) -> tuple[dict, str]:
    """Write the DiTPipeline export of ``den`` (the evaluated generator) to ``out`` and check it in a fresh process."""
    from diffusers import DiTPipeline

    from dmd_core.pipeline import multi_step_scheduler, one_step_scheduler

    teacher = p.teacher()
    folder = Path(p.inputs["teacher"])
    if den.param.kind != "vp":
        raise InputError(
            f"{folder} is a {den.param.kind} DiT teacher: its DiTPipeline export is written for VP (DDPM/DDIM) teachers only. "
            "Fix: export a generator of a VP DiT teacher, or use the generator directory in the distill output."
        )
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    steps = MultiStep.of(den)
    k, timesteps = steps.num_steps, list(den.param.generator_timesteps or [])
    sched = multi_step_scheduler(sched_cfg) if k > 1 else one_step_scheduler(sched_cfg, OneStep.of(den).level)
    sched.set_timesteps(k)
    if sched.timesteps.tolist() != (timesteps or [OneStep.of(den).level]):
        raise InputError(
            f"distill.generator_timesteps {timesteps} are not what DiTPipeline's scheduler runs for num_inference_steps={k} "
            f"({sched.timesteps.tolist()}), and DiTPipeline takes no timesteps. Fix: train the {k}-step generator on DMD2's "
            f"uniform schedule (generator_timesteps: {sched.timesteps.tolist()})."
        )
    index = json.loads((folder / "model_index.json").read_text())
    vae = teacher.layout.load_vae(folder)
    DiTPipeline(transformer=den.unet, vae=vae, scheduler=sched, id2label=index.get("id2label")).save_pretrained(str(out), safe_serialization=True)
    gen_dir = Path(p.info["generator_dir"])
    shutil.copyfile(gen_dir / PARAM_FILE, out / "transformer" / PARAM_FILE)
    if (gen_dir / "scheduler").is_dir():
        shutil.copytree(gen_dir / "scheduler", out / "transformer" / "scheduler", dirs_exist_ok=True)
    n, seed = cfg.export.parity_samples, cfg.evaluate.seed
    want = reference_latents(den, n, seed)
    got = latents_in_fresh_process(out, n, seed, k)
    rel = float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12)
    if not rel <= 1e-5:
        raise InputError(f"the {PIPELINE} export does not reproduce the generator: max relative difference {rel:.3g} > 1e-5")
    info = {"layout": PIPELINE, "scheduler": dict(sched.config), "plain_diffusers_parity": {"max_rel_diff": rel, "inputs": n},
            "output_range": [float(want.min()), float(want.max())], "network_evaluations": k}  # fmt: skip
    return info, dit_use(open_store(cfg.store).final_dir(out), den, k, rel, n, seed)


def parity_inputs(den, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise DiTPipeline draws from ``torch.Generator().manual_seed(seed)`` for ``n`` images, and labels i mod C."""
    c, h, w = den.param.image_shape
    return torch.randn((n, c, h, w), generator=torch.Generator().manual_seed(seed)), sample_labels(range(n), den.num_classes)


def reference_latents(den, n: int, seed: int) -> np.ndarray:
    """The generator's latents on the parity inputs; a k-step one's later noise drawn as the pipeline's scheduler draws
    it from the global RNG seeded with ``seed`` (here from a generator of that seed: the same numbers)."""
    z, labels = parity_inputs(den, n, seed)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return MultiStep.of(den)(den, z, labels, lambda j: torch.randn(z.shape, generator=rng)).numpy()


def latents_in_fresh_process(out: Path, n: int, seed: int, k: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); from stages.export.dit import dit_latents_to_file as f; "
                "f(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])")  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", code, str(out), str(n), str(seed), str(k), str(Path(tmp) / "x.npy")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise InputError(f"the export in {out} does not run as a {PIPELINE}: {proc.stderr.strip().splitlines()[-1:]}")
        return np.load(Path(tmp) / "x.npy", allow_pickle=False)


def dit_latents_to_file(export_dir: str, n: int, seed: int, k: int, out_file: str) -> None:
    """Plain diffusers: ``DiTPipeline.from_pretrained(export)(labels, guidance_scale=1, num_inference_steps=k,
    generator=torch.Generator().manual_seed(seed))`` after ``torch.manual_seed(seed)``, labels i mod C; the latents
    it decodes (recorded at ``vae.decode``, times the VAE's scaling factor) written to ``out_file`` (.npy).

    Run in a fresh process by the export's parity check.
    """
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(export_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = sample_labels(range(n), pipe.transformer.config.num_embeds_ada_norm).tolist()
    seen, decode = [], pipe.vae.decode
    pipe.vae.decode = lambda latents, *a, **kw: (seen.append(latents), decode(latents, *a, **kw))[1]
    torch.manual_seed(seed)
    with torch.no_grad():
        pipe(labels, guidance_scale=1.0, num_inference_steps=k, generator=torch.Generator().manual_seed(seed), output_type="np")
    np.save(out_file, (seen[0] * pipe.vae.config.scaling_factor).cpu().numpy(), allow_pickle=False)


def dit_use(export_dir: Path, den, k: int, rel: float, n: int, seed: int) -> str:
    """The model card's "Use" section of a DiTPipeline export."""
    labels = list(range(min(4, den.num_classes)))
    code = f"""import torch
from diffusers import DiTPipeline
pipe = DiTPipeline.from_pretrained({py_literal(export_dir)})
images = pipe(class_labels={labels}, guidance_scale=1.0, num_inference_steps={k}, generator=torch.Generator().manual_seed(0)).images"""
    if k > 1:
        how = f"""`transformer/` is the generator; it runs {k} steps at t = {list(den.param.generator_timesteps)} (DMD2's sampler) through
diffusers' LCMScheduler (each step returns the generator's x0 and re-noises it). DiTPipeline draws that later noise from
the global RNG: `torch.manual_seed(s)` before the call makes it reproducible."""
    else:
        how = f"""`transformer/` is the one-step generator; the scheduler is DDIM cut after t* = {OneStep.of(den).level}, so one inference
step returns x0 = (z - sigma eps) / alpha there: the generator."""
    return f"""## Use

{md_fenced(code, "python")}
Pass `guidance_scale=1.0`: the generator is used unguided, and DiTPipeline's default (4.0) would run a second, guided
branch with its null label 1000. {how} Checked in a fresh process on {n} labels and the noise of
`generator=torch.Generator().manual_seed({seed})`: max relative difference to the evaluated generator's latents {rel:.2e}.

"""

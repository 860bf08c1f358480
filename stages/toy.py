"""The embedded default's assets: ``dmd toy classifier|teacher|report`` (CPU, fixed seeds, minutes)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dmd_core.digits import (
    NUM_CLASSES,
    ClassifierTraining,
    DigitsClassifier,
    TeacherTraining,
    load_digits_data,
    train_digits_classifier,
    train_toy_teacher,
)
from dmd_core.digits_flow import FlowTraining, train_toy_flow_teacher
from dmd_core.digits_t2i import T2ITraining, choose_guidance, digit_prompts, save_t2i_pipeline, t2i_report, train_toy_t2i_teacher
from dmd_core.loading import load_denoiser, save_denoiser
from dmd_core.metrics import class_accuracy, frechet_distance
from dmd_core.shards import sample_labels, sample_noise
from dmd_core.solvers import default_solver, teacher_sampler

log = logging.getLogger("dmd")


def make_classifier(out: Path, epochs: int = 40, seed: int = 0) -> str:
    cfg = ClassifierTraining(epochs=epochs, seed=seed)
    t0 = time.perf_counter()
    model, acc = train_digits_classifier(cfg)
    model.save(out)
    info = {"held_out_accuracy": acc, "training": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("classifier held-out accuracy: %.4f", acc)
    return str(out)


def make_teacher(out: Path, steps: int = 4000, seed: int = 0, classifier_dir: Path | None = None, kind: str = "edm") -> str:
    """EDM: a denoiser directory. VP: a plain diffusers ``DDPMPipeline`` folder, as a diffusers user would have it.
    T2I: a plain ``StableDiffusionPipeline`` folder (``make_t2i_teacher``). Flow: a DiT denoiser directory (``make_flow_teacher``)."""
    if kind == "t2i":
        return make_t2i_teacher(out, steps, seed, classifier_dir)
    if kind == "flow":
        return make_flow_teacher(out, steps, seed, classifier_dir)
    cfg = TeacherTraining(steps=steps, seed=seed)
    t0 = time.perf_counter()
    den, losses = train_toy_teacher(cfg, kind=kind)
    if kind == "edm":
        save_denoiser(den, out)
    else:
        from diffusers import DDPMPipeline, DDPMScheduler

        DDPMPipeline(unet=den.unet, scheduler=DDPMScheduler.from_config(den.scheduler_config)).save_pretrained(str(out))
    info = {"kind": kind, "training": asdict(cfg), "final_loss_mean_last_200": sum(losses[-200:]) / 200, "seconds": round(time.perf_counter() - t0, 1)}
    # Kept beside (not inside) the teacher directory so the teacher's digest covers only the model.
    out.parent.joinpath(f"{out.name}-training.json").write_text(json.dumps(info, indent=2) + "\n")
    if classifier_dir is not None and (classifier_dir / "model.safetensors").is_file():
        report(out, classifier_dir, steps=18 if kind == "edm" else 50)
    return str(out)


FLOW_REPORT_STEPS = 18  # Heun-18 = 35 network evaluations (data/digits-flow.yaml's generate.steps)


def make_flow_teacher(out: Path, steps: int = FlowTraining.steps, seed: int = 0, classifier_dir: Path | None = None) -> str:
    """The rectified-flow digits teacher on a DiT: a denoiser directory (DiT config and weights, denoiser.json of kind flow);
    ``<out>-training.json`` beside it and, with a classifier, ``<out>-quality.json`` (Heun-``FLOW_REPORT_STEPS``)."""
    cfg = FlowTraining(steps=steps, seed=seed)
    t0 = time.perf_counter()
    den, losses = train_toy_flow_teacher(cfg)
    save_denoiser(den, out)
    info = {"kind": "flow", "training": asdict(cfg), "parameters": sum(p.numel() for p in den.unet.parameters()),
            "final_loss_mean_last_200": sum(losses[-200:]) / len(losses[-200:]), "seconds": round(time.perf_counter() - t0, 1),
            "torch_threads": torch.get_num_threads()}  # fmt: skip
    out.parent.joinpath(f"{out.name}-training.json").write_text(json.dumps(info, indent=2) + "\n")
    if classifier_dir is not None and (classifier_dir / "model.safetensors").is_file():
        out.parent.joinpath(f"{out.name}-quality.json").write_text(json.dumps(json.loads(report(out, classifier_dir, steps=FLOW_REPORT_STEPS)), indent=2) + "\n")
    return str(out)


T2I_GUIDANCE_SCALES = (1.0, 1.25, 1.5, 2.0, 3.0)  # FD-digits is lowest just above 1; accuracy saturates by 2


def make_t2i_teacher(out: Path, steps: int = T2ITraining.steps, seed: int = 0, classifier_dir: Path | None = None) -> str:
    """The text-to-image digits teacher; ``<out>-training.json`` beside it and, with a classifier, ``<out>-quality.json``."""
    pipe, info = train_toy_t2i_teacher(T2ITraining(steps=steps, seed=seed))
    save_t2i_pipeline(pipe, out)
    write_t2i_prompt_files(out.parent)
    info = {"kind": "t2i", **info}
    out.parent.joinpath(f"{out.name}-training.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("t2i teacher: VAE held-out PSNR %.2f dB, %.0f s", info["vae"]["held_out_reconstruction"]["psnr_db"], info["seconds"]["total"])
    if classifier_dir is not None and (classifier_dir / "model.safetensors").is_file():
        out.parent.joinpath(f"{out.name}-quality.json").write_text(t2i_quality(out, classifier_dir) + "\n")
    return str(out)


T2I_PROMPT_FILES = {"train": "digits-t2i-train-prompts.parquet", "eval": "digits-t2i-eval-prompts.parquet"}


def write_t2i_prompt_files(data_dir: Path) -> list[Path]:
    """The training and held-out prompt files of data/digits-t2i.yaml: columns ``prompt`` and ``digit``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for split, name in T2I_PROMPT_FILES.items():
        prompts, digits = zip(*digit_prompts(split))
        pq.write_table(pa.table({"prompt": list(prompts), "digit": pa.array(digits, pa.int64())}), data_dir / name)
        paths.append(data_dir / name)
    return paths


def t2i_quality(teacher_dir: Path, classifier_dir: Path, scales=T2I_GUIDANCE_SCALES, num_samples: int = 1000, steps: int = 50) -> str:
    """PLMS-``steps`` on the held-out prompts at each guidance scale; the chosen one's report, with the sweep."""
    reports = [t2i_report(teacher_dir, classifier_dir, g, num_samples, steps) for g in scales]
    chosen = choose_guidance(reports)
    result = {
        **next(r for r in reports if r["guidance_scale"] == chosen),
        "chosen_guidance_because": "the best FD-digits among the scales with prompt accuracy >= 0.9",
        "sweep": [{k: r[k] for k in ("guidance_scale", "fd_digits", "prompt_accuracy")} for r in reports],
    }
    log.info("t2i teacher quality: %s", json.dumps(result["sweep"]))
    return json.dumps(result, indent=2)


def is_t2i_folder(path: Path) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "StableDiffusionPipeline"


@torch.no_grad()
def sample_teacher(den, sampler, num_samples: int, seed: int = 1234, batch_size: int = 500):
    """Class-balanced samples of a digits teacher with ``sampler``: (images, labels)."""
    idx = range(num_samples)
    z = sample_noise(seed, idx, (1, 8, 8))
    labels = sample_labels(idx, den.num_classes)
    out = [sampler(z[s : s + batch_size], labels[s : s + batch_size]) for s in range(0, num_samples, batch_size)]
    return torch.cat(out).clamp(-1, 1), labels


def report(teacher_dir: Path, classifier_dir: Path, steps: int = 18, num_samples: int = 2000, guidance_scale: float = 1.0) -> str:
    """FD-digits (vs all 1,797 real digits) and class accuracy of the teacher at Heun-``steps`` (EDM, flow; VP: PLMS-``steps``).
    A StableDiffusionPipeline folder: ``t2i_report`` (held-out prompts, prompt accuracy)."""
    if is_t2i_folder(teacher_dir):
        result_t2i = t2i_report(teacher_dir, classifier_dir, guidance_scale, num_samples, steps)
        log.info("teacher quality: %s", json.dumps(result_t2i))
        return json.dumps(result_t2i)
    clf = DigitsClassifier.load(classifier_dir)
    real, real_labels = load_digits_data()
    den = load_denoiser(teacher_dir)
    solver = default_solver(den.param.kind)  # Heun on EDM's and on the flow ODE, PLMS for VP
    sampler, nfe = teacher_sampler(den, solver, steps, guidance_scale)
    fake, labels = sample_teacher(den, sampler, num_samples)
    result = {
        "teacher": str(teacher_dir),
        "solver": f"{'heun' if solver == 'heun' else 'plms'}-{steps}",
        "nfe": nfe,
        "guidance_scale": guidance_scale,
        "num_samples": num_samples,
        "fd_digits": frechet_distance(clf, real, fake),
        "class_accuracy": class_accuracy(clf, fake, labels),
        "real_digits_class_accuracy": class_accuracy(clf, real, real_labels),
        "num_classes": NUM_CLASSES,
    }
    log.info("teacher quality: %s", json.dumps(result))
    return json.dumps(result)

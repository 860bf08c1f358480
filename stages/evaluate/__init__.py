"""Stage ``evaluate``: Fréchet distance, class accuracy and speed of the one-step generator vs its teacher.

Output ``<store>/evaluate/<key>/``: ``metrics.json`` (headline numbers), ``metrics.parquet`` (one row),
``grid.png`` (teacher | student from the same noise and labels), ``student_stats.npz``,
``config.yaml`` and ``manifest.json``. Cached beside it, computed once: the reference statistics
(``<store>/reference/<key>/stats.npz``, per dataset and feature network) and the teacher's numbers
(``<store>/teacher_eval/<key>/``, per teacher, solver, steps, guidance and sampling protocol).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dmd_core.denoisers import Denoiser
from dmd_core.digits import IMAGE_SHAPE as DIGITS_SHAPE, DigitsClassifier
from dmd_core.dmd import MultiStep, step_noise
from dmd_core.errors import InputError
from dmd_core.faults import fault_point
from dmd_core.precision import at_precision
from dmd_core.images import caption_columns, grid_image
from dmd_core.loading import load_denoiser
from dmd_core.metrics import (
    InceptionFeatures,
    clear_reference,
    load_stats,
    make_clip_score,
    make_fid,
    save_stats,
    set_reference,
    side_stats,
    to_uint8_rgb,
)
from dmd_core.shards import sample_labels, sample_noise
from dmd_core.solvers import check_solver, teacher_sampler
from dmd_core.text import read_label_column

from ..checks import check_precision, check_prompt_file, check_prompts
from ..config import EvaluateConfig, PipelineConfig
from ..contract import EVALUATE_FILES, Manifest, Plan, StageOutput, Teacher, content_key, file_entry, spec, stage_manifest
from ..files import Timer, tmp_sibling, write_text_atomic
from ..launch import launch_plan
from ..prompt_rows import Spread, plan_rows
from ..progress import Bar, progress_bar
from ..quality import QUALITY_VERSION, features_digest, make_features, reference_digest, reference_stats
from ..store import open_store

STAGE = "evaluate"
SPEC = spec(STAGE)
log = logging.getLogger("dmd")


def teacher_steps(cfg: PipelineConfig) -> int:
    return cfg.evaluate.teacher_steps or cfg.generate.steps


def generator_name(e: EvaluateConfig, dm: Manifest) -> str:
    """Which of the distill output's generators to evaluate: evaluate.generator, else the EMA one when use_ema and present."""
    present = {f.name.split("/")[0] for f in dm.files}
    if e.generator is None:
        return "generator_ema" if e.use_ema and "generator_ema" in present else "generator"
    name = {"final": "generator", "ema": "generator_ema", "best": "generator_best"}[e.generator]
    if name not in present:
        fix = {"generator_ema": "set distill.ema_decay > 0", "generator_best": "set distill.eval_every"}.get(name, "")
        raise InputError(f"evaluate.generator={e.generator}: the distill output has no {name}/. Fix: {fix}, or choose another evaluate.generator.")
    return name


def check(cfg: PipelineConfig, teacher: Teacher) -> None:
    """Everything about the evaluate settings that can fail, checked before any stage computes."""
    e = cfg.evaluate
    check_solver(cfg.generate.solver, teacher.param.kind)
    check_precision(STAGE, e.precision)
    check_prompts(teacher, e.prompts, STAGE)
    if e.prompts:  # a bad file, or labels that are not the classifier's classes, fail here
        classes = DigitsClassifier.load(e.classifier).config["num_classes"] if e.prompt_labels and e.classifier else None
        check_prompt_file(open_store(cfg.store), e.prompts, e.prompt_column, STAGE, e.prompt_labels, classes)
    if e.clip_model and not Path(e.clip_model, "config.json").is_file():
        raise InputError(f"evaluate.clip_model: {e.clip_model} is not a local CLIP model directory (no config.json). Fix: point it at a "
                         "CLIPModel + CLIPProcessor save_pretrained folder (e.g. a snapshot of openai/clip-vit-large-patch14).")  # fmt: skip
    store = open_store(cfg.store)
    features_digest(e, store), reference_digest(e, store)  # the feature network's weights and the reference exist
    pixels = teacher.pixel_shape()
    if e.features == "digits" and tuple(pixels) != DIGITS_SHAPE:
        raise InputError(
            f"evaluate.features=digits measures 1x8x8 digit images; this teacher makes {'x'.join(map(str, pixels))} images. "
            "Fix: --set evaluate.features=inception (with evaluate.inception_weights) and evaluate.reference=<stats .npz of your data>."
        )
    if pixels[0] not in (1, 3):
        raise InputError(f"evaluate: the teacher makes {pixels[0]}-channel images; the feature networks take 1 or 3 channels. Fix: evaluate such a model elsewhere.")
    dim = InceptionFeatures.num_features if e.features == "inception" else DigitsClassifier.load(e.classifier).num_features
    if e.reference != "digits":
        mu, _, _ = load_stats(e.reference)
        if mu.shape[0] != dim:
            raise InputError(f"evaluate.reference {e.reference} holds {mu.shape[0]}-dimensional statistics; evaluate.features={e.features} "
                             f"gives {dim}. Fix: use statistics of the same feature network.")  # fmt: skip
    if e.num_samples <= dim:
        raise InputError(
            f"evaluate.num_samples ({e.num_samples}) must exceed the feature dimension ({dim}): with fewer samples the covariance is singular. "
            "Fix: raise evaluate.num_samples."
        )


def missing_metrics(cfg: PipelineConfig, teacher: Teacher) -> dict[str, str]:
    """The metrics this config and teacher do not get a number for, each with the setting that would give it
    (the same conditions as ``Evaluator.measure``)."""
    e = cfg.evaluate
    missing: dict[str, str] = {}
    labelled = bool(e.prompt_labels) if e.prompts else teacher.param.num_classes > 0
    if not (e.classifier and labelled):
        fix = "set evaluate.classifier" if e.classifier is None else "set evaluate.prompt_labels (each prompt's class)" if e.prompts else "a class-conditional teacher"
        missing.update(dict.fromkeys(("teacher_class_accuracy", "student_class_accuracy"), fix))
    if not e.clip_model:
        missing.update(dict.fromkeys(("teacher_clip_score", "student_clip_score"), "set evaluate.clip_model (and evaluate.prompts)"))
    return missing


def plan(cfg: PipelineConfig, teacher: Teacher, distilled: StageOutput) -> Plan:
    """Key = (evaluate config, teacher protocol, digests of the generator, teacher, features, reference); ``check`` ran first."""
    e = cfg.evaluate
    store = open_store(cfg.store)
    optional = {}  # inputs in the key only when used: a key without them is the key of the same run without the option
    if e.prompts:
        optional = {"prompts": f"{store.digest(e.prompts)}:{e.prompt_column}:{e.prompt_labels}"}
    if e.clip_model:
        optional["clip_model"] = store.digest(e.clip_model)
    features = features_digest(e, store)
    reference = reference_digest(e, store)
    dm = distilled.manifest
    gen_dir = distilled.out_dir / generator_name(e, dm)
    protocol = {"num_samples": e.num_samples, "seed": e.seed, "batch_size": e.batch_size}
    ref_key = content_key("reference", {}, {"features": features, "reference": reference}, QUALITY_VERSION)
    teacher_cfg = {**protocol, "solver": cfg.generate.solver, "steps": teacher_steps(cfg), "guidance_scale": cfg.generate.guidance_scale}
    if e.precision != "fp32":
        teacher_cfg["precision"] = optional["precision"] = e.precision
    teacher_key = content_key("teacher_eval", teacher_cfg, {"teacher": teacher.digest, "features": features, "reference": reference, **optional}, SPEC.code_version)
    up = {"distill": dm.digest, "teacher": teacher.digest, "features": features, "reference": reference, **optional}
    if e.generator is not None:  # in the key only when chosen (the default is the use_ema rule)
        up["generator"] = gen_dir.name
    key = SPEC.key(cfg, up, {"teacher": teacher_cfg})
    info = {"generator_dir": str(gen_dir.resolve()), "teacher_key": teacher_key, "reference_key": ref_key, "distill_steps": dm.info.get("steps")}
    inputs = {"teacher": str(teacher.path), "distill": str(distilled.out_dir), **({"prompts": e.prompts} if e.prompts else {})}
    return Plan(STAGE, key, store.output_dir(STAGE, key), up, inputs, info)


# ---------------------------------------------------------------- measuring


class Evaluator:
    """Feature network, classifier, reference statistics and the two samplers for one process."""

    def __init__(self, cfg: PipelineConfig, p: Plan, rank: int, world: int, device: torch.device, progress: bool = True):
        self.cfg, self.p, self.e = cfg, p, cfg.evaluate
        self.progress = progress
        self.rank, self.world, self.device = rank, world, device
        self.classifier = DigitsClassifier.load(self.e.classifier).to(device) if self.e.classifier else None
        self.features = make_features(self.e, self.classifier)  # evaluate.check made sure num_samples exceeds its dimension
        gen_dir = p.info["generator_dir"]
        try:
            self.student: Denoiser = load_denoiser(gen_dir, device)
        except InputError as err:
            raise InputError(f"the generator in {gen_dir} does not load: {err}") from None
        teacher = p.teacher()
        # text-to-image: labels are indices of the held-out prompts; the accuracy is against each prompt's class
        rows = plan_rows(cfg, p, self.e.prompt_column, device, progress and rank == 0)  # the held-out prompts, from the store
        self.prompts = None if rows is None else rows.texts  # read by index
        self.prompt_classes = None
        if rows is not None and self.e.prompt_labels:  # check() refused a file whose labels are null or outside the classes
            self.prompt_classes = torch.from_numpy(read_label_column(p.inputs["prompts"], self.e.prompt_labels)).to(device)
        self.teacher: Denoiser = teacher.load(device, rows)
        if rows is not None:
            self.student.set_prompts(rows)
            self.prompt_encoder = teacher.prompt_encoder(device)
        self.clip_model = self.e.clip_model if self.prompts is not None else None
        self.to_pixels = teacher.pixel_decoder(device)
        g = cfg.generate
        self.guidance_scale = g.guidance_scale
        teacher_sample, self.teacher_nfe = teacher_sampler(self.teacher, g.solver, teacher_steps(cfg), g.guidance_scale)
        self.teacher_sample = at_precision(lambda z, labels, idx=None: self.to_pixels(teacher_sample(z, labels)), self.e.precision, device)
        self.student_sample = at_precision(self.student_sample, self.e.precision, device)  # (the feature network stays fp32)
        self.steps = MultiStep.of(self.student)  # one step, or a k-step (DMD2) generator
        self.shape = tuple(self.student.param.image_shape)
        self.num_classes = self.student.num_classes

    # samplers: (z, labels) -> images (pixels: latent models are decoded)
    def student_sample(self, z: torch.Tensor, labels: torch.Tensor | None, idx: range | None = None, noise=None) -> torch.Tensor:
        """Decoded generator samples; a k-step generator's later noise is seeded by (evaluate.seed, step, sample index)."""
        if noise is None:
            seeded = step_noise(self.e.seed, range(len(z)) if idx is None else idx, tuple(z.shape[1:]))
            noise = lambda j: seeded(j).to(z.device)  # noqa: E731
        return self.to_pixels(self.steps(self.student, z, labels, noise))

    def classes(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """What the classifier should see: the class itself, or the class a prompt names (None: no accuracy)."""
        if self.prompts is None:
            return labels
        return None if self.prompt_classes is None else self.prompt_classes[labels]

    def encode_prompts(self, labels: torch.Tensor, guided: bool) -> None:
        """Text-to-image speed includes what a user's call does first: encode the batch's prompts (and the empty one for CFG)."""
        batch = [self.prompts[int(i)] for i in labels]
        self.prompt_encoder(batch + [""] * len(batch) if guided else batch)

    def reference(self) -> tuple[np.ndarray, np.ndarray, int]:
        return reference_stats(self.cfg, self.p.info["reference_key"], self.features, self.device, self.rank)

    def batch_starts(self) -> list[int]:
        """First sample index of each batch this process measures: batches b = rank (mod world)."""
        return list(range(0, self.e.num_samples, self.e.batch_size))[self.rank :: self.world]

    @torch.no_grad()
    def measure(self, sampler: Callable, bar: Bar, phase: str) -> dict:
        """FD and class accuracy of ``num_samples`` class-balanced samples (this process's batches)."""
        e = self.e
        fid = make_fid(self.features).to(self.device)
        mu, sigma, n = self.reference()
        set_reference(fid, mu, sigma, n) if self.rank == 0 else clear_reference(fid)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        clip = make_clip_score(self.clip_model).to(self.device) if self.clip_model else None
        bar.set_description(phase)
        for s in self.batch_starts():
            idx = range(s, min(s + e.batch_size, e.num_samples))
            z = sample_noise(e.seed, idx, self.shape).to(self.device)
            labels_cpu = sample_labels(idx, self.num_classes)
            labels = None if labels_cpu is None else labels_cpu.to(self.device)
            x = sampler(z, labels, idx).float().clamp(-1, 1)
            fid.update(x.to(torch.float64), real=False)
            classes = self.classes(labels)
            if self.classifier is not None and classes is not None:
                correct += (self.classifier(x).argmax(1) == classes).sum()
            if clip is not None:
                clip.update(to_uint8_rgb(x), [self.prompts[i] for i in labels_cpu.tolist()])  # host labels: no device read per sample
            bar.update(1)
        fd = float(fid.compute())  # torchmetrics all-reduces the float64 sums across processes
        if self.world > 1:
            torch.distributed.all_reduce(correct)
        acc = float(correct) / e.num_samples if self.classifier is not None and self.num_classes and (self.prompts is None or self.prompt_classes is not None) else None
        fake = side_stats(fid.fake_features_sum, fid.fake_features_cov_sum, fid.fake_features_num_samples)
        out = {"fd": fd, "class_accuracy": acc, "stats": fake}
        if clip is not None:
            out["clip_score"] = float(clip.compute())  # torchmetrics sums score and count across processes
        return out

    @torch.no_grad()
    def speed(self) -> dict:
        """Images/s of both samplers at the same batch size, in this process (after one warm-up each)."""
        B = self.e.speed_batch_size
        z = sample_noise(self.e.seed + 1, range(B), self.shape).to(self.device)
        labels = sample_labels(range(B), self.num_classes)
        labels = None if labels is None else labels.to(self.device)
        out = {}
        # a k-step generator's later noise drawn beforehand: the timing is of the network calls, as for the teacher's
        later = [torch.randn_like(z) for _ in self.steps.later]
        student = lambda z, labels: self.student_sample(z, labels, noise=lambda j: later[j])  # noqa: E731
        for name, sampler in (("student", student), ("teacher", self.teacher_sample)):
            guided = name == "teacher" and self.guidance_scale != 1.0
            sampler(z, labels)
            self._sync()
            t0 = time.perf_counter()
            for _ in range(self.e.speed_repeats):
                if self.prompts is not None:
                    self.encode_prompts(labels, guided)
                sampler(z, labels)
            self._sync()
            out[f"{name}_images_per_s"] = B * self.e.speed_repeats / (time.perf_counter() - t0)
        out["speedup"] = out["student_images_per_s"] / out["teacher_images_per_s"]
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def grid(self, path: Path) -> None:
        """Teacher (left) beside student (right), same noise and labels; one column per class (prompts: 10
        spread evenly over the held-out list, each written above its column)."""
        C = min(self.num_classes, 10) if self.prompts is not None else self.num_classes
        n = 8 * (C or 8)
        z = sample_noise(self.e.seed + 2, range(n), self.shape).to(self.device)
        labels = sample_labels(range(n), C)
        if self.prompts is not None:
            columns = [c * len(self.prompts) // C for c in range(C)]
            labels = torch.tensor(columns)[labels]
        labels = None if labels is None else labels.to(self.device)
        left = grid_image(self.teacher_sample(z, labels), nrow=C or 8)
        right = grid_image(self.student_sample(z, labels), nrow=C or 8)
        if self.prompts is not None:
            left, right = (caption_columns(im, [self.prompts[c] for c in columns]) for im in (left, right))
        gap = 16
        canvas = Image.new(left.mode, (left.width + gap + right.width, max(left.height, right.height)), 255)
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width + gap, 0))
        tmp = path.with_name(f".{path.name}.tmp")
        canvas.save(tmp, format="PNG")
        tmp.replace(path)


def teacher_numbers_dir(ev: Evaluator) -> Path:
    return open_store(ev.cfg.store).side_dir("teacher_eval", ev.p.info["teacher_key"])


def teacher_numbers(ev: Evaluator, bar: Bar, cached: bool) -> dict:
    """The teacher's FD and accuracy on this protocol: computed once, cached (verified) in <store>/teacher_eval/<key>/."""
    out = teacher_numbers_dir(ev)
    if cached:
        log.info("evaluate: teacher numbers from cache %s", out)
        return json.loads((out / "metrics.json").read_text())
    r = ev.measure(ev.teacher_sample, bar, f"teacher ({ev.teacher_nfe} NFE)")
    result = {"teacher_fd": r["fd"], "teacher_class_accuracy": r["class_accuracy"], "teacher_nfe": ev.teacher_nfe}
    if "clip_score" in r:
        result["teacher_clip_score"] = r["clip_score"]
    if ev.rank == 0:

        def write(work: Path) -> list[str]:
            save_stats(work / "teacher_stats.npz", *r["stats"])
            write_text_atomic(work / "metrics.json", json.dumps(result, indent=2) + "\n")
            return ["metrics.json", "teacher_stats.npz"]

        up = {k: ev.p.upstream[k] for k in ("teacher", "features", "reference", "prompts", "clip_model") if k in ev.p.upstream}
        open_store(ev.cfg.store).publish_side_output(out, "teacher_eval", ev.p.info["teacher_key"], SPEC.code_version, up, write)
    return result


def evaluate(cfg: PipelineConfig, p: Plan, rank: int, world: int, device: torch.device, progress: bool) -> Manifest | None:
    timer = Timer()
    torch.set_num_threads(cfg.evaluate.num_threads or max(1, (os.cpu_count() or 1) // world))
    ev = Evaluator(cfg, p, rank, world, device, progress)
    cached = open_store(cfg.store).cached_side_output(teacher_numbers_dir(ev))  # the teacher's numbers may be cached
    bar = progress_bar(STAGE, (1 if cached else 2) * len(ev.batch_starts()), progress and rank == 0, unit="batch")
    student = ev.measure(ev.student_sample, bar, f"student ({ev.steps.num_steps} NFE)")
    fault_point("evaluate.measured")
    teacher = teacher_numbers(ev, bar, cached)
    bar.close()
    if rank != 0:
        return None
    speed = ev.speed()
    ev.grid(p.out_dir / "grid.png")
    save_stats(p.out_dir / "student_stats.npz", *student["stats"])
    metrics = {
        **teacher,
        "student_fd": student["fd"],
        "fd_ratio": student["fd"] / teacher["teacher_fd"],
        "student_class_accuracy": student["class_accuracy"],
        "student_nfe": ev.steps.num_steps,
        **({"student_clip_score": student["clip_score"]} if "clip_score" in student else {}),
        **speed,
        "features": cfg.evaluate.features,
        "num_samples": cfg.evaluate.num_samples,
        "generator": Path(p.info["generator_dir"]).name,
        "distill_steps": p.info["distill_steps"],
    }
    write_text_atomic(p.out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    tmp = tmp_sibling(p.out_dir / "metrics.parquet")
    pq.write_table(pa.Table.from_pylist([{"key": p.key, **metrics}]), tmp)
    tmp.replace(p.out_dir / "metrics.parquet")
    m = stage_manifest(
        cfg,
        p,
        # metrics.json/.parquet hold the images/s timings: records, so a recompute keeps the digest
        # (the FDs they hold are functions of student_stats.npz, which is in it)
        [file_entry(p.out_dir / n, record=n.startswith("metrics.") or None) for n in EVALUATE_FILES],
        {"metrics": metrics, "distill_dir": p.inputs["distill"], "generator_dir": p.info["generator_dir"], "num_processes": world,
         "precision": cfg.evaluate.precision},  # fmt: skip
        timer.seconds,
    )
    fault_point("evaluate.before-manifest")
    open_store(cfg.store).save_manifest(m, p.out_dir)
    return m


def build(cfg: PipelineConfig, p: Plan, num_processes: int = 1, progress: bool = True) -> Manifest:
    """Evaluate the generator the plan names."""
    if num_processes > 1:
        return launch_plan(STAGE, cfg, p, num_processes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate(cfg, p, 0, 1, device, progress)


def run_distributed(cfg: PipelineConfig, p: Plan, progress: bool = True) -> Manifest | None:
    from accelerate import PartialState

    state = PartialState(cpu=os.environ.get("DMD_FORCE_CPU") == "1" or not torch.cuda.is_available())
    # the held-out prompts' embeddings, encoded by all processes together (then the Evaluator finds them in the store)
    plan_rows(cfg, p, cfg.evaluate.prompt_column, state.device, progress, Spread(state.process_index, state.num_processes, state.wait_for_everyone))
    return evaluate(cfg, p, state.process_index, state.num_processes, state.device, progress)


def results_table(m: Manifest) -> str:
    """The headline numbers as a small text table."""
    r = m.info["metrics"]
    fd_name = "FD-digits" if r["features"] == "digits" else "FID"
    acc = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    rows = [
        ("", f"teacher ({r['teacher_nfe']} NFE)", "one-step (1 NFE)" if r["student_nfe"] == 1 else f"{r['student_nfe']}-step ({r['student_nfe']} NFE)"),
        (fd_name, f"{r['teacher_fd']:.3f}", f"{r['student_fd']:.3f}"),
        ("class accuracy", acc(r["teacher_class_accuracy"]), acc(r["student_class_accuracy"])),
        ("images/s", f"{r['teacher_images_per_s']:.1f}", f"{r['student_images_per_s']:.1f}"),
    ]
    if "student_clip_score" in r:
        rows.insert(3, ("CLIP score", f"{r['teacher_clip_score']:.2f}", f"{r['student_clip_score']:.2f}"))
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.append(f"{fd_name} ratio (one-step / teacher): {r['fd_ratio']:.2f}   speedup: {r['speedup']:.1f}x")
    return "\n".join(lines)


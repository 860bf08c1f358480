"""Stage ``distill``: DMD training of the one-step generator, on Accelerate.

Output ``<store>/distill/<key>/``: ``generator/`` (and ``generator_ema/``) in diffusers layout plus
``denoiser.json``, ``fake_score/``, ``metrics.parquet`` (one row per logged step), ``samples.png`` and
``samples/step-*.png``, ``checkpoints/step-*`` (Accelerate state + the above, for resume),
``config.yaml`` and, last, ``manifest.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch

from dmd_core.errors import InputError, shown
from dmd_core.lora import network_folder, network_skeleton, target_modules
from dmd_core.faults import fault_point
from dmd_core.losses import LPIPSLoss, lpips_backbone_path
from dmd_core.real_data import check_real_data, real_shards
from dmd_core.shards import PAIRS_FIX, check_pair_shard, shard_name

from ..checks import check_guidance, check_prompt_file, check_prompts
from ..config import DistillConfig, PipelineConfig
from ..contract import PROMPT_TEXTS, Manifest, Plan, StageOutput, Teacher, pair_prompts, spec
from ..files import Timer
from ..launch import launch_plan
from ..progress import progress_bar
from ..quality import features_digest, reference_digest
from ..store import Store, open_store
from .checkpoints import CHECKSUMS, CheckpointManager, checkpoint_problem
from .outputs import finalize, sample_grid
from .real_latents import real_spec
from .trainer import Trainer, TrainingDiverged, check_shardable, generator_parametrization, pair_urls

__all__ = ["Trainer", "TrainingDiverged", "build", "check", "checkpoint_problem", "plan", "run_distributed"]

STAGE = "distill"
LORA_SETTINGS = ("generator_lora_rank", "fake_lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")
SPEC = spec(STAGE)
# The settings outside the key that enter it as upstream entries when used (_optional_upstream).
KEYED_WHEN_SET = {"gan", "gan_weight_generator", "gan_weight_discriminator", "real_data", "real_samples", "dm_weight", "eval_samples", "generator_timesteps", "compile",
                  "optimizer", *LORA_SETTINGS}  # fmt: skip
# Settings a run may change when it continues from another run's checkpoint (resume_from): the ones outside
# the key, except those keyed when set (they change the training: they must match), and housekeeping.
# (distill.sharding is not in the key but its checkpoints are laid out otherwise: it must match too.)
MAY_DIFFER_ON_RESUME = (SPEC.not_in_key - KEYED_WHEN_SET - {"sharding"}) | {"steps", "checkpoint_every", "num_workers", "resume_from", "pairs"}
log = logging.getLogger("dmd")


def check_regression_loss(d: DistillConfig) -> None:
    """Fail before any compute if LPIPS is chosen and its backbone weights are absent."""
    if d.regression_loss == "lpips" and d.regression_weight > 0:
        if not lpips_backbone_path(d.lpips_net).is_file():
            LPIPSLoss(d.lpips_net)  # raises the InputError naming the file and the alternatives


def check(cfg: PipelineConfig, teacher: Teacher) -> None:
    """The settings against the teacher and the machine, before any stage computes (the ones that need
    neither are DistillConfig's own rules, checked when the config is read)."""
    d = cfg.distill
    if d.frozen_dtype == "float16" and not torch.cuda.is_available():
        raise InputError("distill.frozen_dtype=float16 needs a CUDA GPU. Fix: --set distill.frozen_dtype=bfloat16 (or float32) on CPU.")
    if d.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise InputError("distill.mixed_precision=fp16 needs a CUDA GPU. Fix: --set distill.mixed_precision=bf16 (or no) on CPU.")
    check_regression_loss(d)
    check_optimizer(d)
    if d.generator_timestep is not None and teacher.param.kind == "edm":
        raise InputError(
            "distill.generator_timestep applies to VP teachers (and flow ones); an EDM generator starts at sigma_max. Fix: drop distill.generator_timestep."
        )
    generator_parametrization(d, teacher.param, teacher.num_timesteps)  # bad generator timesteps fail here
    if uses_lora(d):  # a target pattern that matches none of the teacher's modules fails here, not after generate
        target_modules(network_skeleton(network_folder(teacher.layout, teacher.path)), d.lora_target_modules)
    if d.gan:
        check_real_data_setting(d, teacher, open_store(cfg.store))
    check_guidance("distill", d.guidance_scale, teacher)
    if d.regression_weight == 0:
        check_prompts(teacher, cfg.generate.prompts, "generate")
    if d.resume_from:
        ckpt = open_store(cfg.store).input_dir(d.resume_from)  # a bucket's checkpoint by URL: fetched here
        if not (ckpt / "trainer.json").is_file():
            raise InputError(f"distill.resume_from: {ckpt} is not a distill checkpoint (no trainer.json). Fix: point it at <distill output>/checkpoints/step-N.")
        problem = checkpoint_problem(ckpt) if (ckpt / CHECKSUMS).is_file() else None  # older checkpoints have no checksums
        if problem:
            raise InputError(f"distill.resume_from: the checkpoint {ckpt} does not verify: {problem}. Fix: point it at another checkpoint.")


def check_processes(cfg: PipelineConfig, num_processes: int) -> None:
    check_shardable(cfg.distill, num_processes)


def check_optimizer(d: DistillConfig) -> None:
    """distill.optimizer=adamw8bit needs bitsandbytes and a CUDA GPU (its 8-bit kernels run on CUDA only)."""
    if d.optimizer != "adamw8bit":
        return
    if not torch.cuda.is_available():
        raise InputError("distill.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW runs on CUDA only). "
                         "Fix: --set distill.optimizer=adamw on CPU, or run on a GPU worker.")  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("distill.optimizer=adamw8bit needs bitsandbytes, which is not installed. Fix: pip install bitsandbytes, "
                         "or --set distill.optimizer=adamw.")  # fmt: skip


def uses_lora(d: DistillConfig) -> bool:
    return d.generator_lora_rank is not None or d.fake_lora_rank is not None


def plan(cfg: PipelineConfig, teacher: Teacher, pairs: StageOutput | None) -> Plan:
    """Key = (config, pairs digest, teacher digest); ``check`` ran first.

    ``pairs`` is None without a regression loss (distill.regression_weight = 0): nothing reads them."""
    if pairs is None:
        return _plan_without_pairs(cfg, teacher)
    pm = pairs.manifest
    if pm.upstream.get("teacher") != teacher.digest:
        raise InputError(
            f"the pairs in {pairs.out_dir} were made by another teacher (digest {pm.upstream.get('teacher', '?')[:16]}) "
            f"than the configured teacher.path (digest {teacher.digest[:16]}). Fix: regenerate the pairs with this teacher."
        )
    check_pairs(cfg, teacher, pairs)
    up = {"pairs": pm.digest, "teacher": teacher.digest, **_optional_upstream(cfg)}
    key = SPEC.key(cfg, up)
    info = {"image_shape": pm.info["image_shape"], "num_shards": pm.info["num_shards"]}
    return Plan(STAGE, key, open_store(cfg.store).output_dir(STAGE, key), up, {"teacher": str(teacher.path), "pairs": str(pairs.out_dir)}, info)


def check_pairs(cfg: PipelineConfig, teacher: Teacher, pairs: StageOutput) -> None:
    """Every pair fits the teacher (shape, float, finite, label in range, the listed count): crafted or foreign
    pairs (distill.pairs) are refused before training, not at the step that meets them. Read once per pairs
    digest and teacher shape: the store remembers a set that passed."""
    num_labels = _pair_prompt_count(pairs.out_dir) if teacher.takes_prompts else teacher.param.num_classes
    shape = tuple(teacher.image_shape)
    store = open_store(cfg.store)
    marker = f"pairs-{pairs.manifest.digest[:32]}-{'x'.join(map(str, shape))}-{num_labels}"
    if store.noted(marker):
        return
    counts = {f.name: f.samples for f in pairs.manifest.files}
    urls, checksums = pair_urls(store, pairs.out_dir, pairs.manifest)
    for i, url in enumerate(urls):
        check_pair_shard(url, shape, num_labels, counts.get(shard_name(i)), checksums.get(url))
    store.note(marker)


def _pair_prompt_count(pairs_dir: Path) -> int:
    """How many prompts a text-to-image generate output's cls.txt index (prompts.bin + prompt_offsets.npy), checked."""
    where = shown(str(Path(pairs_dir) / PROMPT_TEXTS[0]))
    try:
        texts = pair_prompts(pairs_dir)
        if texts is None:
            raise InputError(f"the pairs' prompts {where} are missing; a text-to-image teacher needs them. {PAIRS_FIX}")
        ends = texts.offsets.read(range(len(texts.offsets)))
        ok = len(texts) > 0 and ends[0] == 0 and bool((ends[1:] >= ends[:-1]).all()) and ends[-1] == texts.blob.stat().st_size
    except (OSError, ValueError, IndexError) as e:
        raise InputError(f"the pairs' prompts {where} are unreadable ({type(e).__name__}). {PAIRS_FIX}") from None
    if not ok or texts.offsets.dtype != "int64":
        raise InputError(f"the pairs' prompts {where} do not match their offsets ({PROMPT_TEXTS[1]}). {PAIRS_FIX}")
    return len(texts)


def _plan_without_pairs(cfg: PipelineConfig, teacher: Teacher) -> Plan:
    """DM-only training (with or without the GAN term): the prompts, for text teachers, come from generate.prompts."""
    g = cfg.generate
    store = open_store(cfg.store)
    up = {"teacher": teacher.digest, **_optional_upstream(cfg)}
    inputs = {"teacher": str(teacher.path)}
    if g.prompts:
        check_prompt_file(store, g.prompts, g.prompt_column, "generate")  # a bad file fails here
        up["prompts"] = f"{store.digest(g.prompts)}:{g.prompt_column}"
        inputs["prompts"] = g.prompts
    key = SPEC.key(cfg, up)
    return Plan(STAGE, key, store.output_dir(STAGE, key), up, inputs, {"image_shape": list(teacher.image_shape), "num_shards": 0})


def check_real_data_setting(d: DistillConfig, teacher: Teacher, store: Store) -> None:
    """distill.real_data fits the teacher: each of the samples distill will read, checked one at a time before any
    stage runs (the trainer checks them again as it loads them). Once per content: the store remembers a set that passed."""
    if d.real_data == "digits":
        fix = "Fix: --set distill.real_data=DIR (a WebDataset of real images, docs/formats.md) or distill.gan=false."
        if teacher.takes_prompts:
            raise InputError(f"distill.real_data=digits holds class-labelled 1x8x8 images; a text-to-image teacher needs real images with captions. {fix}")
        if teacher.image_shape != (1, 8, 8):
            raise InputError(f"distill.real_data=digits holds 1x8x8 images; this teacher makes {list(teacher.image_shape)}. {fix}")
        return
    spec = real_spec(teacher)
    real_shards(d.real_data)  # a path that is no WebDataset is refused before it is hashed
    marker = f"real-data-{store.digest(d.real_data)[:32]}-{'x'.join(map(str, spec.shape))}-{spec.num_classes}-{int(spec.text)}-{d.real_samples}"
    if not store.noted(marker):
        check_real_data(d.real_data, d.real_samples, spec)
        store.note(marker)


def _real_data_digest(d: DistillConfig, store: Store) -> str:
    if d.real_data == "digits":
        return "digits"  # the embedded set: fixed, named
    return f"wds:{store.digest(d.real_data)}:{d.real_samples}"


def _optional_upstream(cfg: PipelineConfig) -> dict[str, str]:
    """Settings that enter the key only when used: a key without them is the key of the same run without the option."""
    d, up, store = cfg.distill, {}, open_store(cfg.store)
    if d.eval_every:
        e = cfg.evaluate
        up["quality_probe"] = f"{d.eval_every}:{d.eval_samples}:{e.seed}:{features_digest(e, store)}:{reference_digest(e, store)}"
    if d.gan:
        up["gan"] = f"{d.gan_weight_generator}:{d.gan_weight_discriminator}:{_real_data_digest(d, store)}"
    if d.dm_weight != 1.0:
        up["dm_weight"] = str(d.dm_weight)
    if d.generator_timesteps is not None:
        up["generator_timesteps"] = ",".join(map(str, d.generator_timesteps))
    if d.compile:  # compiled kernels round differently (tests/test_compile.py measures by how much)
        up["compile"] = "inductor"
    if d.optimizer != "adamw":  # 8-bit moments round the updates
        up["optimizer"] = d.optimizer
    if uses_lora(d):  # the adapters' settings; alpha, dropout and targets need a rank (DistillConfig's rule)
        up["lora"] = ",".join(f"{k}={json.dumps(getattr(d, k))}" for k in LORA_SETTINGS)
    return up


# ---------------------------------------------------------------- the run


def train(cfg: PipelineConfig, p: Plan, progress: bool = True) -> Manifest | None:
    """The DMD loop under Accelerate; rank 0 writes outputs; returns the manifest on rank 0."""
    from accelerate import Accelerator

    timer = Timer()
    d = cfg.distill
    force_cpu = os.environ.get("DMD_FORCE_CPU") == "1" or not torch.cuda.is_available()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a process may run distill twice with different precisions (keeps the process group)
    acc = Accelerator(mixed_precision=d.mixed_precision, cpu=force_cpu)
    torch.set_num_threads(d.num_threads or max(1, (os.cpu_count() or 1) // acc.num_processes))
    tr = Trainer(cfg, p, acc)
    checkpoints = CheckpointManager(cfg, p, acc, MAY_DIFFER_ON_RESUME)
    ckpt, start, rows = checkpoints.restore(tr)
    if start >= d.steps and not d.resume_from:  # training had finished; only its outputs were lost or damaged
        log.info("distill: rebuilding the outputs from the final checkpoint %s", ckpt)
        return finalize(cfg, p, tr, rows, timer.seconds)
    if start >= d.steps:
        raise InputError(f"the checkpoint {ckpt} is already at step {start} >= distill.steps={d.steps}. Fix: raise distill.steps.")
    (p.out_dir / "samples").mkdir(parents=True, exist_ok=True)
    bar = progress_bar(STAGE, d.steps, progress and acc.is_main_process, initial=start, unit="step")
    samples_per_step = d.batch_size * d.gradient_accumulation_steps * acc.num_processes
    last_t, last_step = timer.seconds, start
    compile_cost = CompileCost(start, d.steps) if d.compile else None
    for step in range(start, d.steps):
        if step == start or step % d.checkpoint_every == 0:
            tr.restart_data(step)
        logs = tr.step(step)
        fault_point("distill.step")
        if compile_cost is not None:
            compile_cost.record()
        done = step + 1
        probe_now = bool(d.eval_every) and (done % d.eval_every == 0 or done == d.steps)
        if done % d.log_every == 0 or done == d.steps or probe_now:
            now = timer.seconds
            row = {"step": done, **logs, "samples_per_s": samples_per_step * (done - last_step) / max(now - last_t, 1e-9), "wall_time_s": now}
            if probe_now and tr.probe_fn is not None:
                row.update(tr.probe(done))
            last_t, last_step = timer.seconds, done  # a probe's time does not count as training throughput
            rows.append(row)
            bar.set_postfix(dm=f"{logs['loss_dm']:.4f}", reg=f"{logs['loss_reg']:.4f}", fake=f"{logs['loss_fake']:.4f}")
        if (acc.is_main_process or tr.sharded) and (done % d.sample_every == 0 or done == d.steps):  # sharded: every process runs it
            sample_grid(tr, p.out_dir / "samples" / f"step-{done:07d}.png")
        if done % d.checkpoint_every == 0 or done == d.steps:
            checkpoints.save(done, tr, rows)
        bar.update(1)
    bar.close()
    return finalize(cfg, p, tr, rows, timer.seconds)


class CompileCost:
    """Measures what distill.compile cost this run: the first step (which compiles) against the next ones.

    Warns when compiling takes more than ``SHARE`` of the run it is meant to speed up."""

    SHARE, SAMPLE = 0.2, 5

    def __init__(self, start: int, steps: int):
        self.start, self.steps, self.times = start, steps, [time.perf_counter()]

    def record(self) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) != self.SAMPLE + 2:
            return
        first = self.times[1] - self.times[0]
        steady = (self.times[-1] - self.times[1]) / self.SAMPLE
        overhead, rest = first - steady, steady * (self.steps - self.start)
        log.info("distill: compiling took about %.1f s (steady step %.3f s)", overhead, steady)
        if overhead > self.SHARE * (overhead + rest):
            log.warning("distill: compiling took %.0f%% of this run (%.1f s of %.1f s): for runs this short set distill.compile=false",
                        100 * overhead / (overhead + rest), overhead, overhead + rest)  # fmt: skip


# ---------------------------------------------------------------- entry points


def build(cfg: PipelineConfig, p: Plan, num_processes: int = 1, progress: bool = True) -> Manifest:
    """Train (or resume) the generator the plan names."""
    if num_processes > 1:
        return launch_plan(STAGE, cfg, p, num_processes)
    return train(cfg, p, progress)


def run_distributed(cfg: PipelineConfig, p: Plan, progress: bool = True) -> Manifest | None:
    """One process under ``accelerate launch``."""
    return train(cfg, p, progress)

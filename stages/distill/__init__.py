"""Stage ``distill``: DMD training of the one-step generator, on Accelerate.

Output ``<store>/distill/<key>/``: ``generator/`` (and ``generator_ema/``) in diffusers layout plus
``denoiser.json``, ``fake_score/``, ``metrics.parquet`` (one row per logged step), ``samples.png`` and
``samples/step-*.png``, ``checkpoints/step-*`` (Accelerate state + the above, for resume),
``config.yaml`` and, last, ``manifest.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from torch.profiler import record_function

from dmd_core.denoisers import Denoiser, Parametrization
from dmd_core.digits import load_digits_data
from dmd_core.dmd import (
    VP_GENERATOR_TIMESTEP,
    AdversarialLoss,
    BackwardSimulation,
    DMDSettings,
    FakeScoreLoss,
    GANLogits,
    GeneratorLoss,
    MultiStep,
    OneStep,
    SampleRNG,
    frozen,
    random_labels,
    step_noise,
)
from dmd_core.errors import InputError
from dmd_core.faults import fault_point
from dmd_core.gan import BottleneckHead, BottleneckTap, discriminator_loss
from dmd_core.images import save_grid, training_curves_png
from dmd_core.loading import save_denoiser
from dmd_core.losses import DecodedLoss, LPIPSLoss, l2_loss, pseudo_huber_loss
from dmd_core.metrics import channel_stats
from dmd_core.real_data import RealData, check_real_data, read_real_data
from dmd_core.shards import check_pair_batch, pair_stream, sample_seed, shard_name
from dmd_core.text import read_prompts
from dmd_core.transfer import to_device

from ..checks import check_guidance, check_prompts
from ..config import DistillConfig, PipelineConfig
from ..contract import Manifest, Plan, StageOutput, Teacher, file_entry, pair_prompts, spec, stage_manifest, tree_entries
from ..files import Timer, sha256_file, tmp_sibling, write_bytes_atomic, write_text_atomic
from ..launch import launch_plan
from ..progress import progress_bar
from ..quality import QualityProbe, features_digest, reference_digest
from ..store import Store, open_store

STAGE = "distill"
SPEC = spec(STAGE)
# Settings a run may change when it continues from another run's checkpoint (resume_from).
# (The settings keyed only when set, through the upstream entries, change the training: they must match.)
KEYED_WHEN_SET = {"gan", "gan_weight_generator", "gan_weight_discriminator", "real_data", "real_samples", "dm_weight", "eval_samples", "generator_timesteps", "compile"}
MAY_DIFFER_ON_RESUME = (SPEC.not_in_key - KEYED_WHEN_SET) | {"steps", "checkpoint_every", "num_workers", "resume_from", "pairs"}
# SampleRNG streams: independent draws for each purpose.
STREAM_GENERATOR, STREAM_SAMPLES, STREAM_DATA, STREAM_GAN, STREAM_FAKE = 0, 1, 2, 3, 10
log = logging.getLogger("dmd")


class TrainingDiverged(InputError):
    """A loss term or a gradient norm became NaN or Inf."""


def check_regression_loss(d: DistillConfig) -> None:
    """Fail before any compute if LPIPS is chosen and its backbone weights are absent."""
    if d.regression_loss == "lpips" and d.regression_weight > 0:
        from dmd_core.losses import lpips_backbone_path

        if not lpips_backbone_path(d.lpips_net).is_file():
            LPIPSLoss(d.lpips_net)  # raises the InputError naming the file and the alternatives


def check(cfg: PipelineConfig, teacher: Teacher) -> None:
    """The settings against the teacher (and the machine), before any stage computes."""
    d = cfg.distill
    if d.t_min >= d.t_max:
        raise InputError(f"distill.t_min ({d.t_min}) must be below distill.t_max ({d.t_max}). Fix: lower t_min or raise t_max.")
    if d.frozen_dtype == "float16" and not torch.cuda.is_available():
        raise InputError("distill.frozen_dtype=float16 needs a CUDA GPU. Fix: --set distill.frozen_dtype=bfloat16 (or float32) on CPU.")
    if d.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise InputError("distill.mixed_precision=fp16 needs a CUDA GPU. Fix: --set distill.mixed_precision=bf16 (or no) on CPU.")
    check_regression_loss(d)
    if d.generator_timestep is not None and teacher.param.kind != "vp":
        raise InputError(
            "distill.generator_timestep applies to VP teachers; an EDM generator starts at sigma_max. Fix: drop distill.generator_timestep."
        )
    generator_parametrization(d, teacher.param)  # bad generator timesteps fail here
    if d.gan:
        check_real_data_setting(d, teacher)
    if d.dm_weight == 0 and d.regression_weight == 0:
        raise InputError("distill.dm_weight and distill.regression_weight are both 0: the generator would have no loss. Fix: set one above 0.")
    check_guidance("distill", d.guidance_scale, teacher)
    if d.regression_weight == 0:
        check_prompts(teacher, cfg.generate.prompts, "generate")
    if d.resume_from:
        ckpt = Path(d.resume_from)
        if not (ckpt / "trainer.json").is_file():
            raise InputError(f"distill.resume_from: {ckpt} is not a distill checkpoint (no trainer.json). Fix: point it at <distill output>/checkpoints/step-N.")
        problem = checkpoint_problem(ckpt) if (ckpt / CHECKSUMS).is_file() else None  # older checkpoints have no checksums
        if problem:
            raise InputError(f"distill.resume_from: the checkpoint {ckpt} does not verify: {problem}. Fix: point it at another checkpoint.")


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
    up = {"pairs": pm.digest, "teacher": teacher.digest, **_optional_upstream(cfg)}
    key = SPEC.key(cfg, up)
    info = {"image_shape": pm.info["image_shape"], "num_shards": pm.info["num_shards"]}
    return Plan(STAGE, key, open_store(cfg.store).output_dir(STAGE, key), up, {"teacher": str(teacher.path), "pairs": str(pairs.out_dir)}, info)


def _plan_without_pairs(cfg: PipelineConfig, teacher: Teacher) -> Plan:
    """DM-only training (with or without the GAN term): the prompts, for text teachers, come from generate.prompts."""
    g = cfg.generate
    store = open_store(cfg.store)
    up = {"teacher": teacher.digest, **_optional_upstream(cfg)}
    inputs = {"teacher": str(teacher.path)}
    if g.prompts:
        read_prompts(g.prompts, g.prompt_column)  # a bad file fails here
        up["prompts"] = f"{store.digest(g.prompts)}:{g.prompt_column}"
        inputs["prompts"] = g.prompts
    key = SPEC.key(cfg, up)
    return Plan(STAGE, key, store.output_dir(STAGE, key), up, inputs, {"image_shape": list(teacher.image_shape), "num_shards": 0})


def check_real_data_setting(d: DistillConfig, teacher: Teacher) -> None:
    """distill.real_data fits the teacher (read from its first sample only; the whole set is checked at load)."""
    if d.real_data == "digits":
        fix = "Fix: --set distill.real_data=DIR (a WebDataset of real images, docs/formats.md) or distill.gan=false."
        if teacher.takes_prompts:
            raise InputError(f"distill.real_data=digits holds class-labelled 1x8x8 images; a text-to-image teacher needs real images with captions. {fix}")
        if teacher.image_shape != (1, 8, 8):
            raise InputError(f"distill.real_data=digits holds 1x8x8 images; this teacher makes {list(teacher.image_shape)}. {fix}")
        return
    load_real_set(d, teacher, 1)


def load_real_set(d: DistillConfig, teacher: Teacher, max_samples: int) -> RealData:
    """The first ``max_samples`` of a WebDataset real_data, checked against the teacher (pixel shape, classes, captions)."""
    shape = teacher.pixel_shape()
    data = read_real_data(d.real_data, max_samples, shape[0])
    check_real_data(data, shape, teacher.param.num_classes, teacher.takes_prompts, d.real_data)
    return data


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
    return up


# ---------------------------------------------------------------- the training loop


def regression_loss_fn(d: DistillConfig):
    if d.regression_loss == "lpips":
        return LPIPSLoss(d.lpips_net)
    return pseudo_huber_loss if d.regression_loss == "pseudo_huber" else l2_loss


def lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup) if warmup else base


def dmd_settings(d: DistillConfig) -> DMDSettings:
    """The algorithm's settings, by DMDSettings' own field names (it is their single source)."""
    return DMDSettings(**{f.name: getattr(d, f.name) for f in dataclasses.fields(DMDSettings)})


def generator_parametrization(d: DistillConfig, teacher: Parametrization) -> Parametrization:
    """The teacher's, plus (VP) the timestep t* the one-step generator is conditioned on (docs/math.md §5) and
    (k-step generators) its timesteps; validated as a denoiser.json would be."""
    ts = d.generator_timesteps
    if ts is not None and d.generator_timestep is not None and ts[0] != d.generator_timestep:
        raise InputError(f"distill.generator_timesteps starts at {ts[0]} but distill.generator_timestep is {d.generator_timestep}. Fix: drop one of them.")
    if teacher.kind == "vp":
        t0 = ts[0] if ts else d.generator_timestep or VP_GENERATOR_TIMESTEP
        param = dataclasses.replace(teacher, one_step_timestep=t0)
    else:
        param = teacher
    if ts is None:
        return param
    try:
        return Parametrization.from_dict({**param.to_dict(), "generator_timesteps": list(ts)})
    except ValueError as e:
        raise InputError(f"distill.generator_timesteps: {e}") from None


class Trainer:
    """Holds the networks, optimizers and data of one distill run; ``step()`` is one DMD iteration."""

    def __init__(self, cfg: PipelineConfig, p: Plan, accelerator):
        self.cfg, self.p, self.acc = cfg, p, accelerator
        d = self.d = cfg.distill
        dev = accelerator.device
        # frozen teacher, loaded once; text-to-image: with the pairs' prompts (the DM term draws from them too)
        prompts = pair_prompts(p.inputs["pairs"]) if "pairs" in p.inputs else p.prompts(cfg.generate.prompt_column)
        teacher = p.teacher()
        real_set = None
        if d.gan and d.real_data != "digits":
            real_set = load_real_set(d, teacher, d.real_samples)
            if not teacher.guidable:
                real_set.labels = None  # an unconditional teacher ignores the set's classes
        # the DM term draws its prompts from the training prompts; the real set's captions join the table after them
        self.label_range = len(prompts) if prompts is not None else teacher.param.num_classes
        if real_set is not None and real_set.prompts is not None:
            known = set(prompts)
            prompts = [*prompts, *(q for q in dict.fromkeys(real_set.prompts) if q not in known)]
            row = {q: i for i, q in reversed(list(enumerate(prompts)))}  # a caption's first row
            real_set.labels = torch.tensor([row[q] for q in real_set.prompts])
        self.real: Denoiser = teacher.load(dev, prompts)
        self.takes_prompts = teacher.takes_prompts
        gen, fake = copy.deepcopy(self.real), copy.deepcopy(self.real)  # theta, phi <- teacher
        if teacher.takes_prompts:  # one prompt table for the three networks, not three copies
            for net in (gen, fake):
                net.set_prompts(self.real.prompt_table)
        # memory: the frozen score's weights need not be float32 (alphas and prompt table stay as they are)
        if d.frozen_dtype != "float32":
            self.real.unet.to(getattr(torch, d.frozen_dtype))
        if d.gradient_checkpointing:
            for net in (gen, fake):
                net.unet.enable_gradient_checkpointing()
        gen.param = generator_parametrization(d, self.real.param)
        self.one_step = OneStep.of(gen)
        self.steps = MultiStep.of(gen)  # k-step generators (DMD2): trained on backward-simulated inputs
        self.simulation = BackwardSimulation(self.steps) if self.steps.num_steps > 1 else None
        self.shape = tuple(p.info["image_shape"])
        self.num_classes = gen.num_classes
        self.to_pixels = teacher.pixel_decoder(dev, d.gradient_checkpointing, getattr(torch, d.frozen_dtype))
        self.gan_logits = None
        if d.gan:  # the head is part of the fake score: optimised, checkpointed and synchronised with it
            fake.gan_tap = BottleneckTap(fake.unet, stop_early=not d.compile)
            fake.gan_head = self.make_gan_head(fake, d.seed, dev)
            self.gan_logits = GANLogits(self.real.param, getattr(self.real, "alphas_cumprod", None))
            if real_set is None:
                images, classes = load_digits_data()
                self.real_images, self.real_labels = images.to(dev), classes.to(dev) if self.num_classes else None
            else:  # latent teachers: the real images in model space, encoded once by the pipeline's VAE
                images = teacher.encode_pixels(real_set.images, dev)
                self.real_images, self.real_labels = images, None if real_set.labels is None else real_set.labels.to(dev)
        if d.compile:  # in place (nn.Module.compile): state_dict keys, checkpoints and saved networks stay as they are
            # Here, after the GAN tap's hook is in place and the head's probe has run (BottleneckTap says why).
            # The two UNets share UNet.forward's compiled code and dynamo by default does not guard on module
            # hooks, so with the tap on the fake score only, either could run a graph traced for the other.
            # Set for every compiled run (process-wide), so that no graph this process traces lacks the guard.
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            for net in (gen, fake):
                # dynamic=False: one graph per batch size. By default the second batch size seen (the fake
                # score's B after the generator's 2B; both run UNet.forward's code) turns the batch into a
                # symbol, and the fake score's forward and backward then run kernels made for any size.
                # (Checkpoints keep the graphs: load_unet leaves the config as saving leaves it.)
                net.unet.compile(dynamic=False)
        for net in (gen, fake):
            net.requires_grad_(True).train()
        # fused AdamW: one kernel over all tensors, about 4x cheaper than the per-tensor loop on CPU
        opt = lambda net, o: torch.optim.AdamW(net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=True)  # noqa: E731
        self.gen, self.fake, self.opt_g, self.opt_f = accelerator.prepare(gen, fake, opt(gen, d.generator_optimizer), opt(fake, d.fake_optimizer))
        self.ema = {k: v.detach().clone().float() for k, v in self.unwrap(self.gen).unet.state_dict().items()} if d.ema_decay else None
        reg_loss = regression_loss_fn(d) if d.regression_weight > 0 else None
        if isinstance(reg_loss, torch.nn.Module):
            reg_loss.to(dev)
        if d.regression_loss == "lpips" and reg_loss is not None and teacher.latent:
            reg_loss = DecodedLoss(reg_loss, self.to_pixels, d.lpips_resolution)  # LPIPS sees images, not latents
        # the GAN term runs the fake score itself, not its DDP wrapper: that forward belongs to G's backward
        adversarial = AdversarialLoss(self.gan_logits, self.unwrap(self.fake)) if d.gan else None
        self.gen_loss = GeneratorLoss(dmd_settings(d), reg_loss, self.one_step, adversarial, d.gan_weight_generator, self.simulation)
        self.fake_loss = FakeScoreLoss.for_teacher(self.real)
        self.urls = [str(Path(p.inputs["pairs"]) / shard_name(i)) for i in range(p.info["num_shards"])] if "pairs" in p.inputs else []
        self.data = None  # the pair stream
        self.ahead: dict[int, tuple] = {}  # step -> prepare(step), made by the step before while the device worked
        self.ema_sources = None  # the generator's tensors the EMA follows (update_ema)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        # quality during training (main process): FD of a fixed sample every eval_every steps, the best kept
        self.probe_fn, self.best = None, None
        if d.eval_every and accelerator.is_main_process:
            no_accuracy = teacher.takes_prompts  # training prompts carry no class column
            self.probe_fn = QualityProbe(cfg, d.eval_samples, self.shape, self.label_range, dev, (lambda labels: None) if no_accuracy else None)
            self.teacher_channels = self.pair_channel_stats(d.eval_samples) if self.urls else {}

    def unwrap(self, net):
        return self.acc.unwrap_model(net)

    def make_gan_head(self, fake: Denoiser, seed: int, dev) -> BottleneckHead:
        """DMD2's head, sized by one probe forward of the fake score (before any compiling: a batch of 1 would
        be a graph of its own); its initial weights depend on the seed only."""
        z = torch.zeros(1, *self.shape, device=dev)
        labels = torch.zeros(1, dtype=torch.long, device=dev) if fake.num_classes else None
        with torch.no_grad():
            shape = tuple(fake.gan_tap.bottleneck(lambda: fake(z, OneStep.of(fake).level, labels)).shape[1:])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(seed, STREAM_GAN, 0, 0) % (2**63))
            return BottleneckHead(shape[0], shape[1:]).to(dev)

    def discriminator_terms(self, x: torch.Tensor, labels, rng: SampleRNG) -> dict[str, torch.Tensor]:
        """The head's loss on a real batch (drawn from real_data by the rng) against the generator's samples x."""
        idx = rng.randint(0, len(self.real_images))
        real_x = self.real_images[idx]
        real_labels = self.real_labels[idx] if self.real_labels is not None else None
        fake = self.unwrap(self.fake)
        logits_real = self.gan_logits(self.fake, fake.gan_tap, fake.gan_head, real_x, real_labels, rng)
        logits_fake = self.gan_logits(self.fake, fake.gan_tap, fake.gan_head, x.detach(), labels, rng)
        return {
            "loss_gan_d": discriminator_loss(logits_real, logits_fake),
            "d_real": torch.sigmoid(logits_real).mean().detach(),  # the head's P(real) on real / generated images
            "d_fake": torch.sigmoid(logits_fake).mean().detach(),
        }

    def pair_channel_stats(self, n: int) -> dict[str, float]:
        """Per-channel mean/std (first 4 channels) of the teacher's images in the pairs: the probe's reference line."""
        stream = pair_stream(self.urls, min(n, 256), 0, 1, 0)
        ys, seen = [], 0
        while seen < n:
            ys.append(next(stream)[1].float())
            seen += len(ys[-1])
        return channel_stats(torch.cat(ys)[:n], "teacher")

    def probed_state(self) -> dict[str, torch.Tensor]:
        """The weights the probe measures (and evaluate uses by default): the EMA when there is one."""
        if self.ema is not None:
            return self.ema
        return self.unwrap(self.gen).unet.state_dict()

    @torch.no_grad()
    def probe(self, step: int) -> dict[str, float]:
        """FD / accuracy / channel statistics of the probed generator; remembers the best by FD."""
        gen = self.unwrap(self.gen)
        net = copy.deepcopy(gen).eval()
        net.unet.load_state_dict({k: v.to(net.dtype) for k, v in self.probed_state().items()})

        def sample(z, labels, idx):
            noise = step_noise(self.cfg.evaluate.seed, idx, self.shape)
            with self.acc.autocast():
                x = self.steps(net, z, labels, lambda j: noise(j).to(z.device)).float()
            return x, self.to_pixels(x)

        r = self.probe_fn(sample)
        if self.best is None or r["probe_fd"] < self.best["probe_fd"]:
            self.best = {"step": step, "probe_fd": r["probe_fd"], "state": {k: v.detach().float().cpu().clone() for k, v in self.probed_state().items()}}
        return {**r, **self.teacher_channels, "best_probe_fd": self.best["probe_fd"]}

    def load_best(self, ckpt: Path) -> None:
        """The best-so-far generator of a checkpoint (resume)."""
        if self.probe_fn is not None and (ckpt / "best.json").is_file():
            info = json.loads((ckpt / "best.json").read_text())
            state = load_file(str(ckpt / "generator_best" / "diffusion_pytorch_model.safetensors"))
            self.best = {**info, "state": {k: v.float() for k, v in state.items()}}

    def restart_data(self, step: int) -> None:
        """The stream restarts at every checkpoint boundary, so a resumed run reads what an uninterrupted one does."""
        if not self.urls:  # no regression loss: no pairs are read
            return
        segment = step // self.d.checkpoint_every
        self.ahead = {}  # its pairs came from the previous segment's stream
        self.data = pair_stream(
            self.urls, self.d.batch_size, sample_seed(self.d.seed, STREAM_DATA, segment) % (2**31),
            self.d.shuffle_buffer, self.d.num_workers,
        )  # fmt: skip

    def indices(self, step: int, micro: int) -> range:
        """Global sample indices of this process's micro-batch: 1 process with batch 2B draws what 2 with B do."""
        B, A = self.d.batch_size, self.d.gradient_accumulation_steps
        start = ((step * A + micro) * self.world + self.rank) * B
        return range(start, start + B)

    def pairs_on_device(self, batch: tuple) -> tuple:
        """One micro-batch of pairs, checked against the teacher's shape, on the device (pinned and copied
        asynchronously on a GPU)."""
        check_pair_batch(batch, self.shape, self.p.inputs.get("pairs", "the pairs"))
        return tuple(None if t is None else to_device(t, self.acc.device) for t in batch)

    def prepare(self, step: int, read_pairs: bool) -> tuple[list[tuple] | None, list[tuple]]:
        """What ``step`` needs before its first network call: its micro-batches of pairs (when it reads the
        stream) and each generator micro-batch's rng with its first two draws, z and the labels."""
        pairs = [self.pairs_on_device(next(self.data)) for _ in range(self.d.gradient_accumulation_steps)] if read_pairs and self.urls else None
        draws = []
        for m in range(self.d.gradient_accumulation_steps):
            rng = SampleRNG(self.d.seed, STREAM_GENERATOR, step, self.indices(step, m), self.acc.device)
            draws.append((rng, rng.randn(self.shape), random_labels(rng, self.label_range)))
        return pairs, draws

    def host_logs(self, step: int, sums: dict[str, torch.Tensor], norms: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's scalars to the host in one transfer (the step's only device sync), and the NaN/Inf check
        of its loss terms and gradient norms. A non-finite term propagates through the micro-batch sums, so
        checking the sums checks every micro-batch. A non-finite gradient norm with finite losses means the
        optimizer has just written NaN into the weights. Either way the run stops in the step it happens,
        before any checkpoint holds it."""
        values = torch.stack([v.float() for v in (*sums.values(), *norms.values())])
        finite = torch.isfinite(values).float()
        if self.world > 1:  # every rank stops together
            finite = self.acc.reduce(finite, reduction="sum") / self.world
        host = torch.cat([values, finite]).tolist()
        logs = dict(zip([*sums, *norms], host))
        bad = [name for name, f in zip([*sums, *norms], host[len(values) :]) if f < 1]
        if bad:
            raise TrainingDiverged(
                f"distill stopped at step {step + 1}: {', '.join(bad)} is NaN or Inf. The last good checkpoint is kept in "
                f"{self.p.out_dir / 'checkpoints'}. Fix: lower the learning rates (distill.generator_optimizer.lr, "
                "distill.fake_optimizer.lr), keep distill.max_grad_norm set, or use distill.mixed_precision=no."
            )
        return logs

    def step(self, step: int, batches: list | None = None) -> dict[str, float]:
        """One generator update then ``fake_updates_per_generator_update`` fake-score updates.

        Nothing in it waits for the device until ``host_logs`` at the end (one transfer for every logged
        scalar): the CPU keeps queueing work, and the next step's pairs and first draws are made while the
        device runs."""
        d = self.d
        for group in self.opt_g.param_groups:
            group["lr"] = lr_at(step, d.generator_optimizer.lr, d.warmup_steps)
        for group in self.opt_f.param_groups:
            group["lr"] = lr_at(step, d.fake_optimizer.lr, d.warmup_steps)
        sums: dict[str, torch.Tensor] = {}  # logged scalars, summed on the device over micro-batches

        def add(name: str, v: torch.Tensor, weight: float) -> None:
            sums[name] = sums.get(name, 0.0) + v.detach().float() * weight

        pairs, draws = self.ahead.pop(step, None) or self.prepare(step, read_pairs=batches is None)
        if batches is not None:
            pairs = [self.pairs_on_device(b) for b in batches]
        # record_function names the phases in a torch.profiler trace (about a microsecond each otherwise)
        xs, labels_dm, norms = self.generator_update(draws, pairs, add)
        norms["grad_norm_fake"] = self.fake_score_updates(step, xs, labels_dm, add)
        if self.ema is not None:
            with record_function("dmd.ema"):
                self.update_ema()
        # the next step's pairs and first draws (pure functions of (seed, step, sample)), made while the device
        # works: the host's work before the next step's first network call is then only queueing it
        with record_function("dmd.read_ahead"):
            self.ahead = {step + 1: self.prepare(step + 1, read_pairs=batches is None)}
        with record_function("dmd.host_logs"):
            host = self.host_logs(step, sums, norms)
        logs = {"loss_dm": 0.0, "loss_reg": 0.0, "loss_g": 0.0, "loss_fake": 0.0, **host}
        logs["lr_g"], logs["lr_fake"] = self.opt_g.param_groups[0]["lr"], self.opt_f.param_groups[0]["lr"]
        return logs

    def generator_update(self, draws: list[tuple], pairs: list[tuple] | None, add: Callable) -> tuple[list, list, dict]:
        """loss_G = loss_DM + lambda_reg * l(G(z_ref), y_ref) over the micro-batches, then one optimizer step.
        Returns stopgrad(G(z)) and its labels per micro-batch (the fake score trains on them) and the norm."""
        d, acc, A = self.d, self.acc, self.d.gradient_accumulation_steps
        xs, labels_dm = [], []
        with record_function("dmd.generator"):
            for m in range(A):
                rng, z, labels = draws[m]
                z_ref, y_ref, labels_ref = pairs[m] if pairs is not None else (None, None, None)
                sync = acc.no_sync(self.gen) if m < A - 1 else nullcontext()
                # the GAN term's gradient goes through the fake score and head to G only, backward included
                freeze = frozen(self.unwrap(self.fake)) if self.gan_logits is not None else nullcontext()
                with sync, freeze, acc.autocast():
                    loss_g, terms, x = self.gen_loss(self.gen, self.real, self.fake, z, labels, rng, z_ref, y_ref, labels_ref)
                    with record_function("dmd.generator.backward"):
                        acc.backward(loss_g / A)
                xs.append(x)
                labels_dm.append(labels)
                for k, v in (*terms.items(), ("loss_g", loss_g)):
                    add(k, v, 1 / A)
            with record_function("dmd.generator.update"):
                norms = {"grad_norm_g": acc.clip_grad_norm_(self.gen.parameters(), d.max_grad_norm or math.inf)}
                self.opt_g.step()
                self.opt_g.zero_grad(set_to_none=True)
        return xs, labels_dm, norms

    def fake_score_updates(self, step: int, xs: list, labels_dm: list, add: Callable) -> torch.Tensor:
        """``fake_updates_per_generator_update`` denoising updates of the fake score on stopgrad(G(z)); the
        first on the generator update's samples, later ones on fresh ones. Returns the last gradient norm."""
        d, acc, A, dev = self.d, self.acc, self.d.gradient_accumulation_steps, self.acc.device
        with record_function("dmd.fake_score"):
            share = 1 / A / d.fake_updates_per_generator_update
            for k in range(d.fake_updates_per_generator_update):
                for m in range(A):
                    rng = SampleRNG(d.seed, STREAM_FAKE + k, step, self.indices(step, m), dev)
                    if k == 0:
                        x, labels = xs[m], labels_dm[m]
                    else:  # DMD2's extra fake updates see fresh generator samples
                        z = rng.randn(self.shape)
                        labels = random_labels(rng, self.label_range)
                        with torch.no_grad(), acc.autocast():
                            if self.simulation is None:
                                x = self.one_step(self.gen, z, labels).float()
                            else:
                                inputs, levels = self.simulation(self.gen, z, labels, rng)
                                x = self.gen(inputs, levels, labels).float()
                    sync = acc.no_sync(self.fake) if m < A - 1 else nullcontext()
                    with sync, acc.autocast():
                        loss_f = self.fake_loss(self.fake, x, labels, rng)
                        total = loss_f
                        if self.gan_logits is not None:
                            gan = self.discriminator_terms(x, labels, rng)
                            total = loss_f + d.gan_weight_discriminator * gan["loss_gan_d"]
                            for name, v in gan.items():
                                add(name, v, share)
                        with record_function("dmd.fake_score.backward"):
                            acc.backward(total / A)
                    add("loss_fake", loss_f, share)
                # the last update's norm is logged (as before: each update overwrote it)
                with record_function("dmd.fake_score.update"):
                    norm = acc.clip_grad_norm_(self.fake.parameters(), d.max_grad_norm or math.inf)
                    self.opt_f.step()
                    self.opt_f.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * theta, one fused call over all tensors (a per-tensor loop is
        hundreds of kernel launches at real model sizes)."""
        if self.ema_sources is None:  # the generator's tensors, in the EMA's key order (the views stay valid:
            # optimizer steps and checkpoint loads update them in place)
            state = self.unwrap(self.gen).unet.state_dict()
            self.ema_sources = {k: state[k] for k in self.ema}
        keys = list(self.ema_sources)
        torch._foreach_lerp_([self.ema[k] for k in keys], [self.ema_sources[k].float() for k in keys], 1 - self.d.ema_decay)

    # ---- outputs

    def save_networks(self, target: Path) -> None:
        """generator/, generator_ema/ and fake_score/ as denoiser directories (main process)."""
        gen = self.unwrap(self.gen)
        save_denoiser(gen, target / "generator")
        fake = self.unwrap(self.fake)
        save_denoiser(fake, target / "fake_score")
        if getattr(fake, "gan_head", None) is not None:  # DMD2's head, saved with the fake score
            save_file({k: v.contiguous() for k, v in fake.gan_head.state_dict().items()}, str(target / "fake_score" / "gan_head.safetensors"))
        if self.ema is not None:
            ema_net = copy.deepcopy(gen)
            ema_net.unet.load_state_dict({k: v.to(ema_net.dtype) for k, v in self.ema.items()})
            save_denoiser(ema_net, target / "generator_ema")
        if self.best is not None:
            best_net = copy.deepcopy(gen)
            best_net.unet.load_state_dict({k: v.to(best_net.dtype) for k, v in self.best["state"].items()})
            save_denoiser(best_net, target / "generator_best")
            (target / "best.json").write_text(json.dumps({k: self.best[k] for k in ("step", "probe_fd")}, indent=2) + "\n")

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """Fixed noise, 8 rows; one column per class (text-to-image: per prompt, the first 10), decoded to pixels."""
        C = min(self.label_range, 10) if self.takes_prompts else self.num_classes
        n = 8 * (C or 8)
        rng = SampleRNG(self.d.seed, STREAM_SAMPLES, 0, range(n), self.acc.device)
        z = rng.randn(self.shape)
        labels = torch.arange(n, device=self.acc.device) % C if C else None
        gen = self.unwrap(self.gen)
        with self.acc.autocast():
            x = self.to_pixels(self.steps(gen, z, labels, lambda j: rng.randn(self.shape)).float())
        save_grid(x, path, nrow=C or 8)


def _write_metrics(rows: list[dict], path: Path) -> None:
    """One row per logged step; columns that only some rows have (the probe's) are null elsewhere."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    tmp = tmp_sibling(path)
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows]), tmp)
    os.replace(tmp, path)


CHECKSUMS = "checksums.json"  # sha256 of every file of a checkpoint, written before trainer.json


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None if it verifies): trainer.json unreadable, a file
    missing or changed since it was written."""
    try:
        state = json.loads((ckpt / "trainer.json").read_text())
        sums = json.loads((ckpt / CHECKSUMS).read_text())
        if not isinstance(state, dict) or not isinstance(sums, dict) or not isinstance(state.get("step"), int):
            return "trainer.json or checksums.json is not what a checkpoint writes"
    except (OSError, ValueError) as e:
        return f"unreadable {getattr(e, 'filename', None) and Path(e.filename).name or 'trainer.json/checksums.json'} ({type(e).__name__})"
    for name, sha in sums.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != sha:
            return f"{name} does not match its checksum"
    for weights in sorted((ckpt / "accelerate").glob("*.safetensors")):  # the networks and optimizer moments it would load
        bad = nonfinite_tensors(load_file(str(weights)))
        if bad:
            return f"{weights.relative_to(ckpt)} holds NaN/Inf ({bad[0]})"
    return None


def checkpoints_newest_first(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step-*") if (p / "trainer.json").is_file()), reverse=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; the ones skipped are named with the reason."""
    for ckpt in checkpoints_newest_first(root):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("distill: skipping checkpoint %s: %s", ckpt.name, problem)
    return None


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def restore_samples(ckpt: Path, out: Path) -> None:
    """Sample grids a checkpoint holds that the output lost (a rebuild restores, it does not drop them)."""
    if (ckpt / "samples").is_dir():
        (out / "samples").mkdir(parents=True, exist_ok=True)
        for f in (ckpt / "samples").glob("step-*.png"):
            if not (out / "samples" / f.name).is_file():
                shutil.copyfile(f, out / "samples" / f.name)


def check_resume_compatible(ckpt: Path, cfg: PipelineConfig, p: Plan) -> dict:
    """The checkpoint's trainer.json, if its run is compatible with ``cfg``; else an error naming the keys."""
    if not (ckpt / "trainer.json").is_file():
        raise InputError(f"distill.resume_from: {ckpt} is not a distill checkpoint (no trainer.json)")
    state = json.loads((ckpt / "trainer.json").read_text())
    old, new = state["distill"], cfg.distill.model_dump(mode="json")
    differ = sorted(k for k in set(old) | set(new) if k not in MAY_DIFFER_ON_RESUME and old.get(k) != new.get(k))
    if state["teacher_digest"] != p.upstream["teacher"]:
        differ.append("teacher")
    if state.get("pairs_digest") != p.upstream.get("pairs"):
        differ.append("pairs")
    if differ:
        raise InputError(
            f"cannot resume from {ckpt}: its run differs in {', '.join(differ)} "
            f"(only {', '.join(sorted(MAY_DIFFER_ON_RESUME))} may change). Fix: use the same settings or start fresh."
        )
    return state


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
    ckpt_root = p.out_dir / "checkpoints"
    rows: list[dict] = []
    start = 0
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None and d.resume_from:
        ckpt = Path(d.resume_from)  # verified by check()
    if ckpt is not None:
        state = check_resume_compatible(ckpt, cfg, p)
        acc.load_state(str(ckpt / "accelerate"))
        if tr.ema is not None and (ckpt / "ema.safetensors").is_file():
            tr.ema = {k: v.to(acc.device) for k, v in load_file(str(ckpt / "ema.safetensors")).items()}
        tr.load_best(ckpt)
        start = state["step"]
        if (ckpt / "metrics.parquet").is_file():
            rows = pq.read_table(ckpt / "metrics.parquet").to_pylist()
        if acc.is_main_process:
            restore_samples(ckpt, p.out_dir)
        log.info("distill: resuming from %s (step %d)", ckpt, start)
    if start >= d.steps and not d.resume_from:  # training had finished; only its outputs were lost or damaged
        log.info("distill: rebuilding the outputs from the final checkpoint %s", ckpt)
        return finalize(cfg, p, tr, rows, timer.seconds) if acc.is_main_process else None
    if start >= d.steps:
        raise InputError(f"the checkpoint {ckpt} is already at step {start} >= distill.steps={d.steps}. Fix: raise distill.steps.")

    def save_checkpoint(step: int) -> None:
        # the weights are checked first: a checkpoint is never written with NaN/Inf in it (every rank
        # holds the same weights, so all ranks stop together)
        bad = nonfinite_tensors(tr.unwrap(tr.gen).unet.state_dict()) + nonfinite_tensors(tr.unwrap(tr.fake).unet.state_dict())
        if bad:
            raise TrainingDiverged(
                f"distill stopped at step {step}: the weights became NaN or Inf ({bad[0]}); no checkpoint was written for it, the last good "
                "one is kept. Fix: lower the learning rates (distill.generator_optimizer.lr, distill.fake_optimizer.lr) or keep distill.max_grad_norm set."
            )
        final, tmp = ckpt_root / f"step-{step:07d}", ckpt_root / f".step-{step:07d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
        fault_point("distill.checkpoint-state")
        if acc.is_main_process:
            tr.save_networks(tmp)
            fault_point("distill.checkpoint-networks")
            if tr.ema is not None:
                save_file({k: v.contiguous() for k, v in tr.ema.items()}, str(tmp / "ema.safetensors"))
            if rows:
                _write_metrics(rows, tmp / "metrics.parquet")
            if (p.out_dir / "samples").is_dir():  # so a rebuild can restore every grid (they are small)
                shutil.copytree(p.out_dir / "samples", tmp / "samples")
            sums = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            write_text_atomic(tmp / CHECKSUMS, json.dumps(sums, indent=1))
            state = {"step": step, "distill": d.model_dump(mode="json"), "teacher_digest": p.upstream["teacher"], "pairs_digest": p.upstream.get("pairs")}
            write_text_atomic(tmp / "trainer.json", json.dumps(state, indent=2))  # written last: marks it complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fault_point("distill.checkpoint-renamed")
            for old in sorted(ckpt_root.glob("step-*"))[: -d.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

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
        if acc.is_main_process and (done % d.sample_every == 0 or done == d.steps):
            tr.sample_grid(p.out_dir / "samples" / f"step-{done:07d}.png")
        if done % d.checkpoint_every == 0 or done == d.steps:
            save_checkpoint(done)
        bar.update(1)
    bar.close()
    if not acc.is_main_process:
        return None
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


def finalize(cfg: PipelineConfig, p: Plan, tr: Trainer, rows: list[dict], wall: float) -> Manifest:
    out = p.out_dir
    tr.save_networks(out)
    _write_metrics(rows, out / "metrics.parquet")
    final_grid = out / "samples" / f"step-{cfg.distill.steps:07d}.png"
    if not final_grid.is_file():  # rebuilding from the final checkpoint after samples/ was lost
        final_grid.parent.mkdir(parents=True, exist_ok=True)
        tr.sample_grid(final_grid)
    shutil.copyfile(final_grid, out / "samples.png")
    write_bytes_atomic(out / "curves.png", training_curves_png(rows))
    files = [e for sub in ("generator", "generator_ema", "generator_best", "fake_score", "samples") for e in tree_entries(out, sub)]
    # metrics.parquet holds timings and curves.png is drawn from them: records, so a deterministic retrain keeps the same digest
    files += [file_entry(out / "metrics.parquet", record=True), file_entry(out / "curves.png", record=True), file_entry(out / "samples.png"), file_entry(out / "config.yaml")]
    if tr.best is not None:
        files.append(file_entry(out / "best.json"))
    last = rows[-1] if rows else {}
    info = {
        "pairs_dir": p.inputs.get("pairs"),
        "teacher_path": p.inputs["teacher"],
        "steps": cfg.distill.steps,
        "num_processes": tr.world,
        "final": {k: v for k, v in last.items() if k.startswith(("loss", "grad"))},
        "samples_per_s": last.get("samples_per_s"),
        "ema": tr.ema is not None,
        "best": None if tr.best is None else {k: tr.best[k] for k in ("step", "probe_fd")},
    }
    m = stage_manifest(cfg, p, files, info, wall)
    fault_point("distill.before-manifest")
    open_store(cfg.store).save_manifest(m, out)
    return m


# ---------------------------------------------------------------- entry points


def build(cfg: PipelineConfig, p: Plan, num_processes: int = 1, progress: bool = True) -> Manifest:
    """Train (or resume) the generator the plan names."""
    if num_processes > 1:
        return launch_plan(STAGE, cfg, p, num_processes)
    return train(cfg, p, progress)


def run_distributed(cfg: PipelineConfig, p: Plan, progress: bool = True) -> Manifest | None:
    """One process under ``accelerate launch``."""
    return train(cfg, p, progress)

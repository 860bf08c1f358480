"""The Trainer of one distill run: its networks, optimizers and data, and ``step()``, one DMD iteration
(dmd_core.step's generator update and fake-score updates, with the draws and logs around them)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch.profiler import record_function

from dmd_core.denoisers import Denoiser, Parametrization
from dmd_core.digits import load_digits_data
from dmd_core.dmd import (
    NUM_LEVELS,
    AdversarialLoss,
    BackwardSimulation,
    DMDSettings,
    FakeScoreLoss,
    GANLogits,
    GeneratorLoss,
    MultiStep,
    OneStep,
    SampleRNG,
    default_generator_timestep,
    num_levels,
    random_labels,
    step_noise,
)
from dmd_core.errors import InputError, shown
from dmd_core.gan import BottleneckHead, BottleneckTap
from dmd_core.lora import LoraSettings, add_lora, load_trainable_state, lora_summary, set_trainable, trainable_state
from dmd_core.losses import DecodedLoss, LPIPSLoss, l2_loss, pseudo_huber_loss
from dmd_core.metrics import channel_stats
from dmd_core.rows import JoinedPromptRows, PromptRows
from dmd_core.shards import PAIRS_FIX, check_pair_batch, pair_stream, sample_seed, shard_name
from dmd_core.step import DiscriminatorLoss, Sums, fake_score_updates, generator_samples, generator_update
from dmd_core.transfer import to_device

from ..config import DistillConfig, OptimizerConfig, PipelineConfig
from ..contract import Manifest, Plan, StageOutput, Teacher
from ..prompt_rows import pair_rows, plan_rows, prompt_rows
from ..quality import QualityProbe
from ..store import Store, open_store
from . import sharding
from .real_latents import real_set as load_real_set

# SampleRNG streams: independent draws for each purpose.
STREAM_GENERATOR, STREAM_SAMPLES, STREAM_DATA, STREAM_GAN, STREAM_LORA, STREAM_DROPOUT, STREAM_FAKE = 0, 1, 2, 3, 4, 5, 10


class TrainingDiverged(InputError):
    """A loss term, a gradient norm or a weight became NaN or Inf."""


def regression_loss_fn(d: DistillConfig):
    if d.regression_loss == "lpips":
        return LPIPSLoss(d.lpips_net)
    return pseudo_huber_loss if d.regression_loss == "pseudo_huber" else l2_loss


def lora_settings(d: DistillConfig, rank: int) -> LoraSettings:
    """One adapter's settings (distill.*_lora_rank with the shared alpha, dropout and targets)."""
    return LoraSettings(rank, d.lora_alpha, d.lora_dropout, tuple(d.lora_target_modules) if d.lora_target_modules else None)


def add_adapters(d: DistillConfig, gen: Denoiser, fake: Denoiser) -> dict[str, dict]:
    """The LoRA adapters distill.generator_lora_rank / fake_lora_rank ask for, each seeded by its own stream;
    B = 0, so both networks still compute the teacher. Returns what each adds (empty: full fine-tunes)."""
    added = {}
    for i, (name, net, rank) in enumerate((("generator", gen, d.generator_lora_rank), ("fake_score", fake, d.fake_lora_rank))):
        if rank is not None:
            modules = add_lora(net.unet, lora_settings(d, rank), sample_seed(d.seed, STREAM_LORA, i) % (2**63))
            added[name] = lora_summary(net.unet, modules)
    return added


def make_optimizer(params: list, o: OptimizerConfig, kind: str) -> torch.optim.Optimizer:
    """AdamW over ``params``: torch's fused kernel (one kernel over all tensors, about 4x cheaper than the
    per-tensor loop on CPU), or (distill.optimizer=adamw8bit) bitsandbytes' AdamW with 8-bit moments, 2 bytes of
    state per parameter instead of 8; the distill stage's check refused it where it cannot run."""
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=True)


def lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup) if warmup else base


def dmd_settings(d: DistillConfig) -> DMDSettings:
    """The algorithm's settings, by DMDSettings' own field names (it is their single source)."""
    return DMDSettings(**{f.name: getattr(d, f.name) for f in dataclasses.fields(DMDSettings)})


def generator_parametrization(d: DistillConfig, teacher: Parametrization, num_timesteps: int = NUM_LEVELS) -> Parametrization:
    """The teacher's, plus (VP) the timestep t* the one-step generator is conditioned on (docs/math.md §5) and
    (k-step generators) its timesteps, checked against the teacher as a denoiser.json would be (the distill
    stage's check runs it first; DistillConfig has checked that the two settings agree)."""
    ts = d.generator_timesteps
    if teacher.kind == "vp":
        t0 = ts[0] if ts else d.generator_timestep or default_generator_timestep(num_timesteps)
        top = min(num_timesteps, NUM_LEVELS) - 1  # the teacher's last timestep; denoiser.json holds at most 999
        if not 0 < t0 <= top:
            setting = "distill.generator_timesteps starts at" if ts else "distill.generator_timestep is"
            fix = f"start distill.generator_timesteps at {top} or below" if ts else (
                f"--set distill.generator_timestep={min(default_generator_timestep(num_timesteps), top)}, or drop it for that default")
            raise InputError(f"{setting} {t0}, outside the teacher's timesteps [1, {top}] (its scheduler's num_train_timesteps "
                             f"is {num_timesteps}). Fix: {fix}.")  # fmt: skip
        param = dataclasses.replace(teacher, one_step_timestep=t0)
    elif teacher.kind == "flow" and (ts or d.generator_timestep is not None):  # unset: t* = T - 1, s* = 1 (docs/math.md §14)
        param = dataclasses.replace(teacher, one_step_timestep=ts[0] if ts else d.generator_timestep)
    else:
        param = teacher
    if ts is None:
        return param
    try:
        return Parametrization.from_dict({**param.to_dict(), "generator_timesteps": list(ts)})
    except ValueError as e:
        raise InputError(f"distill.generator_timesteps: {e}") from None


def pair_urls(store: Store, pairs_dir: Path, manifest: Manifest | None = None) -> tuple[list[str], dict[str, str]]:
    """The pair shards' URLs as the store hands them (paths, or object-storage URLs read where they lie) and, for
    the latter, the sha256 the manifest lists, which the reader checks."""
    m = manifest or store.read_manifest(pairs_dir)
    if m is None:
        raise InputError(f"the pairs {shown(str(pairs_dir))} have no manifest. {PAIRS_FIX}")
    urls = [store.file_url(pairs_dir, shard_name(i)) for i in range(m.info["num_shards"])]
    sha = {f.name: f.sha256 for f in m.files}
    return urls, {url: sha[shard_name(i)] for i, url in enumerate(urls) if "://" in url}


def check_shardable(d: DistillConfig, world: int) -> None:
    """distill.sharding=fsdp needs several processes (DistillConfig refuses the settings it does not run with)."""
    if d.sharding == "fsdp" and world < 2:
        raise InputError("distill.sharding=fsdp splits the networks over the processes; this run has 1. Fix: --num-processes 2 (or more), or distill.sharding=none.")


def with_network(den: Denoiser, net: torch.nn.Module) -> Denoiser:
    """A shallow copy of ``den`` around another network of the same structure (the prompt rows stay shared)."""
    out = copy.copy(den)
    out._modules = {**den._modules, "unet": net}
    return out


class Trainer:
    """Holds the networks, optimizers and data of one distill run; ``step()`` is one DMD iteration."""

    def __init__(self, cfg: PipelineConfig, p: Plan, accelerator):
        self.cfg, self.p, self.acc = cfg, p, accelerator
        d = self.d = cfg.distill
        dev = accelerator.device
        # frozen teacher, loaded once; text-to-image: with the pairs' prompts (the DM term draws from them too)
        prompts = self.training_prompt_rows(dev)
        teacher = p.teacher()
        real_set = None
        if d.gan and d.real_data != "digits":  # in model space, encoded once into the store and read by index
            real_set = load_real_set(open_store(cfg.store), d, teacher, dev)  # an unconditional teacher gets no classes
        # the DM term draws its prompts from the training prompts; the real set's captions join the table after them
        self.label_range = len(prompts) - 1 if prompts is not None else teacher.param.num_classes
        if real_set is not None and real_set.captions is not None:  # real sample j is conditioned on row label_range + j
            captions = prompt_rows(open_store(cfg.store), teacher, real_set.captions, cfg.generate.prompt_dtype, dev)
            prompts = JoinedPromptRows(prompts, captions)
            real_set.labels = torch.arange(self.label_range, self.label_range + len(real_set))
        self.real: Denoiser = teacher.load(dev, prompts)
        self.takes_prompts = teacher.takes_prompts
        gen, fake = copy.deepcopy(self.real), copy.deepcopy(self.real)  # theta, phi <- teacher (the prompt rows are shared, not copied)
        # memory: the frozen score's weights need not be float32 (alphas and prompt table stay as they are)
        if d.frozen_dtype != "float32":
            self.real.unet.to(getattr(torch, d.frozen_dtype))
        if d.gradient_checkpointing:
            for net in (gen, fake):
                net.unet.enable_gradient_checkpointing()
        self.lora = add_adapters(d, gen, fake)  # before the GAN head's probe and compiling: both see the adapted networks
        gen.param = generator_parametrization(d, self.real.param, num_levels(self.real.param, getattr(self.real, "alphas_cumprod", None)))
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
            else:  # read by index (RealRows): each rank reads the rows its own draws name
                self.real_images, self.real_labels = real_set.images, None if real_set.labels is None else real_set.labels.to(dev)
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
            set_trainable(net, net.unet)  # everything, or (LoRA) the adapter and the GAN head
            net.train()
        opt = lambda net, o: make_optimizer([p for p in net.parameters() if p.requires_grad], o, d.optimizer)  # noqa: E731
        self.sharded = d.sharding == "fsdp"
        if self.sharded:  # in place, then optimizers over the shards; not Accelerate's to wrap (sharding.py says why)
            check_shardable(d, accelerator.num_processes)
            self.frames = {"generator": sharding.skeleton(gen.unet), "fake_score": sharding.skeleton(fake.unet)}
            device_mesh = sharding.mesh(dev, accelerator.num_processes)
            for net in (gen, fake):
                sharding.shard(net.unet, device_mesh)
            self.gen, self.fake, self.opt_g, self.opt_f = gen, fake, opt(gen, d.generator_optimizer), opt(fake, d.fake_optimizer)
        else:
            self.gen, self.fake, self.opt_g, self.opt_f = accelerator.prepare(gen, fake, opt(gen, d.generator_optimizer), opt(fake, d.fake_optimizer))
        # the EMA follows what trains: the whole network, or (LoRA) the adapter's A and B
        self.ema = {k: v.detach().clone().float() for k, v in trainable_state(self.unwrap(self.gen).unet).items()} if d.ema_decay else None
        reg_loss = regression_loss_fn(d) if d.regression_weight > 0 else None
        if isinstance(reg_loss, torch.nn.Module):
            reg_loss.to(dev)
        if d.regression_loss == "lpips" and reg_loss is not None and teacher.latent:
            reg_loss = DecodedLoss(reg_loss, self.to_pixels, d.lpips_resolution)  # LPIPS sees images, not latents
        # the GAN term runs the fake score itself, not its DDP wrapper: that forward belongs to G's backward
        adversarial = AdversarialLoss(self.gan_logits, self.unwrap(self.fake)) if d.gan else None
        self.gen_loss = GeneratorLoss(dmd_settings(d), reg_loss, self.one_step, adversarial, d.gan_weight_generator, self.simulation)
        self.fake_loss = FakeScoreLoss.for_teacher(self.real)
        # the head's turn runs the DDP wrapper: that forward belongs to the fake score's backward
        self.discriminator = DiscriminatorLoss(self.gan_logits, self.fake, self.unwrap(self.fake), self.real_images, self.real_labels) if d.gan else None
        self.urls, self.checksums = pair_urls(open_store(cfg.store), Path(p.inputs["pairs"])) if "pairs" in p.inputs else ([], {})
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

    def whole_networks(self) -> dict[str, Denoiser] | None:
        """The generator, the fake score and (with an EMA) the EMA generator ``ema``, whole, for saving: the trained
        networks themselves and a copy with the EMA's weights, or (distill.sharding=fsdp) copies gathered on the main
        process's CPU (None elsewhere; every process calls it)."""
        gen, fake = self.unwrap(self.gen), self.unwrap(self.fake)
        if not self.sharded:
            nets = {"generator": gen, "fake_score": fake}
            if self.ema is not None:
                nets["ema"] = copy.deepcopy(gen)
                load_trainable_state(nets["ema"].unet, {k: v.to(gen.dtype) for k, v in self.ema.items()})
            return nets
        whole = {"generator": sharding.gathered(gen.unet, self.frames["generator"]), "fake_score": sharding.gathered(fake.unet, self.frames["fake_score"])}
        if self.ema is not None:
            whole["ema"] = sharding.gathered(gen.unet, self.frames["generator"], self.ema)
        if not self.acc.is_main_process:
            return None
        return {name: with_network(fake if name == "fake_score" else gen, net) for name, net in whole.items()}

    def whole_ema(self) -> dict[str, torch.Tensor] | None:
        """The EMA's tensors whole (sharded: gathered on every process, a collective)."""
        return None if self.ema is None else {k: sharding.whole(v) for k, v in self.ema.items()}

    def training_prompt_rows(self, device) -> PromptRows | None:
        """Text-to-image: the rows of the prompts the pairs were made with (the DM term draws from them too)."""
        if "pairs" not in self.p.inputs:
            return plan_rows(self.cfg, self.p, self.cfg.generate.prompt_column, device)
        pairs_dir = Path(self.p.inputs["pairs"])
        m = open_store(self.cfg.store).read_manifest(pairs_dir)
        return pair_rows(self.cfg, self.p.teacher(), StageOutput(pairs_dir, m), device) if "prompts" in m.upstream else None

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

    def pair_channel_stats(self, n: int) -> dict[str, float]:
        """Per-channel mean/std (first 4 channels) of the teacher's images in the pairs: the probe's reference line."""
        stream = pair_stream(self.urls, min(n, 256), 0, 1, 0, self.checksums)
        ys, seen = [], 0
        while seen < n:
            ys.append(next(stream)[1].float())
            seen += len(ys[-1])
        return channel_stats(torch.cat(ys)[:n], "teacher")

    def probed_state(self) -> dict[str, torch.Tensor]:
        """The weights the probe measures (and evaluate uses by default): the EMA when there is one."""
        if self.ema is not None:
            return self.ema
        return trainable_state(self.unwrap(self.gen).unet)

    @torch.no_grad()
    def probe(self, step: int) -> dict[str, float]:
        """FD / accuracy / channel statistics of the probed generator; remembers the best by FD."""
        gen = self.unwrap(self.gen)
        net = copy.deepcopy(gen).eval()
        load_trainable_state(net.unet, {k: v.to(net.dtype) for k, v in self.probed_state().items()})

        def sample(z, labels, idx):
            noise = step_noise(self.cfg.evaluate.seed, idx, self.shape)
            with self.acc.autocast():
                x = self.steps(net, z, labels, lambda j: noise(j).to(z.device)).float()
            return x, self.to_pixels(x)

        r = self.probe_fn(sample)
        if self.best is None or r["probe_fd"] < self.best["probe_fd"]:
            self.best = {"step": step, "probe_fd": r["probe_fd"], "state": {k: v.detach().float().cpu().clone() for k, v in self.probed_state().items()}}
        return {**r, **self.teacher_channels, "best_probe_fd": self.best["probe_fd"]}

    def restart_data(self, step: int) -> None:
        """The stream restarts at every checkpoint boundary, so a resumed run reads what an uninterrupted one does."""
        if not self.urls:  # no regression loss: no pairs are read
            return
        segment = step // self.d.checkpoint_every
        self.ahead = {}  # its pairs came from the previous segment's stream
        self.data = pair_stream(
            self.urls, self.d.batch_size, sample_seed(self.d.seed, STREAM_DATA, segment) % (2**31),
            self.d.shuffle_buffer, self.d.num_workers, self.checksums,
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

    def host_logs(self, step: int, sums: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], pairs: list[tuple] | None = None) -> dict[str, float]:
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
            raise TrainingDiverged(f"distill stopped at step {step + 1}: {', '.join(bad)} is NaN or Inf. {self.divergence_cause(pairs)}")
        return logs

    def divergence_cause(self, pairs: list[tuple] | None) -> str:
        """Why a step went NaN or Inf, as far as the host can tell, and the fix: the data when the step's pairs or
        the real images hold NaN or Inf (no learning rate helps then), else the training itself; and the
        checkpoint a rerun resumes from, only when one exists."""
        if pairs and any(not bool(torch.isfinite(t).all()) for batch in pairs for t in batch[:2]):
            return f"This step's pairs hold NaN or Inf (from {shown(str(self.p.inputs.get('pairs', '?')))}). {PAIRS_FIX}"
        real = getattr(self, "real_images", None)  # a WebDataset's rows were checked finite as they were encoded
        if isinstance(real, torch.Tensor) and not bool(torch.isfinite(real).all()):
            return "The real images (distill.real_data) hold NaN or Inf. Fix: replace or remove those images; real images are finite, in [-1, 1]."
        found = sorted((self.p.out_dir / "checkpoints").glob("step-*"))
        kept = f"The last good checkpoint is kept: {shown(str(found[-1]))}." if found else "No checkpoint was written before it."
        return (f"{kept} Fix: lower the learning rates (distill.generator_optimizer.lr, distill.fake_optimizer.lr), keep "
                "distill.max_grad_norm set, or use distill.mixed_precision=no.")  # fmt: skip

    def step(self, step: int, batches: list | None = None) -> dict[str, float]:
        """One DMD iteration (``iteration``). LoRA dropout draws its masks from torch's global generators: here they
        are seeded by (seed, step, process) for the step and restored after it, so a run does not depend on what the
        process drew before it, and a resumed run draws the masks an uninterrupted one does."""
        if not self.d.lora_dropout:
            return self.iteration(step, batches)
        with torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else []):
            torch.manual_seed(sample_seed(self.d.seed, STREAM_DROPOUT, step, self.rank) % (2**63))
            return self.iteration(step, batches)

    def iteration(self, step: int, batches: list | None = None) -> dict[str, float]:
        """One generator update then ``fake_updates_per_generator_update`` fake-score updates.

        Nothing in it waits for the device until ``host_logs`` at the end (one transfer for every logged
        scalar): the CPU keeps queueing work, and the next step's pairs and first draws are made while the
        device runs."""
        d, acc = self.d, self.acc
        for group in self.opt_g.param_groups:
            group["lr"] = lr_at(step, d.generator_optimizer.lr, d.warmup_steps)
        for group in self.opt_f.param_groups:
            group["lr"] = lr_at(step, d.fake_optimizer.lr, d.warmup_steps)
        sums = Sums()
        pairs, draws = self.ahead.pop(step, None) or self.prepare(step, read_pairs=batches is None)
        if batches is not None:
            pairs = [self.pairs_on_device(b) for b in batches]
        xs, labels_dm, norm_g = generator_update(acc, self.gen, self.real, self.fake, self.opt_g, self.gen_loss, draws, pairs, d.max_grad_norm, sums)
        norm_fake = fake_score_updates(
            acc, self.fake, self.opt_f, self.fake_loss, self.fake_batches(step, xs, labels_dm), d.fake_updates_per_generator_update,
            d.gradient_accumulation_steps, d.max_grad_norm, sums, self.discriminator, d.gan_weight_discriminator,
        )  # fmt: skip
        norms = {"grad_norm_g": sharding.whole(norm_g), "grad_norm_fake": sharding.whole(norm_fake)}  # the fake score's: its last update's
        if self.ema is not None:
            with record_function("dmd.ema"):
                self.update_ema()
        # the next step's pairs and first draws (pure functions of (seed, step, sample)), made while the device
        # works: the host's work before the next step's first network call is then only queueing it
        with record_function("dmd.read_ahead"):
            self.ahead = {step + 1: self.prepare(step + 1, read_pairs=batches is None)}
        with record_function("dmd.host_logs"):
            host = self.host_logs(step, sums, norms, pairs)
        logs = {"loss_dm": 0.0, "loss_reg": 0.0, "loss_g": 0.0, "loss_fake": 0.0, **host}
        logs["lr_g"], logs["lr_fake"] = self.opt_g.param_groups[0]["lr"], self.opt_f.param_groups[0]["lr"]
        return logs

    def fake_batches(self, step: int, xs: list, labels_dm: list):
        """``batch(k, m)`` of the fake-score updates: update 0 trains on the generator update's samples, later
        ones (DMD2) on fresh samples of the updated generator, drawn by the update's own stream."""

        def batch(k: int, m: int) -> tuple:
            rng = SampleRNG(self.d.seed, STREAM_FAKE + k, step, self.indices(step, m), self.acc.device)
            if k == 0:
                return xs[m], labels_dm[m], rng
            z = rng.randn(self.shape)
            labels = random_labels(rng, self.label_range)
            with self.acc.autocast():
                return generator_samples(self.gen, self.one_step, self.simulation, z, labels, rng), labels, rng

        return batch

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


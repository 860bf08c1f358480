"""How much memory one DMD iteration needs per device, predicted before anything runs (README "Fitting a teacher
on your GPUs").

Per network: its weights (in their dtype), the gradients and optimizer states of what trains (everything, or a LoRA
adapter), and its activations. Weights, gradients and optimizer states are counts of parameters times bytes.
Activations are measured, never guessed per architecture: a probe runs the network's call of the iteration (a
forward, and the backward when gradients flow) on two samples and on three, while ``LiveBytes`` records after
every op the bytes of the tensor storages the call made and has not freed. The two timelines match op for op, and
every tensor is either proportional to the batch (activations and their gradients) or independent of it (parameter
gradients, autocast's casts of the weights), so live bytes at op i for B samples are ``two[i] + (B - 2) *
(three[i] - two[i])``; the peak over i is the call's peak at B. Two and three, not one and two: some ops take other
paths for a batch of one (a UNet's call on one sample runs 12 ops fewer than on two, diffusers 0.42), and the
timelines would not match. That timeline holds what saved-tensor hooks alone
miss: a checkpointed block recomputed inside the backward, activation gradients, gradients filling in while the
saved tensors are freed.

Large teachers (``FAKE_ABOVE``) run the probes on fake tensors (``FakeTensorMode``: shapes and dtypes, no memory, no
arithmetic; built from the meta device), so an SD-size probe costs seconds and no memory; so does the regression
loss (LPIPS, a VAE decoder). Small teachers run for real on the CPU, faster than fake tensors' dispatch. Either way the probe counts op outputs, as the CPU allocator (or
``torch.cuda.max_memory_allocated``) would see them; a kernel's internal workspace is not an op output.

``dmd_step`` puts the networks together as dmd_core.step runs them: resident (all weights, optimizer states, the EMA)
plus the larger of the two updates. The generator update peaks either inside G's own forward and backward (its
activations on the DM and regression batches, 2B samples, and its gradients) or while G's activations are held and
the other networks run: the real and fake scores without gradients, then the regression loss's networks (LPIPS, a
VAE decoder) with gradients to G's output. The fake-score update is one forward and backward of the fake score.

On several processes: with DDP (distill.sharding=none) each process also keeps DDP's gradient buckets, a second
copy of the trained gradients (Accelerate's DDP has no gradient_as_bucket_view); with FSDP (fsdp) the generator's
and the fake score's weights, gradients, optimizer states and EMA are split over the processes, and each FSDP unit's
weights are made whole while it runs (the largest unit, twice: the gather's buffer and the unsharded weights).
Optimizer states are 8 bytes per trained parameter (AdamW's two float32 moments) or, with bitsandbytes' 8-bit AdamW,
2 and a float32 scale per 256 values of each moment (tensors under 4,096 values keep float32 moments).
On the CPU (benchmarks/sd15_memory.py --tiny): within 1% of the measured peak for DDP on 2 gloo processes and for FSDP
under torch's fake process group; 2 gloo processes with FSDP measured 4-16% more (what gloo's collectives hold).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterable, Sequence

import numpy as np
import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .dmd import FakeScoreLoss, OneStep, SampleRNG, random_labels
from .lora import LoraSettings, add_lora, set_trainable

GIB = 2**30
# A teacher's probes run on fake tensors above either size (speed only: the same ops, the same bytes), and so do the
# regression loss's networks (LPIPS's VGG at 224 x 224: seconds per call on a CPU)
FAKE_ABOVE = 2**26  # bytes of the teacher's weights
FAKE_SAMPLE_ABOVE = 2**12  # values of one sample in model space (digits: 64; SD v1.5: 16,384)
ADAMW_BYTES = 8  # optimizer bytes per trainable parameter: AdamW's two float32 moments
ADAMW_8BIT_BYTES = 2  # bitsandbytes' 8-bit AdamW: two one-byte moments,
BNB_BLOCK = 256  # each with a float32 scale per block of this many values,
BNB_MIN_8BIT = 4096  # for tensors of at least this many values (smaller ones keep AdamW's float32 moments)


def optimizer_bytes(kind: str, params: int, small: int = 0) -> float:
    """Optimizer state bytes of ``params`` trained parameters, ``small`` of them in tensors below ``BNB_MIN_8BIT``
    values, for distill.optimizer ``kind`` (adamw, adamw8bit)."""
    if kind == "adamw8bit":
        return small * ADAMW_BYTES + (params - small) * (ADAMW_8BIT_BYTES + 2 * 4 / BNB_BLOCK)
    return params * ADAMW_BYTES


# ---------------------------------------------------------------- measuring one call


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages made by ops while active and not yet freed, after every op (``timeline``).

    A storage is counted once, when an op returns it first; views and in-place results (an output sharing an
    input's storage) are not new memory. It is uncounted when Python frees it (a weakref finalizer)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.timeline: list[int] = []
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes, for the live ones

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._freed, key)
        self.timeline.append(self.live)
        return out


@dataclasses.dataclass(frozen=True)
class Probe:
    """Live bytes after each op of one call on 2 and on 3 samples; ``forward_ops``: the ops before its backward."""

    two: np.ndarray
    three: np.ndarray
    forward_ops: int

    def at(self, batch: int) -> np.ndarray:
        return self.two + (batch - 2) * (self.three - self.two)

    def peak(self, batch: int) -> int:
        """The call's peak on ``batch`` samples."""
        return int(self.at(batch).max(initial=0))

    def kept(self, batch: int) -> int:
        """Live when the forward ends: what the backward will need (saved tensors, the output, cached casts)."""
        return int(self.at(batch)[self.forward_ops - 1]) if self.forward_ops else 0

    def end(self, batch: int) -> int:
        """Live after the call (still inside its autocast region): what stays for the rest of the update."""
        return int(self.at(batch)[-1]) if len(self.two) else 0


NO_PROBE = Probe(np.zeros(0), np.zeros(0), 0)


def probe(call: Callable[[int], torch.Tensor | None], modules: Sequence[torch.nn.Module], fake_mode=None, autocast: torch.dtype | None = None) -> Probe:
    """Run ``call(n)`` for n = 2 and 3 under ``LiveBytes``: one forward on n samples (its inputs made inside it)
    returning the loss to backpropagate, or None (no backward). ``modules``: where gradients are cleared after
    each run. ``fake_mode``: a FakeTensorMode the modules' parameters belong to; ``autocast``: the mixed
    precision dtype, entered around the forward and the backward, as the training step does (the CPU's autocast:
    its policy differs from CUDA's in a few ops, e.g. group norms run in float32 on a GPU)."""

    def run(n: int) -> tuple[np.ndarray, int]:
        tracker = LiveBytes()
        with ExitStack() as stack:
            stack.enter_context(fake_mode if fake_mode is not None else nullcontext())
            stack.enter_context(tracker)
            stack.enter_context(torch.autocast("cpu", dtype=autocast) if autocast else nullcontext())
            loss = call(n)
            forward_ops = len(tracker.timeline)
            if loss is not None:
                loss.backward()
            del loss
        for m in modules:
            for p in m.parameters():
                p.grad = None
        return np.asarray(tracker.timeline, dtype=np.int64), forward_ops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one or two samples: more threads only contend (10x slower on a busy machine)
    try:
        (two, f2), (three, f3) = run(2), run(3)
        if len(two) != len(three) or f2 != f3:  # a network's first call may run ops once (lazily made state): again
            two, f2 = run(2)
    finally:
        torch.set_num_threads(threads)
    if len(two) != len(three) or f2 != f3:  # not one op sequence: keep what both agree on, their kept bytes and peaks
        k2, k3 = two[f2 - 1] if f2 else 0, three[f3 - 1] if f3 else 0
        two, three, f2 = np.array([k2, two.max(initial=0)]), np.array([k3, three.max(initial=0)]), 1
    return Probe(two, three, f2)


# ---------------------------------------------------------------- modules on fake tensors


def tensor_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers (each tensor once), in their dtypes."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def trainable(module: torch.nn.Module) -> dict[str, int]:
    """Parameters and bytes of what trains in ``module`` (those that require gradients), and the parameters of it
    in tensors too small for 8-bit optimizer states: NetworkMemory's fields."""
    ps = [p for p in module.parameters() if p.requires_grad]
    return {"trainable_params": sum(p.numel() for p in ps), "trainable_bytes": sum(p.numel() * p.element_size() for p in ps),
            "small_params": sum(p.numel() for p in ps if p.numel() < BNB_MIN_8BIT)}  # fmt: skip


def on_fake_tensors(module: torch.nn.Module, mode) -> torch.nn.Module:
    """``module`` (on the meta device, or anywhere) with each parameter and buffer replaced, in place, by an empty
    fake CPU tensor of its shape and dtype: what a probe runs on. Replaced directly rather than by ``.to()``, which
    cannot swap fake parameters."""
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                with mode:
                    m._parameters[k] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None:
                with mode:
                    m._buffers[k] = torch.empty(b.shape, dtype=b.dtype)
    return module


@contextmanager
def quiet_diffusers():
    """diffusers' warnings off for a moment (its advice on casting a loaded model: distill casts the same way)."""
    from diffusers.utils import logging as d_logging

    verbosity = d_logging.get_verbosity()
    d_logging.set_verbosity_error()
    try:
        yield
    finally:
        d_logging.set_verbosity(verbosity)


def held_modules(fn: Callable) -> list[torch.nn.Module]:
    """The modules a function closes over (a layout's pixel decoder holds its VAE), for their weights' bytes."""
    cells = getattr(fn, "__closure__", None) or ()
    return [c.cell_contents for c in cells if isinstance(getattr(c, "cell_contents", None), torch.nn.Module)]


# ---------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class NetworkMemory:
    """One network on one device: weights (bytes), what trains (parameters, and their bytes: the gradients'),
    activations at its peak (bytes, gradients excluded), and its largest FSDP unit's weights (bytes: what one
    gather makes whole)."""

    name: str
    weights: int
    trainable_params: int = 0
    trainable_bytes: int = 0
    activations: int = 0
    unit: int = 0
    small_params: int = 0  # trained parameters in tensors below BNB_MIN_8BIT values


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """One training iteration's memory per device. ``phases``: each update's activations and gradients at its
    peak (bytes, per device); the iteration needs ``resident`` plus the largest phase. ``optimizer_kind``:
    distill.optimizer (``optimizer_bytes``); ``shards``: FSDP's processes, over which the trainable networks' weights, gradients and
    states are split; ``gathered``: FSDP's whole units in each phase (bytes)."""

    networks: tuple[NetworkMemory, ...]
    phases: dict[str, int]
    other: dict[str, int] = dataclasses.field(default_factory=dict)
    optimizer_kind: str = "adamw"
    shards: int = 1
    gathered: int = 0

    def weights(self, n: NetworkMemory) -> int:
        return n.weights if not n.trainable_params else math.ceil(n.weights / self.shards)

    def grads(self, n: NetworkMemory) -> int:
        return math.ceil(n.trainable_bytes / self.shards)

    def optimizer(self, n: NetworkMemory) -> int:
        return math.ceil(optimizer_bytes(self.optimizer_kind, n.trainable_params, n.small_params) / self.shards)

    @property
    def resident(self) -> int:
        """Held through the whole iteration: every weight, optimizer state and the rest (EMA, data)."""
        return sum(self.weights(n) + self.optimizer(n) for n in self.networks) + sum(self.other.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def total(self) -> int:
        """Predicted peak bytes per device: resident + the larger update."""
        return self.resident + max(self.phases.values(), default=0)


def gib(n: float) -> str:
    """Bytes in GiB (MiB below one GiB), as the table prints them."""
    return f"{n / 2**20:.1f} MiB" if n < GIB else f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def table(plan: StepMemory, free: tuple[int, str] | None = None) -> str:
    """The plan as a table: per network weights, gradients, optimizer states, activations; the total per device."""
    dash = lambda v: gib(v) if v else "-"  # noqa: E731
    rows = [("network", "weights", "grads", "optimizer", "activations")]
    rows += [(n.name, gib(plan.weights(n)), dash(plan.grads(n)), dash(plan.optimizer(n)), dash(n.activations)) for n in plan.networks]
    rows += [(name, gib(v), "-", "-", "-") for name, v in plan.other.items()]
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(width[0]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(r)) for r in rows]
    phase = plan.peak_phase
    lines.append(f"total per device: {gib(plan.total)} = resident {gib(plan.resident)} (weights, optimizer states"
                 f"{', ' + ', '.join(plan.other) if plan.other else ''}) + the {phase}'s activations and gradients at its peak "
                 f"{gib(plan.total - plan.resident)}" + (f" (FSDP's largest unit made whole, twice: {gib(plan.gathered)})" if plan.gathered else ""))  # fmt: skip
    if free is not None:
        have, where = free
        verdict = "fits" if plan.total <= have else "does not fit"
        lines.append(f"free memory ({where}): {gib(have)}: {verdict}")
    return "\n".join(lines)


def free_memory(device: str | torch.device) -> tuple[int, str]:
    """(bytes, description) of the memory a run on ``device`` can still take: a GPU's free memory
    (``torch.cuda.mem_get_info``), else the machine's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{torch.cuda.get_device_name(device)}, free"
    return psutil.virtual_memory().available, "this machine's available RAM"


# ---------------------------------------------------------------- one DMD iteration


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What decides a DMD iteration's memory (the distill settings of the same names)."""

    batch: int
    regression: bool = False  # a regression batch joins the generator's call: 2B samples through G
    distribution_matching: bool = True  # the real and fake scores run on the DM batch
    guidance_scale: float = 1.0
    mixed_precision: str = "no"  # "bf16" / "fp16": autocast
    gradient_checkpointing: bool = False
    frozen_dtype: torch.dtype = torch.float32
    generator_lora: LoraSettings | None = None
    fake_lora: LoraSettings | None = None
    ema: bool = False
    gan: bool = False
    accumulation: int = 1
    data_bytes_per_sample: int = 0  # a pair's bytes on the device (noise and image), read one step ahead
    optimizer: str = "adamw"  # "adamw8bit": bitsandbytes' 8-bit moments (optimizer_bytes)
    processes: int = 1
    sharding: str = "none"  # "fsdp": the generator and the fake score split over the processes; "none": DDP

    @property
    def autocast(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)

    @property
    def shards(self) -> int:
        return self.processes if self.sharding == "fsdp" else 1


Extras = Callable[[StepSettings], tuple[Callable | None, Sequence[torch.nn.Module]]]


class DMDProbes:
    """The probes of one teacher's DMD iteration, remembered by the settings each depends on, so that trying other
    settings runs only the probes they change. ``teacher``: the loaded teacher (moved to the meta device when its
    probes run on fake tensors); ``extras(settings)``: the regression loss as distill builds it when it holds
    networks (LPIPS, on decoded images through the VAE), else None, and the frozen modules distill keeps besides
    the real score (a latent teacher's VAE, LPIPS). ``fake``: force fake tensors (or real ones); default by size."""

    def __init__(self, teacher: torch.nn.Module, extras: Extras | None = None, fake: bool | None = None,
                 units: Callable[[torch.nn.Module], list[torch.nn.Module]] = lambda net: []):  # fmt: skip
        from torch._subclasses.fake_tensor import FakeTensorMode

        large = tensor_bytes([teacher]) > FAKE_ABOVE or math.prod(teacher.param.image_shape) > FAKE_SAMPLE_ABOVE
        self.fake = large if fake is None else fake
        # real tensors (a prompt table, a VAE's and LPIPS's weights) meet fake ones: converted as they are used
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        if self.fake:
            teacher = teacher.to("meta")
        self.teacher, self.extras, self.units = teacher, extras or (lambda s: (None, [])), units
        self.shape = tuple(teacher.param.image_shape)
        self.cache: dict[tuple, tuple[Probe, NetworkMemory]] = {}

    def network(self, trains: bool, ckpt: bool, lora: LoraSettings | None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """A copy of the teacher as distill makes it: trainable (all of it, or its adapter) or frozen in ``dtype``."""
        net = copy.deepcopy(self.teacher)
        if dtype != torch.float32:
            with quiet_diffusers():  # its advice on casting a loaded model: distill casts the frozen score the same way
                net.unet.to(dtype)
        if ckpt:
            net.unet.enable_gradient_checkpointing()
        if lora is not None:
            add_lora(net.unet, lora, 0)
        if trains:
            set_trainable(net, net.unet)
            net.train()
        else:
            net.requires_grad_(False).eval()
        return on_fake_tensors(net, self.mode) if self.fake else net

    def largest_unit(self, den: torch.nn.Module) -> int:
        """Bytes of the parameters of the network's largest FSDP unit (``units``; the rest of the network is one more)."""
        units = self.units(den.unet)
        inside = {id(p) for u in units for p in u.parameters()}
        rest = sum(p.numel() * p.element_size() for p in den.unet.parameters() if id(p) not in inside)
        return max([rest, *(sum(p.numel() * p.element_size() for p in u.parameters()) for u in units)])

    def draws(self, n: int, stream: int) -> tuple[SampleRNG, torch.Tensor, torch.Tensor | None]:
        rng = SampleRNG(0, stream, 0, range(n), "cpu")
        return rng, rng.randn(self.shape), random_labels(rng, self.teacher.num_classes)

    def _probe(self, key: tuple, build: Callable[[], tuple[Callable, list, NetworkMemory]], s: StepSettings, fake: bool | None = None) -> tuple[Probe, NetworkMemory]:
        """The probe of ``key`` (the settings it depends on) under ``s``'s autocast, run once."""
        key = (*key, s.autocast)
        if key not in self.cache:
            call, modules, memory = build()
            self.cache[key] = (probe(call, modules, self.mode if (self.fake if fake is None else fake) else None, s.autocast), memory)
        return self.cache[key]

    def generator(self, s: StepSettings) -> tuple[Probe, NetworkMemory]:
        """G's forward and backward (its loss's own tensors, a few per sample, are left out)."""

        def build():
            gen = self.network(True, s.gradient_checkpointing, s.generator_lora)
            one_step = OneStep.of(gen)

            def call(n):
                _, z, labels = self.draws(n, 0)
                return one_step(gen, z, labels).float().square().mean()

            return call, [gen], NetworkMemory("generator", tensor_bytes([gen]), **trainable(gen), unit=self.largest_unit(gen))

        return self._probe(("generator", s.gradient_checkpointing, s.generator_lora), build, s)

    def fake_update(self, s: StepSettings) -> tuple[Probe, NetworkMemory]:
        """The fake score's denoising loss, forward and backward."""

        def build():
            fake = self.network(True, s.gradient_checkpointing, s.fake_lora)
            loss = FakeScoreLoss.for_teacher(self.teacher)

            def call(n):
                rng, x, labels = self.draws(n, 10)
                return loss(fake, x, labels, rng)

            return call, [fake], NetworkMemory("fake score", tensor_bytes([fake]), **trainable(fake), unit=self.largest_unit(fake))

        return self._probe(("fake update", s.gradient_checkpointing, s.fake_lora), build, s)

    def frozen_real(self, s: StepSettings) -> NetworkMemory:
        """The real score's weights in distill.frozen_dtype (its floating-point tensors cast, as ``.to(dtype)`` does)."""
        size = lambda t: t.numel() * (s.frozen_dtype.itemsize if t.is_floating_point() else t.element_size())  # noqa: E731
        return NetworkMemory("real score (frozen)", sum(size(t) for t in (*self.teacher.unet.parameters(), *self.teacher.unet.buffers())))

    def real_scores(self, s: StepSettings) -> tuple[Probe, NetworkMemory]:
        """The real score without gradients, guided (CFG runs it on the conditional and unconditional batch)."""

        def build():
            real = self.network(False, False, None, s.frozen_dtype)
            level = OneStep.of(real).level

            def call(n):
                _, x, labels = self.draws(n, 1)
                with torch.no_grad():
                    real(x, level, labels, s.guidance_scale)

            return call, [], NetworkMemory("real score (frozen)", tensor_bytes([real]))

        return self._probe(("real scores", s.frozen_dtype, s.guidance_scale), build, s)

    def fake_scores(self, s: StepSettings) -> tuple[Probe, NetworkMemory]:
        """The fake score without gradients, in the generator's update."""

        def build():
            fake = self.network(True, False, s.fake_lora)
            level = OneStep.of(fake).level

            def call(n):
                _, x, labels = self.draws(n, 1)
                with torch.no_grad():
                    fake(x, level, labels)

            return call, [fake], NetworkMemory("fake score", 0)

        return self._probe(("fake scores", s.fake_lora), build, s)

    def regression(self, s: StepSettings) -> tuple[Probe, NetworkMemory]:
        """The regression loss's forward and backward to G's output, through its frozen networks."""
        loss, frozen = self.extras(s)
        memory = NetworkMemory(", ".join(type(m).__name__ for m in frozen) + " (frozen)", tensor_bytes(frozen))
        if loss is None or not s.regression:
            return NO_PROBE, memory

        def build():
            def call(n):
                _, x, _ = self.draws(n, 2)
                _, y, _ = self.draws(n, 3)
                return loss(x.requires_grad_(), y)

            return call, [], memory

        return self._probe(("regression", s.gradient_checkpointing, s.frozen_dtype), build, s, fake=True)


def dmd_step(probes: DMDProbes, s: StepSettings) -> StepMemory:
    """One DMD iteration (dmd_core.step: a generator update, then the fake score's) at ``s``'s batch."""
    B, gen_batch = s.batch, s.batch * (2 if s.regression else 1)
    g_probe, g = probes.generator(s)
    f_probe, f = probes.fake_update(s)
    r_probe, r = probes.real_scores(s) if s.distribution_matching else (NO_PROBE, probes.frozen_real(s))
    fs_probe = probes.fake_scores(s)[0] if s.distribution_matching else NO_PROBE
    reg_probe, reg = probes.regression(s)
    # DMD2's GAN term: in G's update the fake score runs forward and backward on G's samples (its weights frozen);
    # in its own update, on them and on as many real images: predicted as its denoising call on 1 and 3 batches
    gan = max(f_probe.peak(B) - f.trainable_bytes, 0) if s.gan else 0
    fake_batch = B * (3 if s.gan else 1)
    scores = max(r_probe.peak(B), fs_probe.peak(B))
    # FSDP: a network's gradients are split once its backward has made them (taken off the peak whole: the probe's
    # peak is at the backward's end, or the part made by then is smaller), and each unit's weights are made whole
    # (the gather's buffer and the unsharded weights) while it runs: the largest, twice
    sharded = lambda n: math.ceil(n.trainable_bytes / s.shards) - n.trainable_bytes  # noqa: E731
    gathered = 2 * max(g.unit, f.unit) if s.shards > 1 else 0
    held = g_probe.kept(gen_batch) + (g.trainable_bytes + sharded(g) if s.accumulation > 1 else 0)  # micro-batch 2 on: gradients exist
    generator_phase = gathered + max(g_probe.peak(gen_batch) + sharded(g) + fs_probe.end(B), held + max(scores, reg_probe.peak(B) + gan))
    fake_phase = gathered + f_probe.peak(fake_batch) + sharded(f)
    nets = (
        dataclasses.replace(g, activations=max(g_probe.peak(gen_batch) - g.trainable_bytes, 0)),
        dataclasses.replace(f, activations=max(f_probe.peak(fake_batch) - f.trainable_bytes, fs_probe.peak(B))),
        dataclasses.replace(r, activations=r_probe.peak(B)),
        dataclasses.replace(reg, activations=reg_probe.peak(B)),
    )
    other = {}
    if s.ema:  # float32, of what trains; under FSDP each process keeps its shard's
        other["EMA of the generator"] = math.ceil(g.trainable_params * 4 / s.shards)
    if s.data_bytes_per_sample:  # this step's pairs and the next step's, read ahead
        other["pairs (this step's and the next)"] = 2 * s.accumulation * B * s.data_bytes_per_sample
    if s.processes > 1 and s.sharding == "none":
        # DDP (Accelerate's, without gradient_as_bucket_view) allocates its buckets, a flat copy of the trainable
        # gradients, when it wraps each network, and keeps them
        other["DDP's gradient buckets"] = g.trainable_bytes + f.trainable_bytes
    nets = tuple(n for n in nets if n.weights or n.activations)
    phases = {"generator update": generator_phase, "fake-score update": fake_phase}
    return StepMemory(nets, phases, other, s.optimizer, s.shards, gathered)


def largest_batch(plan_at: Callable[[int], StepMemory], have: int, limit: int) -> int:
    """The largest batch in [1, limit] whose plan fits in ``have`` bytes (0: none); the plan grows with the batch."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan_at(mid).total <= have else (lo, mid - 1)
    return lo

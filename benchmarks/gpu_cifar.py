"""CIFAR-size GPU check (``gpu_check.py --model cifar``): a 35.75 M-parameter class-conditional EDM teacher.

google/ddpm-cifar10-32's UNet layout plus 11 class embeddings, random weights (the numbers are speeds,
not quality). Reports, in one run: generate images/s per precision with the stored images' difference
to an fp32 solve; the generate stage against a bare solver loop; one DMD iteration against its compute
floor (its network passes alone) in fp32, bf16 and bf16 compiled, with achieved TFLOP/s (the UNet's
FLOPs counted once with torch.utils.flop_counter); one-step against Heun-18 images/s.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from diffusers import UNet2DModel

from dmd_core.denoisers import EDMDenoiser, Parametrization
from dmd_core.dmd import OneStep, SampleRNG
from dmd_core.loading import save_denoiser
from dmd_core.precision import at_precision
from dmd_core.shards import sample_labels, sample_noise
from dmd_core.solvers import teacher_sampler
from stages import chain, distill
from stages.config import load_config

SHAPE = (3, 32, 32)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# SMOKE: a small layout and few samples, to check this script on a CPU before spending GPU time on it
SMOKE = not torch.cuda.is_available()
CHANNELS = (16, 32, 32, 32) if SMOKE else (128, 256, 256, 256)
N = {"fp32": 16, "tf32": 32, "bf16": 32, "fp16": 16} if SMOKE else {"fp32": 1024, "tf32": 2048, "bf16": 2048, "fp16": 1024}


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def cifar_unet_config(channels: tuple[int, ...] = (128, 256, 256, 256), groups: int = 32) -> dict:
    """google/ddpm-cifar10-32's UNet2DModel layout with 11 class embeddings (35.75 M parameters as given)."""
    return dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, num_class_embeds=11, norm_num_groups=groups,
    )  # fmt: skip


def cifar_teacher(path: Path) -> tuple[Path, int]:
    """The teacher directory and its parameter count."""
    torch.manual_seed(0)
    unet = UNet2DModel(**cifar_unet_config(CHANNELS, 8 if SMOKE else 32))
    param = Parametrization(kind="edm", num_classes=10, null_class=10, image_shape=SHAPE)
    save_denoiser(EDMDenoiser(unet, param), path)
    return path, sum(p.numel() for p in unet.parameters())


def sync_time(fn, iters: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def host_syncs(fn) -> dict | None:
    """How many times one call of ``fn`` makes the host wait for the GPU, and where (CUDA's sync debug mode
    warns at each)."""
    if DEV != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        sites = warning_sites(fn, "synchroniz")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return {"count": len(sites), "sites": sorted(set(sites))}


def warning_sites(fn, text: str) -> list[str]:
    """``wait_site`` of every warning containing ``text`` while ``fn`` runs. A warning names only its
    innermost Python frame, often inside torch; the stack when it is shown names the project line too."""
    import warnings

    sites = []

    def show(message, category, filename, lineno, file=None, line=None):
        if text in str(message):
            stack = traceback.extract_stack()[:-1]  # without this function
            while Path(stack[-1].filename) == Path(warnings.__file__):  # nor the warnings module's frames
                stack.pop()
            sites.append(wait_site(stack))

    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        fn()
    return sites


def wait_site(stack: list[traceback.FrameSummary]) -> str:
    """``project_file:line (function)``, the innermost frame outside the installed packages, then the
    innermost frame itself where it lies elsewhere (``step.py:58 (generator_update) via utils/clip_grad.py:52 (g)``)."""
    here = Path(__file__).resolve().parent.parent
    inside = [f for f in stack if Path(f.filename).resolve().is_relative_to(here) and "site-packages" not in f.filename]
    last = stack[-1]
    short = lambda f: f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} ({f.name})"  # noqa: E731
    if not inside:
        return short(last)
    own = inside[-1]
    return short(own) if own is last else f"{short(own)} via {short(last)}"


def unet_flops(den, batch: int, backward: bool) -> float:
    """FLOPs of one denoiser call (and its backward, weights included) at this batch, counted once in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *SHAPE, device=DEV)
    labels = torch.zeros(batch, dtype=torch.long, device=DEV)
    with FlopCounterMode(display=False) as counter:
        out = den(x, torch.full((batch,), 1.0, device=DEV, dtype=torch.float64), labels)
        if backward:
            out.float().square().mean().backward()
    return counter.get_total_flops()


def generate_config(cfg_args: list[str], store: str, n: int, precision: str, seed: int):
    """The benchmark's generate stage: ``n`` images at ``precision`` from noise seed ``seed``."""
    return load_config(None, [*cfg_args, f"store={store}", f"generate.num_samples={n}", f"generate.precision={precision}", f"generate.seed={seed}"])


def generate_check(cfg_args: list[str], store: str, res: dict, sizes: dict[str, int] | None = None) -> None:
    """The stage per precision (images/s, its recorded error) and, for tf32 and bf16, a bare solver loop on the
    same batches; the stage runs a second time on new noise (another seed), warm, as the bare loop is.

    A third, warm run of one batch splits the warm stage's time into a fixed cost per run and a cost per
    image: t(n) = fixed + n c. ``stage_over_bare_per_image`` (c against the bare loop's) is what the stage
    adds per batch, the ratio a run of real size approaches."""
    batch = load_config(None, [*cfg_args, f"store={store}"]).generate.batch_size
    for precision, n in (sizes or N).items():
        if precision == "fp16" and DEV != "cuda":
            continue
        row: dict = {"images": n}
        seconds = {}
        runs = (("cold", 0, n), ("warm", 1, n), ("one_batch", 2, min(n, batch))) if precision in ("tf32", "bf16") else (("cold", 0, n),)
        for run, seed, count in runs:
            cfg = generate_config(cfg_args, store, count, precision, seed)
            t0 = time.perf_counter()
            m = chain.run(cfg, "generate", progress=False).manifest
            seconds[run] = (count, time.perf_counter() - t0)
            row[f"stage_images_per_s_{run}"] = round(count / seconds[run][1], 1)
            if run != "one_batch":
                row["error_vs_fp32"] = m.info["precision_error"]
        if precision in ("tf32", "bf16"):
            den = chain.resolve_teacher(cfg).load(DEV)
            sampler = at_precision(teacher_sampler(den, "heun", cfg.generate.steps)[0], precision, DEV)
            B = cfg.generate.batch_size
            sync()
            t0 = time.perf_counter()
            for s in range(0, n, B):
                idx = range(s, min(s + B, n))
                z = sample_noise(cfg.generate.seed, idx, SHAPE).to(DEV)
                sampler(z, sample_labels(idx, 10).to(DEV)).float().cpu()
            sync()
            bare = n / (time.perf_counter() - t0)
            row.update(bare_images_per_s=round(bare, 1), stage_over_bare_warm=round(bare / row["stage_images_per_s_warm"], 3),
                       stage_over_bare_cold=round(bare / row["stage_images_per_s_cold"], 3))  # fmt: skip
            (n1, t1), (n2, t2) = seconds["one_batch"], seconds["warm"]
            if n2 > n1:
                per_image = (t2 - t1) / (n2 - n1)
                row.update(stage_fixed_s=round(t1 - n1 * per_image, 3), stage_over_bare_per_image=round(per_image * bare, 3))
        res[precision] = row
        print(json.dumps({f"generate_{precision}": row}), flush=True)


def floor_flops(teacher: Path, batch: int, guided: bool) -> float:
    """The floor's FLOPs: generator fwd+bwd on 2B (DM + regression), real fwd (x2 with guidance), fake fwd, fake fwd+bwd."""
    from dmd_core import load_denoiser

    den = load_denoiser(teacher, DEV).requires_grad_(True)
    return unet_flops(den, 2 * batch, True) + unet_flops(den, batch, False) * (2 if guided else 1) + unet_flops(den, batch, False) + unet_flops(den, batch, True)


def bench_trainer(cfg_args: list[str], store: str, batch: int, mp: str, comp: bool | str):
    """A distill Trainer on the CIFAR teacher's tf32 pairs (generated once, then cached), at step 0.
    ``comp``: False (eager), True (``distill.compile``) or a torch.compile mode the benchmark applies itself."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg = load_config(None, [*cfg_args, f"store={store}", f"generate.num_samples={N['tf32']}", "generate.precision=tf32", f"distill.batch_size={batch}",
                             f"distill.mixed_precision={mp}", f"distill.compile={str(comp is True).lower()}"])  # fmt: skip
    cfg.distill.pairs = None
    chain.run(cfg, "generate", progress=False)
    plan = chain.plan(cfg, "distill")
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=mp, cpu=DEV == "cpu")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # training: PyTorch's defaults (TF32 convolutions)
    tr = distill.Trainer(cfg, plan, acc)
    if isinstance(comp, str):  # an experiment before it is a setting: distill.compile's networks, another mode
        for net in (tr.gen, tr.fake):
            tr.unwrap(net).unet.compile(dynamic=False, mode=comp)
    tr.restart_data(0)
    return tr, acc, cfg, plan


# bf16_cudagraphs: distill.compile's graphs replayed as CUDA graphs (mode "reduce-overhead"), one launch per
# graph instead of one per kernel: the experiment for the compiled step's time beyond its floor on the H100
MODES = {"fp32": ("no", False), "bf16": ("bf16", False), "bf16_compiled": ("bf16", True), "bf16_cudagraphs": ("bf16", "reduce-overhead")}


def step_begin(comp: bool | str):
    """What runs before each step: CUDA graph trees free the previous step's graph outputs on the mark."""
    if comp == "reduce-overhead":
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def allocator_counts() -> dict[str, int]:
    """The caching allocator's device calls so far: in a warm step a cudaFree waits for the device, and a
    cudaMalloc costs the host far more than a cached block."""
    if DEV != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")}


PHASE = "dmd."  # the Trainer's record_function names; on a GPU each also appears as a device-side range


def phase_table(prof, steps: int) -> dict | str:
    """The step's phases, ms per step: ``host`` the time the Python thread spent inside each, ``device_span``
    the time from its first kernel's start to its last kernel's end (CUDA only)."""
    from torch.autograd import DeviceType

    try:
        events = [e for e in prof.events() if e.name.startswith(PHASE)]
    except Exception as e:  # the other tables still stand
        return f"{type(e).__name__}: {e}"
    table: dict = {}
    for e in events:
        side = "device_span_ms" if e.device_type == DeviceType.CUDA else "host_ms"
        row = table.setdefault(e.name, {"host_ms": 0.0, "device_span_ms": 0.0})
        row[side] += (e.time_range.end - e.time_range.start) / 1e3 / steps
    return {k: {side: round(v, 2) for side, v in row.items()} for k, row in table.items()}


def profiled(fn, steps: int) -> dict:
    """``fn`` (``steps`` steps of work, warm) under torch.profiler: the Trainer's phases, kernel-busy time
    against wall time with the idle gaps, and the top ops by device and by host time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])) as prof:
        fn()
        sync()
    return {"phases": phase_table(prof, steps), "timeline": device_timeline(prof, steps),
            "top_device_ops": top_ops(prof, steps, "cuda", 12) if DEV == "cuda" else None, "top_host_ops": top_ops(prof, steps, "cpu", 12)}  # fmt: skip


def iteration_check(cfg_args: list[str], store: str, res: dict, batch: int, iters: int, modes: tuple[str, ...], profile: bool = False) -> None:
    """One DMD iteration against its floor, per mode of MODES; with ``profile``, 3 more steps under torch.profiler."""
    flops = None

    for name in modes:
        mp, comp = MODES[name]
        tr, acc, cfg, plan = bench_trainer(cfg_args, store, batch, mp, comp)
        begin = step_begin(comp)
        if flops is None:
            flops = floor_flops(Path(plan.inputs["teacher"]), batch, cfg.distill.guidance_scale != 1)
        t0 = time.perf_counter()
        begin()
        tr.step(0)
        sync()
        first_s = time.perf_counter() - t0
        B = batch
        z_ref, y_ref, labels_ref = (t.to(DEV) if t is not None else None for t in next(tr.data))
        rng = SampleRNG(0, 0, 0, range(B), DEV)
        z, labels = rng.randn(tr.shape), rng.randint(0, 10)
        x_t = torch.randn(B, *tr.shape, device=DEV)
        sigma = torch.full((B,), 1.0, dtype=torch.float64, device=DEV)

        def gen_fwd_bwd():
            begin()
            with acc.autocast():
                x = tr.one_step(tr.gen, torch.cat([z, z_ref]), torch.cat([labels, labels_ref]))
            x.float().square().mean().backward()

        def real_fwd():
            begin()
            with torch.no_grad(), acc.autocast():
                tr.real(x_t, sigma, labels, cfg.distill.guidance_scale)

        def fake_fwd():
            begin()
            with torch.no_grad(), acc.autocast():
                tr.fake(x_t, sigma, labels)

        def fake_fwd_bwd():
            begin()
            with acc.autocast():
                out = tr.fake(x_t, sigma, labels)
            out.float().square().mean().backward()

        step = [1]

        def iteration():
            begin()
            tr.step(step[0])
            step[0] += 1

        parts = {"generator_fwd_bwd": gen_fwd_bwd, "real_fwd": real_fwd, "fake_fwd": fake_fwd, "fake_fwd_bwd": fake_fwd_bwd}
        floors, its, allocs = [], [], []
        for _ in range(2):  # interleaved
            floors.append(sum(sync_time(fn, iters) for fn in parts.values()))
            before = allocator_counts()
            its.append(sync_time(iteration, iters))  # iters + 1 iterations, the first a warm-up
            allocs.append({k: v - before[k] for k, v in allocator_counts().items()})
        floor, it = statistics.median(floors), statistics.median(its)
        allocator = {k: round(sum(a[k] for a in allocs) / (2 * (iters + 1)), 1) for k in allocs[0]}
        syncs = host_syncs(iteration)
        if profile:
            profile_row = profiled(lambda: [iteration() for _ in range(3)], 3)
        row = {"batch": B, "iteration_s": round(it, 4), "floor_s": round(floor, 4), "iteration_over_floor": round(it / floor, 3),
               "floor_tflops": round(flops / floor / 1e12, 1), "iteration_tflops": round(flops / it / 1e12, 1),
               "first_step_s": round(first_s, 1), "generator_samples_per_s": round(B / it, 1), "host_syncs_per_iteration": syncs,
               "allocator_calls_per_iteration": allocator or None}  # fmt: skip
        if profile:
            row["profile"] = profile_row
        res[name] = row
        print(json.dumps({f"iteration_{name}": row}), flush=True)
        tr = None  # frees its networks before the next mode
        if DEV == "cuda":
            torch.cuda.empty_cache()
    for name, key in (("bf16_compiled", "compiled_speedup"), ("bf16_cudagraphs", "cudagraphs_speedup")):
        if "bf16" in res and name in res:
            res[key] = round(res["bf16"]["iteration_s"] / res[name]["iteration_s"], 3)


def device_timeline(prof, steps: int) -> dict | str | None:
    """Per step: the wall time of the profiled window, the time some kernel ran (union of kernel intervals),
    and the idle gaps over 0.2 ms with the top-level host ops (or ops directly inside a phase) that began
    inside each: what the GPU waited for."""
    from torch.autograd import DeviceType

    try:
        events = list(prof.events())
    except Exception as e:  # the tables above still stand
        return f"{type(e).__name__}: {e}"
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(PHASE))
    if not kernels:
        return None
    host = sorted((e.time_range.start, e.name) for e in events if e.device_type == DeviceType.CPU and (e.cpu_parent is None or e.cpu_parent.name.startswith(PHASE)))
    start, end = min(kernels[0][0], host[0][0]), kernels[-1][1]
    busy, gaps, cur_s, cur_e, prev = 0.0, [], kernels[0][0], kernels[0][1], kernels[0][2]
    for s, e, name in kernels[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e > 200:
                began = [n for t, n in host if cur_e <= t < s]
                gaps.append({"us": round(s - cur_e), "after_kernel": prev[:60], "host_ops_began": sorted(set(began))[:8]})
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
        prev = name
    busy += cur_e - cur_s
    gaps.sort(key=lambda g: -g["us"])
    return {"wall_ms_per_step": round((end - start) / 1e3 / steps, 2), "kernel_busy_ms_per_step": round(busy / 1e3 / steps, 2),
            "idle_gaps_over_0.2ms_per_step": round(len(gaps) / steps, 1), "idle_in_gaps_ms_per_step": round(sum(g["us"] for g in gaps) / 1e3 / steps, 2),
            "largest_gaps": gaps[:10]}  # fmt: skip


def top_ops(prof, steps: int, key: str, n: int) -> list[dict]:
    """The ``n`` ops with most self time on ``key`` ("cuda" or "cpu"), in ms per step."""
    attr = "self_device_time_total" if key == "cuda" else "self_cpu_time_total"
    rows = sorted((r for r in prof.key_averages() if not r.key.startswith(PHASE)), key=lambda r: -getattr(r, attr))[:n]
    return [{"op": r.key[:80], "ms_per_step": round(getattr(r, attr) / 1e3 / steps, 3), "calls_per_step": round(r.count / steps, 1)} for r in rows]


def profile_check(cfg_args: list[str], store: str, res: dict, batch: int, steps: int = 3) -> None:
    """torch.profiler over ``steps`` warm bf16 DMD iterations and a warm bf16 generate stage: where the time
    beyond the network passes goes."""
    tr, _, _, _ = bench_trainer(cfg_args, store, batch, "bf16", False)
    for i in range(3):  # warm: cuDNN autotuning, allocator
        tr.step(i)
    res["iteration_bf16"] = profiled(lambda: [tr.step(i) for i in range(3, 3 + steps)], steps)
    tr = None  # frees its networks before generate loads the teacher
    n = N["bf16"] // 2
    chain.run(generate_config(cfg_args, store, n, "bf16", seed=2), "generate", progress=False).manifest  # warms the stage up
    cfg = generate_config(cfg_args, store, n, "bf16", seed=3)  # new noise: not a cache hit
    batches = -(-n // cfg.generate.batch_size)
    res["generate_bf16"] = {"images": n, "batches": batches, **profiled(lambda: chain.run(cfg, "generate", progress=False).manifest, batches)}


@torch.no_grad()
def one_step_vs_teacher(teacher: Path, res: dict, batch: int = 256) -> None:
    from dmd_core import load_denoiser

    den = load_denoiser(teacher, DEV)
    idx = range(batch)
    z, labels = sample_noise(0, idx, SHAPE).to(DEV), sample_labels(idx, 10).to(DEV)
    for precision in ("tf32", "bf16"):
        heun = at_precision(teacher_sampler(den, "heun", 18)[0], precision, DEV)
        one = at_precision(lambda: OneStep.of(den)(den, z, labels), precision, DEV)
        t_one, t_heun = sync_time(one, 20), sync_time(lambda: heun(z, labels), 2)
        res[precision] = {"batch": batch, "one_step_images_per_s": round(batch / t_one, 1), "heun18_images_per_s": round(batch / t_heun, 1),
                          "speedup": round(t_heun / t_one, 1)}  # fmt: skip


PARTS = ("generate", "iteration", "iteration-eager", "iteration-bf16", "iteration-cudagraphs", "profile", "one_step")


def cifar_check(res: dict, parts: list[str] = ["generate", "iteration", "one_step"], generate_samples: int | None = None,
                batch: int = 128, iters: int = 5, save=lambda res: None) -> None:  # fmt: skip
    """The parts named (PARTS), each in its own entry of ``res``, ``save(res)`` after each; one failing part
    keeps the others' numbers."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown --parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if SMOKE:
        batch, iters = 4, 1
        generate_samples = generate_samples and min(generate_samples, 32)
    root = Path(tempfile.mkdtemp(prefix="dmd-cifar-"))
    teacher, params = cifar_teacher(root / "teacher")
    res["teacher_parameters"] = params
    cfg_args = [f"teacher.path={teacher}", "generate.batch_size=1024", "generate.shard_size=1024",
                "distill.regression_loss=pseudo_huber", "distill.num_workers=4"]  # fmt: skip
    store = str(root / "store")
    sizes = {"tf32": generate_samples, "bf16": generate_samples} if generate_samples else None
    run = {
        "generate": lambda r: generate_check(cfg_args, store, r, sizes),
        "iteration": lambda r: iteration_check(cfg_args, store, r, batch, iters, ("fp32", "bf16", "bf16_compiled")),
        "iteration-eager": lambda r: iteration_check(cfg_args, store, r, batch, iters, ("fp32", "bf16")),
        "iteration-bf16": lambda r: iteration_check(cfg_args, store, r, batch, iters, ("bf16", "bf16_compiled"), profile=True),
        "iteration-cudagraphs": lambda r: iteration_check(cfg_args, store, r, batch, iters, ("bf16", "bf16_cudagraphs"), profile=True),
        "profile": lambda r: profile_check(cfg_args, store, r, batch),
        "one_step": lambda r: one_step_vs_teacher(teacher, r),
    }
    for name in parts:
        res[name] = {}
        t0 = time.perf_counter()
        try:
            run[name](res[name])
        except Exception as e:  # one part failing must not lose the others' numbers
            import traceback

            traceback.print_exc()
            res[name]["error"] = f"{type(e).__name__}: {e}"
        res[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: res[name]}), flush=True)
        save(res)

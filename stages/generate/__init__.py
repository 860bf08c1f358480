"""Stage ``generate``: the teacher's ODE solutions y for seeded noise z, as WebDataset pair shards.

Output ``<store>/generate/<key>/``: ``pairs-%06d.tar`` shards, a ``.sha256`` beside each (for resume
before the manifest exists), ``prompts.bin`` + ``prompt_offsets.npy`` (text-to-image teachers: the
prompts that the pairs' ``cls.txt`` index, copied from their embeddings output, ``stages/prompt_rows.py``),
``config.yaml`` (resolved pipeline config) and ``manifest.json`` (last).
Under ``accelerate launch`` rank r writes shards i = r (mod world); shards are byte-identical whatever
the process count, since sample i's noise depends only on (seed, i).
"""

from __future__ import annotations

import dataclasses
from array import array
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dmd_core.denoisers import Denoiser
from dmd_core.errors import InputError
from dmd_core.faults import fault_point
from dmd_core.precision import at_precision, difference
from dmd_core.shards import read_pairs, sample_labels, sample_noise, shard_name, shard_ranges, shard_sizes, write_shard
from dmd_core.solvers import check_solver, teacher_sampler
from dmd_core.text import MAX_PROMPT_CHARS, iter_prompts
from dmd_core.transfer import HostCopy, to_device

from ..checks import check_guidance, check_precision, check_prompt_file, check_prompts
from ..config import GenerateConfig, PipelineConfig, dump_config, load_config
from ..contract import PROMPT_TEXTS, Manifest, Plan, StageOutput, Teacher, file_entry, spec, stage_manifest
from ..files import Timer, copy_atomic, sha256_file, size_text, tmp_sibling, write_text_atomic
from ..launch import launch_plan
from .partitions import partition_shards, shard_files, take_all_shards
from ..progress import progress_bar
from ..prompt_rows import Spread, plan_rows
from ..store import open_store, remember_hashes, work_hashes

STAGE = "generate"
SPEC = spec(STAGE)
log = logging.getLogger("dmd")


def check(cfg: PipelineConfig, teacher: Teacher) -> None:
    """Solver, guidance and prompts against the teacher, and room in the store: before any stage computes."""
    g = cfg.generate
    check_prompts(teacher, g.prompts, "generate")
    if g.prompts:  # a bad file fails here, before anything is written
        check_prompt_file(open_store(cfg.store), g.prompts, g.prompt_column, STAGE)
    check_guidance("generate", g.guidance_scale, teacher)
    check_solver(g.solver, teacher.param.kind)
    check_precision("generate", g.precision)
    num_shards = len(shard_ranges(g.num_samples, g.shard_size))
    if g.partitions > num_shards:  # an empty partition would still take a worker
        raise InputError(
            f"generate.partitions={g.partitions} is more than the {num_shards} shards of generate.num_samples={g.num_samples} "
            f"in shards of generate.shard_size={g.shard_size}. Fix: at most {num_shards} partitions, or a smaller shard_size."
        )
    check_room(cfg, teacher)


CHECKSUM_BYTES = 65  # a shard's .sha256 file: 64 hex digits and a newline


def pairs_bytes(g: GenerateConfig, teacher: Teacher, prompt_sizes: list[int] | None = None) -> int:
    """The bytes of the shards and their checksum files that ``g`` writes, exactly (``shard_sizes``);
    ``prompt_sizes``: the UTF-8 bytes of each prompt of a text-to-image teacher."""
    sizes = shard_sizes(g.num_samples, g.shard_size, teacher.image_shape, g.dtype, teacher.param.num_classes > 0, prompt_sizes)
    return int(sizes.sum()) + len(sizes) * CHECKSUM_BYTES


def check_room(cfg: PipelineConfig, teacher: Teacher) -> None:
    """Refuse a run whose pairs cannot fit on the store's disk (a cached or partly built output needs less: not counted)."""
    g = cfg.generate
    store = open_store(cfg.store)
    if store.has_outputs(STAGE):
        return
    free = store.free_bytes()
    # Prompts of one block each are the least a text-to-image run writes; the file's own lengths are read
    # only when the room lies between that and the most (every prompt of MAX_PROMPT_CHARS 4-byte characters).
    need = pairs_bytes(g, teacher, [1] if teacher.takes_prompts else None)
    if teacher.takes_prompts and need <= free < pairs_bytes(g, teacher, [4 * MAX_PROMPT_CHARS]):
        need = pairs_bytes(g, teacher, array("q", (len(q.encode()) for q in iter_prompts(g.prompts, g.prompt_column))))
    if need > free:
        shown_need, shown_free = size_text(need), size_text(free)
        if shown_need == shown_free:  # a near miss: the bytes themselves
            shown_need, shown_free = f"{need:,} bytes", f"{free:,} bytes"
        raise InputError(
            f"generate.num_samples={g.num_samples} needs {shown_need} of pairs; the store's disk has {shown_free} free. "
            "Fix: lower generate.num_samples or point store at a larger disk."
        )


def plan(cfg: PipelineConfig, teacher: Teacher, upstream: StageOutput | None = None) -> Plan:
    """Key = (config, teacher digest, prompt file digest); ``check`` ran first."""
    g = cfg.generate
    store = open_store(cfg.store)
    up, inputs = {"teacher": teacher.digest}, {"teacher": str(teacher.path)}
    if g.prompts:
        up["prompts"], inputs["prompts"] = f"{store.digest(g.prompts)}:{g.prompt_column}", g.prompts
    if g.precision != "fp32":  # in the key only when used: a key without it is the key of the same fp32 run
        up["precision"] = g.precision
    if g.prompts and g.prompt_dtype != "float32":  # the same rule: float32 is what the key always meant
        up["prompt_dtype"] = g.prompt_dtype
    key = SPEC.key(cfg, up)
    return Plan(STAGE, key, store.output_dir(STAGE, key), up, inputs)


def shard_is_valid(out_dir: Path, i: int) -> bool:
    """Whether shard ``i`` is there and whole (``finished_shards``)."""
    return i in finished_shards(out_dir, [i])


def finished_shards(out_dir: Path, indices: list[int] | range) -> set[int]:
    """The shards among ``indices`` that are whole: each one's sha256 matches the checksum beside it. A shard
    is hashed only when the work directory's verification record holds no entry for its current stat (size,
    mtime, inode): a shard changed in place is hashed again, one recorded when written or last hashed is not."""
    names = {i: shard_name(i) for i in indices if (out_dir / shard_name(i)).is_file()}
    hashes = work_hashes(out_dir, list(names.values()))
    ok = set()
    for i, name in names.items():
        side = out_dir / f"{name}.sha256"
        if side.is_file() and side.read_text().strip() == hashes[name]:
            ok.add(i)
        else:
            log.warning("shard %s does not match its checksum: rewriting it", out_dir / name)
    return ok


def _write_shard_atomic(out_dir: Path, i: int, idx: range, z: np.ndarray, y: np.ndarray, labels, prompts: list[str] | None, kept=None) -> None:
    final = out_dir / shard_name(i)
    tmp = tmp_sibling(final)
    try:
        write_shard(tmp, idx, z, y, labels, prompts)
        fault_point("generate.shard-written")
        # Checksum first, shard second: a shard under its final name always has its checksum beside it.
        sha = sha256_file(tmp)
        write_text_atomic(out_dir / (final.name + ".sha256"), sha + "\n")
        fault_point("generate.checksum-written")
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: the partial shard must not keep holding the space
        raise
    os.replace(tmp, final)
    remember_hashes(out_dir, {final.name: sha})  # a resume trusts it while the shard's stat is unchanged
    if kept is not None:  # a partition: the shard reaches the store now, not when the partition ends (partitions.py)
        kept([f"{final.name}.sha256", final.name])


def check_finite_images(y: torch.Tensor, idx: range, p: Plan) -> None:
    """A shard is never finished with NaN/Inf in it: the teacher's output is checked batch by batch."""
    finite = torch.isfinite(y.reshape(len(y), -1)).all(dim=1)
    if not bool(finite.all()):
        first = idx[int((~finite).nonzero()[0])]
        raise InputError(
            f"the teacher {p.inputs['teacher']} produced NaN/Inf images (first at sample {first}); no shard holding them was written. "
            "Fix: check the teacher's weights and denoiser.json (sigma_min, sigma_max) and generate.guidance_scale."
        )


def solved_batches(sampler, den: Denoiser, g: GenerateConfig, ranges: list[range], todo: list[int], device: torch.device, reference=None):
    """(shard i, sample indices, z, y on the host, labels, fp32 reference) for every batch of the shards
    ``todo``, in order. The reference is ``reference`` (an fp32 sampler) applied to the first
    ``precision_samples`` of shard 0 (None for every other batch, or without one).

    One batch stays in flight: batch k+1 is queued on the device before batch k's images are awaited, so
    the device does not idle while the host makes noise and stores images (on a CPU it runs in turn).
    The reference's small solve is queued right behind the first batch, where a GPU hides its launches."""
    shape, store_dtype = tuple(den.param.image_shape), np.dtype(g.dtype)
    in_flight = None
    for i in todo:
        idx = ranges[i]
        for start in range(0, len(idx), g.batch_size):
            b = idx[start : start + g.batch_size]
            # Round the noise to the storage dtype first, so the stored pair is exactly (z, ODE(z)).
            z = sample_noise(g.seed, b, shape).numpy().astype(store_dtype).astype(np.float32)
            labels = sample_labels(b, den.num_classes)
            z_dev, labels_dev = to_device(torch.from_numpy(z), device), None if labels is None else labels.to(device)
            y = HostCopy(sampler(z_dev, labels_dev))
            ref = None
            if reference is not None and b.start == 0:
                n = precision_samples(g)
                ref = HostCopy(reference(z_dev[:n], None if labels_dev is None else labels_dev[:n]))
            if in_flight is not None:
                yield _landed(*in_flight)
            in_flight = (i, b, z, y, labels, ref)
    if in_flight is not None:
        yield _landed(*in_flight)


def _landed(i: int, b: range, z: np.ndarray, y: HostCopy, labels, ref: HostCopy | None):
    return i, b, z, y.get(), labels, None if ref is None else ref.get()


@dataclasses.dataclass
class Solved:
    """What ``generate_shards`` leaves for ``finalize``: the solver's NFE, the loaded teacher, and the fp32
    reference of shard 0's first samples (None when shard 0 was written by an earlier run)."""

    nfe: int
    den: Denoiser
    reference: torch.Tensor | None


def generate_shards(cfg: PipelineConfig, p: Plan, rank: int, world: int, device: torch.device, progress: bool, shards: range | None = None, kept=None) -> Solved:
    """Write the shards i = rank (mod world) that are missing or fail their checksum; ``shards``: only those
    among these indices (a partition, partitions.py), ``kept(names)`` called with each shard's files once written."""
    g = cfg.generate
    rows = plan_rows(cfg, p, g.prompt_column, device, progress and rank == 0)
    prompts = None if rows is None else rows.texts
    den = p.teacher().load(device, rows)
    solve, nfe = teacher_sampler(den, g.solver, g.steps, g.guidance_scale)
    sampler = at_precision(solve, g.precision, device)
    # an fp32 run's own images are the fp32 reference; any other precision solves a few samples again in fp32
    reference = None if g.precision == "fp32" else at_precision(solve, "fp32", device)
    store_dtype = np.dtype(g.dtype)
    ranges = shard_ranges(g.num_samples, g.shard_size)
    mine = [i for i in (range(len(ranges)) if shards is None else shards) if i % world == rank]
    finished = finished_shards(p.out_dir, mine)  # one read of the verification records
    todo = [i for i in mine if i not in finished]
    bar = progress_bar(
        STAGE, sum(len(ranges[i]) for i in todo), progress and rank == 0, unit="img",
        phase=f"{len(todo)} shards" + (f" on rank 0 of {world}" if world > 1 else ""),
    )  # fmt: skip
    pending: list[Future] = []
    zs, ys, ls = [], [], []
    fp32 = None
    with ThreadPoolExecutor(max_workers=1) as writer:  # encoding and writing overlap the next shard's compute
        for i, b, z, y, labels, ref in solved_batches(sampler, den, g, ranges, todo, device, reference):
            check_finite_images(y, b, p)
            if b.start == 0:
                fp32 = (y[: precision_samples(g)] if ref is None else ref).float().clone()
            zs.append(z.astype(store_dtype))
            ys.append(y.float().numpy().astype(store_dtype))
            ls.append(None if labels is None else labels.numpy())
            bar.update(len(b))
            if b.stop < ranges[i].stop:  # a batch never crosses a shard: this shard has more to come
                continue
            labels_np = None if ls[0] is None else np.concatenate(ls)
            while len(pending) >= 2:
                pending.pop(0).result()
            pending.append(writer.submit(_write_shard_atomic, p.out_dir, i, ranges[i], np.concatenate(zs), np.concatenate(ys), labels_np, prompts, kept))
            zs, ys, ls = [], [], []
        for f in pending:
            f.result()
    bar.close()
    return Solved(nfe, den, fp32)


PRECISION_SAMPLES = 8  # of the first batch, solved again in fp32 (unless the run is fp32): 8 of num_samples solves


def first_batch_size(g: GenerateConfig) -> int:
    return min(g.batch_size, g.shard_size, g.num_samples)


def precision_samples(g: GenerateConfig) -> int:
    return min(PRECISION_SAMPLES, first_batch_size(g))


@torch.no_grad()
def precision_error(cfg: PipelineConfig, p: Plan, device: torch.device, solved: Solved | None = None) -> dict:
    """The first batch's stored images against an fp32 solve of the same noise: what the precision (and
    the storage dtype) cost, measured in the data itself. The solve is the one made while generating;
    when shard 0 came from an earlier run, it is made again here the way that run made it (the whole
    first batch for an fp32 run, the first samples alone otherwise), so a resumed run records the same."""
    g = cfg.generate
    n = precision_samples(g)
    fp32 = None if solved is None else solved.reference
    first = n if fp32 is not None or g.precision != "fp32" else first_batch_size(g)
    z, stored, _ = read_pairs(p.out_dir / shard_name(0), first)
    if fp32 is None:
        den = solved.den if solved is not None else p.teacher().load(device, plan_rows(cfg, p, g.prompt_column, device))
        sampler, _ = teacher_sampler(den, g.solver, g.steps, g.guidance_scale)
        labels = sample_labels(range(first), den.num_classes)
        fp32 = at_precision(sampler, "fp32", device)(z.to(device), None if labels is None else labels.to(device))[:n].float().cpu()
    return {**difference(stored[:n], fp32), "samples": n, "against": "fp32 solve of the same noise"}


def finalize(cfg: PipelineConfig, p: Plan, solved: Solved, wall_time: float, device: torch.device | None = None) -> Manifest:
    """Check every shard, then write manifest.json (last)."""
    g = cfg.generate
    ranges = shard_ranges(g.num_samples, g.shard_size)
    missing = [shard_name(i) for i in range(len(ranges)) if not (p.out_dir / shard_name(i)).is_file()]
    if missing:
        raise InputError(f"generate output {p.out_dir} is missing shards {missing[:5]}{'...' if len(missing) > 5 else ''}; rerun to resume")
    teacher = p.teacher()
    # Every shard's checksum was computed when it was written, or verified when the run resumed.
    files = [
        file_entry(p.out_dir / shard_name(i), len(r), (p.out_dir / f"{shard_name(i)}.sha256").read_text().strip())
        for i, r in enumerate(ranges)
    ]
    files.append(file_entry(p.out_dir / "config.yaml"))
    prompts = None if solved.den.prompts is None else solved.den.prompts.texts
    if prompts is not None:  # the pairs keep their prompts' texts: distill needs no prompt file
        for src, name in ((prompts.offsets.path, PROMPT_TEXTS[1]), (prompts.blob, PROMPT_TEXTS[0])):
            copy_atomic(src, p.out_dir / name)
            files.append(file_entry(p.out_dir / name))
    m = stage_manifest(
        cfg,
        p,
        files,
        {
            "teacher_path": str(teacher.path),
            "parametrization": teacher.param.kind,
            "solver": g.solver,
            "steps": g.steps,
            "nfe": solved.nfe,
            "guidance_scale": g.guidance_scale,
            "num_samples": g.num_samples,
            "num_shards": len(ranges),
            "image_shape": list(teacher.image_shape),
            "num_classes": teacher.param.num_classes,
            "num_prompts": None if prompts is None else len(prompts),
            "prompt_embeddings": None if prompts is None else prompts.blob.parent.name,
            "dtype": g.dtype,
            "precision": g.precision,
            "precision_error": precision_error(cfg, p, device or torch.device("cpu"), solved),
        },
        wall_time,
    )
    fault_point("generate.before-manifest")
    open_store(cfg.store).save_manifest(m, p.out_dir)
    return m


def _set_threads(g: GenerateConfig, world: int) -> None:
    torch.set_num_threads(g.num_threads or max(1, (os.cpu_count() or 1) // world))


def build(cfg: PipelineConfig, p: Plan, num_processes: int = 1, progress: bool = True) -> Manifest:
    """Write the shards the plan names (resuming what is there), then the manifest."""
    if num_processes > 1:
        return launch_plan(STAGE, cfg, p, num_processes)
    timer = Timer()
    _set_threads(cfg.generate, 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # generate.partitions: the ranges other processes finished are taken and verified; the rest are built
    # here, partition after partition (together they are range(num_shards), in order)
    take_all_shards(cfg, p.out_dir)
    solved = generate_shards(cfg, p, 0, 1, device, progress)
    return finalize(cfg, p, solved, timer.seconds, device)


def build_partition(cfg: PipelineConfig, p: Plan, k: int, progress: bool = True, num_processes: int = 1) -> Path:
    """Partition ``k`` of ``generate.partitions`` (partitions.py): its missing or damaged shards written into the
    output's work directory, verified and kept in the store; nothing published. Returns the work directory
    (the output itself when it is published already: nothing to do)."""
    if num_processes != 1:
        raise InputError("dmd generate --partition runs one process (one device) per partition. Fix: drop --num-processes, or use more partitions.")
    shards = partition_shards(cfg, k)
    store = open_store(cfg.store)
    if store.verified(p.out_dir) is not None:
        log.info("generate: %s is published already: partition %d has nothing to do", p.out_dir, k)
        return p.out_dir
    timer = Timer()
    work = store.partial_dir(p.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "config.yaml").is_file():  # a work directory always holds its config (the publisher rewrites it)
        write_text_atomic(work / "config.yaml", dump_config(cfg))
    names = shard_files(shards)
    taken = store.take_progress(work, names)  # this partition's shards, finished on another machine before it stopped
    before = finished_shards(work, shards)
    _set_threads(cfg.generate, 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generate_shards(cfg, dataclasses.replace(p, out_dir=work), 0, 1, device, progress, shards, lambda files: store.keep_progress(work, files))
    bad = sorted(set(shards) - finished_shards(work, shards))
    if bad:
        raise RuntimeError(f"generate partition {k}: shards {[shard_name(i) for i in bad[:5]]} fail their checksums after writing")
    store.keep_progress(work, names)
    log.info(
        "generate: partition %d of %d (shards %d to %d) verified in %.1f s: %d shards written, %d kept (%d files taken from the store)",
        k, cfg.generate.partitions, shards.start, shards.stop - 1, timer.seconds, len(shards) - len(before), len(before), taken,
    )  # fmt: skip
    return work


def run_distributed(cfg: PipelineConfig, p: Plan, progress: bool = True) -> Manifest | None:
    """The body of one process under ``accelerate launch``; rank 0 writes the manifest."""
    from accelerate import PartialState

    timer = Timer()
    state = PartialState(cpu=os.environ.get("DMD_FORCE_CPU") == "1" or not torch.cuda.is_available())
    _set_threads(cfg.generate, state.num_processes)
    state.wait_for_everyone()
    # the prompts' embeddings, encoded by all processes together (then generate_shards finds them in the store)
    plan_rows(cfg, p, cfg.generate.prompt_column, state.device, progress, Spread(state.process_index, state.num_processes, state.wait_for_everyone))
    solved = generate_shards(cfg, p, state.process_index, state.num_processes, state.device, progress)
    state.wait_for_everyone()
    return finalize(cfg, p, solved, timer.seconds, state.device) if state.is_main_process else None


def incomplete_detail(out_dir: Path) -> str:
    """The shards of an unfinished generate output that are missing or fail their checksum."""
    cfg_file = out_dir / "config.yaml"
    if not cfg_file.is_file():
        return "; not a generate output: no config.yaml"
    g = load_config(cfg_file).generate
    shards = range(len(shard_ranges(g.num_samples, g.shard_size)))
    finished = finished_shards(out_dir, shards)
    missing = [shard_name(i) for i in shards if i not in finished]
    return f"; missing or corrupt shards: {', '.join(missing[:8]) or 'none'}{' ...' if len(missing) > 8 else ''}"


"""The checkpoints of a distill run, ``<out>/checkpoints/step-N``: Accelerate's state (networks, optimizers,
RNG) or, sharded, each process's shards (``sharded/``: torch.distributed.checkpoint), the networks as denoiser
directories, the EMA, metrics.parquet and the sample grids so far.

A checkpoint is written under a temporary name, its files' sha256 go to checksums.json, trainer.json is
written last (it marks the checkpoint complete), then one rename; the newest ``keep_checkpoints`` stay.
Reading back, a checkpoint counts only if it verifies (``checkpoint_problem``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import CheckpointException

from dmd_core.errors import InputError
from dmd_core.faults import fault_point
from dmd_core.lora import LORA_DIR, load_adapter, trainable_state

from ..config import PipelineConfig
from ..contract import Plan
from ..files import sha256_file, write_text_atomic
from ..store import open_store
from .outputs import save_networks, write_metrics
from .sharding import SHARDED_DIR, any_process, distributed_like, load_checkpoint, local, save_checkpoint
from .trainer import Trainer, TrainingDiverged

CHECKSUMS = "checksums.json"  # sha256 of every file of a checkpoint, written before trainer.json
log = logging.getLogger("dmd")


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


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def restore_samples(ckpt: Path, out: Path) -> None:
    """Sample grids a checkpoint holds that the output lost (a rebuild restores, it does not drop them)."""
    if (ckpt / "samples").is_dir():
        (out / "samples").mkdir(parents=True, exist_ok=True)
        for f in (ckpt / "samples").glob("step-*.png"):
            if not (out / "samples" / f.name).is_file():
                shutil.copyfile(f, out / "samples" / f.name)


def frozen_names(model: torch.nn.Module) -> set[str]:
    """The state_dict names of ``model``'s frozen parameters (a LoRA-adapted network's base weights: the teacher's)."""
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def adapters_only(models: list, weights: list[dict], output_dir: str) -> None:
    """Accelerate's save hook for LoRA runs: each model's state without its frozen weights (the teacher's, which
    the run loads anyway), so a checkpoint holds the adapters, the GAN head and the optimizer state."""
    for i, model in enumerate(models):
        frozen = frozen_names(model)
        if frozen:
            weights[i] = {k: v for k, v in weights[i].items() if k not in frozen}


class CheckpointManager:
    """The checkpoints of one run: ``restore`` (the newest that verifies, else distill.resume_from's, when its
    run is compatible) and ``save``. ``may_differ``: the settings a resumed run may change."""

    def __init__(self, cfg: PipelineConfig, p: Plan, accelerator, may_differ: frozenset[str]):
        self.cfg, self.p, self.acc, self.may_differ = cfg, p, accelerator, may_differ
        self.root = p.out_dir / "checkpoints"
        d = cfg.distill
        self.lora = d.generator_lora_rank is not None or d.fake_lora_rank is not None
        if self.lora:
            accelerator.register_save_state_pre_hook(adapters_only)

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; the ones skipped are named with the reason."""
        for ckpt in checkpoints_newest_first(self.root):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            log.warning("distill: skipping checkpoint %s: %s", ckpt.name, problem)
        return None

    def compatible(self, ckpt: Path) -> dict:
        """The checkpoint's trainer.json, if its run is compatible with this one; else an error naming the keys."""
        state = json.loads((ckpt / "trainer.json").read_text())
        old, new = state["distill"], self.cfg.distill.model_dump(mode="json")
        differ = sorted(k for k in set(old) | set(new) if k not in self.may_differ and old.get(k) != new.get(k))
        if state["teacher_digest"] != self.p.upstream["teacher"]:
            differ.append("teacher")
        if state.get("pairs_digest") != self.p.upstream.get("pairs"):
            differ.append("pairs")
        if differ:
            raise InputError(
                f"cannot resume from {ckpt}: its run differs in {', '.join(differ)} "
                f"(only {', '.join(sorted(self.may_differ))} may change). Fix: use the same settings or start fresh."
            )
        return state

    def restore(self, tr: Trainer) -> tuple[Path | None, int, list[dict]]:
        """Loads the checkpoint to continue from into ``tr``: (checkpoint, its step, its metrics rows);
        (None, 0, []) when the run starts fresh. distill.resume_from was verified by the stage's check."""
        ckpt = self.latest()
        if ckpt is None and self.cfg.distill.resume_from:
            ckpt = open_store(self.cfg.store).input_dir(self.cfg.distill.resume_from)  # fetched by check() if by URL
        if ckpt is None:
            return None, 0, []
        state = self.compatible(ckpt)
        if tr.sharded:
            self.load_sharded(ckpt, tr)
        elif self.lora:  # the files hold what trains (adapters_only); the frozen weights are the teacher's, loaded already
            self.check_adapter_files(ckpt, tr)
            self.acc.load_state(str(ckpt / "accelerate"), strict=False)
        else:
            self.acc.load_state(str(ckpt / "accelerate"))
        if tr.ema is not None and (ckpt / "ema.safetensors").is_file():
            ema = load_file(str(ckpt / "ema.safetensors"))
            tr.ema = distributed_like(ema, tr.ema) if tr.sharded else {k: v.to(self.acc.device) for k, v in ema.items()}
        if tr.probe_fn is not None and (ckpt / "best.json").is_file():  # the best-so-far generator
            info = json.loads((ckpt / "best.json").read_text())
            tr.best = {**info, "state": {k: v.float() for k, v in self.best_state(tr, ckpt / "generator_best").items()}}
        rows = pq.read_table(ckpt / "metrics.parquet").to_pylist() if (ckpt / "metrics.parquet").is_file() else []
        if self.acc.is_main_process:
            restore_samples(ckpt, self.p.out_dir)
        log.info("distill: resuming from %s (step %d)", ckpt, state["step"])
        return ckpt, state["step"], rows

    @staticmethod
    def sharded_state(tr: Trainer) -> dict:
        return {"generator": (tr.gen.unet, tr.opt_g), "fake_score": (tr.fake.unet, tr.opt_f)}

    @staticmethod
    def frozen(tr: Trainer) -> dict[str, set[str]]:
        return {"generator": frozen_names(tr.gen.unet), "fake_score": frozen_names(tr.fake.unet)}

    def load_sharded(self, ckpt: Path, tr: Trainer) -> None:
        """A sharded checkpoint into the sharded networks and optimizers (any number of processes: DCP re-splits)."""
        try:
            load_checkpoint(str(ckpt / SHARDED_DIR), self.sharded_state(tr), self.frozen(tr))
        except (CheckpointException, FileNotFoundError, KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"the checkpoint {ckpt} does not hold this run's sharded state ({first[:200]}). "
                             "Fix: resume from a checkpoint of a distill.sharding=fsdp run with the same settings, or start fresh.") from None  # fmt: skip

    def check_adapter_files(self, ckpt: Path, tr: Trainer) -> None:
        """A LoRA checkpoint's model files hold exactly what each network trains: a load that is not strict
        (the frozen weights are absent) must still fill every trained tensor. The files are numbered in the order
        the networks were prepared: generator, fake score."""
        for i, model in enumerate((tr.gen, tr.fake)):
            path = ckpt / "accelerate" / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            want = set(model.state_dict()) - frozen_names(model)
            have = set(load_file(str(path))) if path.is_file() else set()
            if have != want:
                raise InputError(f"the checkpoint {ckpt} does not hold this run's adapters ({path.name}: {len(have ^ want)} tensors differ). "
                                 "Fix: resume from a checkpoint of the same LoRA settings, or start fresh.")  # fmt: skip

    def best_state(self, tr: Trainer, folder: Path) -> dict[str, torch.Tensor]:
        """The best-so-far generator's trainable state: the adapter in ``lora/`` (LoRA), else the whole network."""
        if not (folder / LORA_DIR).is_dir():
            return load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        net = copy.deepcopy(tr.unwrap(tr.gen).unet)
        load_adapter(net, folder / LORA_DIR)
        return {k: v.detach().clone() for k, v in trainable_state(net).items()}

    def save(self, step: int, tr: Trainer, rows: list[dict]) -> None:
        """checkpoints/step-N, on every rank (Accelerate's state, or the sharded one) and the main process (the rest)."""
        d, acc, p = self.cfg.distill, self.acc, self.p
        # the weights are checked first: a checkpoint is never written with NaN/Inf in it (every rank
        # holds the same weights, or sharded, learns whether any shard has them, so all ranks stop together)
        gen, fake = tr.unwrap(tr.gen).unet, tr.unwrap(tr.fake).unet
        bad = [k for net in (gen, fake) for k in nonfinite_tensors({n: local(v) for n, v in net.state_dict().items()})]
        if tr.sharded and any_process(bool(bad), acc.device):
            bad = bad or ["a shard on another process"]
        if bad:
            raise TrainingDiverged(
                f"distill stopped at step {step}: the weights became NaN or Inf ({bad[0]}); no checkpoint was written for it, the last good "
                "one is kept. Fix: lower the learning rates (distill.generator_optimizer.lr, distill.fake_optimizer.lr) or keep distill.max_grad_norm set."
            )
        final, tmp = self.root / f"step-{step:07d}", self.root / f".step-{step:07d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if tr.sharded:  # each process its shards of the networks and their optimizers
            save_checkpoint(str(tmp / SHARDED_DIR), self.sharded_state(tr), self.frozen(tr))
        else:
            acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
        fault_point("distill.checkpoint-state")
        nets, ema = tr.whole_networks(), tr.whole_ema()  # collectives when sharded
        if acc.is_main_process:
            save_networks(nets, tr.best, tmp, adapter_only=self.lora)
            fault_point("distill.checkpoint-networks")
            if ema is not None:
                save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
            if rows:
                write_metrics(rows, tmp / "metrics.parquet")
            if (p.out_dir / "samples").is_dir():  # so a rebuild can restore every grid (they are small)
                shutil.copytree(p.out_dir / "samples", tmp / "samples")
            sums = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            write_text_atomic(tmp / CHECKSUMS, json.dumps(sums, indent=1))
            state = {"step": step, "distill": d.model_dump(mode="json"), "teacher_digest": p.upstream["teacher"], "pairs_digest": p.upstream.get("pairs")}
            write_text_atomic(tmp / "trainer.json", json.dumps(state, indent=2))  # written last: marks it complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fault_point("distill.checkpoint-renamed")
            store = open_store(self.cfg.store)
            kept = [str(f.relative_to(p.out_dir)) for f in sorted(final.rglob("*")) if f.is_file()]  # hidden ones too (DCP's .metadata)
            store.keep_progress(p.out_dir, kept, f"checkpoints/{final.name}/trainer.json")  # object storage: a rerun elsewhere resumes from it
            for old in sorted(self.root.glob("step-*"))[: -d.keep_checkpoints]:
                store.drop_progress(p.out_dir, f"checkpoints/{old.name}")
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

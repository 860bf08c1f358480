"""distill.sharding=fsdp: the generator's and the fake score's weights, gradients and optimizer states split over the
processes with torch's FSDP2 (``fully_shard`` on a 1-D device mesh); the frozen real score stays whole on each.

torch's own ``fully_shard``, not Accelerate's FSDP plugin: Accelerate turns the plugin on only for accelerator
devices (its CPU processes stay DDP), so the plugin's path could not run on CPU, while ``fully_shard`` runs the same
code over gloo on CPU and NCCL on GPUs. Checkpoints are torch.distributed.checkpoint (DCP) folders, each process
writing its own shards (a resume on another number of processes re-splits them); the saved networks are gathered
whole on the main process and written in the usual diffusers layout.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

SHARDED_DIR = "sharded"  # a checkpoint's DCP folder (in place of Accelerate's state)
# DCP names its metadata file ".metadata"; hidden files are never part of an output's manifest (a published
# checkpoint on object storage would lack it), so the folder keeps it under this name and loads through a view
METADATA = "metadata.dcp"
DCP_METADATA = ".metadata"
# diffusers' repeated blocks, each one FSDP unit: its weights are gathered just before it runs and freed after
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def mesh(device: torch.device, world: int) -> DeviceMesh:
    return init_device_mesh(device.type, (world,))


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The modules sharded as one unit each: every block of diffusers' block lists and the mid block. The network
    itself takes the rest (embeddings, norms, the first and last convolutions)."""
    units = [block for name in BLOCK_LISTS for block in (getattr(net, name, None) or [])]
    mid = getattr(net, "mid_block", None)
    return units + ([mid] if isinstance(mid, nn.Module) else [])


def shard(net: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
    """``net`` sharded in place: its blocks (``shard_units``), then the network as the root unit."""
    for unit in shard_units(net):
        fully_shard(unit, mesh=device_mesh)
    fully_shard(net, mesh=device_mesh)
    return net


def skeleton(net: nn.Module) -> nn.Module:
    """A copy of ``net``'s structure on the meta device (no memory): the frame the gathered weights are loaded into."""
    memo = {id(t): nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad) for t in net.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in net.buffers()})
    return copy.deepcopy(net, memo)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a plain tensor as it is)."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every process (a collective; a plain tensor as it is)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any (a collective)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gathered(net: nn.Module, frame: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module | None:
    """``net`` (sharded) whole on the CPU of the main process, in a copy of ``frame`` (``skeleton``); None elsewhere.
    A collective: every process calls it. ``state``: other sharded tensors of the same names to load over the
    weights (the EMA's)."""
    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    extra = {k: whole(v).cpu() for k, v in (state or {}).items()}
    if dist.get_rank() != 0:
        return None
    out = copy.deepcopy(frame).to_empty(device="cpu")
    out.load_state_dict({**full, **extra})
    for name, b in net.named_buffers():  # buffers are never sharded; a non-persistent one is not in the state dict
        out.get_buffer(name).copy_(b)
    return out


def distributed_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors (the same on every process) split as ``like``'s sharded tensors are."""
    return {k: distribute_tensor(v.to(like[k].device), like[k].device_mesh, like[k].placements) if isinstance(like[k], DTensor) else v.to(like[k].device)
            for k, v in full.items()}  # fmt: skip


def checkpoint_state(nets: dict[str, tuple[nn.Module, torch.optim.Optimizer]], frozen: dict[str, set[str]]) -> dict:
    """What a sharded checkpoint holds: each network's state without its frozen weights (a LoRA run's: the teacher's)
    and its optimizer's state, by parameter name."""
    state = {}
    for name, (net, opt) in nets.items():
        state[name] = {k: v for k, v in get_model_state_dict(net).items() if k not in frozen[name]}
        state[f"{name}.optimizer"] = get_optimizer_state_dict(net, opt)
    return state


def save_checkpoint(folder: str, nets: dict[str, tuple[nn.Module, torch.optim.Optimizer]], frozen: dict[str, set[str]]) -> None:
    """Every process writes its shards into ``folder`` (DCP: one file per process and the metadata, written last,
    then renamed ``METADATA`` by the main process; ``dcp.save`` returns on every process once it is written)."""
    dcp.save(checkpoint_state(nets, frozen), checkpoint_id=folder)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.replace(Path(folder, DCP_METADATA), Path(folder, METADATA))


@contextmanager
def dcp_folder(folder: str) -> Iterator[str]:
    """``folder`` as DCP reads it: a temporary folder of links to its files, ``METADATA`` linked as ``.metadata``."""
    if not Path(folder, METADATA).is_file():
        yield folder  # DCP's own layout, or not a checkpoint: DCP names what is missing
        return
    with tempfile.TemporaryDirectory(prefix="dmd-dcp-") as view:
        for f in Path(folder).iterdir():
            os.symlink(f.resolve(), Path(view, DCP_METADATA if f.name == METADATA else f.name))
        yield view


def load_checkpoint(folder: str, nets: dict[str, tuple[nn.Module, torch.optim.Optimizer]], frozen: dict[str, set[str]]) -> None:
    """The inverse of ``save_checkpoint``, into the sharded networks and their optimizers."""
    state = checkpoint_state(nets, frozen)
    with dcp_folder(folder) as readable:
        dcp.load(state, checkpoint_id=readable)
    for name, (net, opt) in nets.items():
        set_model_state_dict(net, state[name], options=StateDictOptions(strict=not frozen[name]))
        set_optimizer_state_dict(net, opt, state[f"{name}.optimizer"])

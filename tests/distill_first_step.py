"""Helper for test_distill: one DMD iteration on a fixed global batch, split over the processes.

    python tests/distill_first_step.py CONFIG GLOBAL_BATCH OUT [KEY=VALUE ...]           # 1 process
    accelerate launch --num_processes 2 ... tests/distill_first_step.py CONFIG GLOBAL_BATCH OUT [KEY=VALUE ...]
"""

import json
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from stages import chain, distill
from stages.config import load_config
from stages.launch import finish_distributed


def main() -> None:
    """Locals, so the trainer and its DDP wrappers are gone before the process group is torn down."""
    config, global_batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    acc = Accelerator(cpu=True)
    per_process = global_batch // acc.num_processes
    cfg = load_config(config, [f"distill.batch_size={per_process}", *sys.argv[4:]])
    torch.set_num_threads(1)
    trainer = distill.Trainer(cfg, chain.plan(cfg, "distill", acc.num_processes), acc)
    g = torch.Generator().manual_seed(123)  # the same regression pairs, whatever the split
    z_ref = torch.randn(global_batch, 1, 8, 8, generator=g)
    y_ref = torch.rand(global_batch, 1, 8, 8, generator=g) * 2 - 1
    labels_ref = torch.randint(0, 10, (global_batch,), generator=g)
    part = slice(acc.process_index * per_process, (acc.process_index + 1) * per_process)
    logs = trainer.step(0, batches=[(z_ref[part], y_ref[part], labels_ref[part])])
    nets = trainer.whole_networks()  # sharded (distill.sharding=fsdp): gathered on the main process, every process calls it
    if acc.is_main_process:
        state = {f"gen.{k}": v.contiguous() for k, v in nets["generator"].unet.state_dict().items()}
        state.update({f"fake.{k}": v.contiguous() for k, v in nets["fake_score"].unet.state_dict().items()})
        head = getattr(nets["fake_score"], "gan_head", None)
        if head is not None:  # DMD2's head trains with the fake score
            state.update({f"head.{k}": v.contiguous() for k, v in head.state_dict().items()})
        save_file(state, out)
        with open(out + ".json", "w") as f:
            json.dump(logs, f)


main()
finish_distributed()

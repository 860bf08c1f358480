"""Host <-> device copies that do not make the host wait for the device.

A plain ``.to("cuda")`` / ``.cpu()`` of pageable memory blocks the Python thread until the copy (and, for
``.cpu()``, everything queued before it) is done, so the GPU idles while the host prepares the next work.
Through pinned memory both directions run asynchronously; on a CPU these are ordinary copies.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, without waiting for the copy."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class HostCopy:
    """A device tensor's copy to the host, started now (queued after the work that makes it) and waited for
    by ``get()``: the host can queue the next batch before it needs this one's values."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t.detach()

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host

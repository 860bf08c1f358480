"""DMD2's GAN term (Yin et al., NeurIPS 2024; docs/math.md §12): a small classifier head on the fake score's
bottleneck, trained with the fake score to tell noised real images from noised generator samples, and a
non-saturating loss that pushes the generator's samples towards "real" through the frozen fake score.

    loss_D = softplus(D(x_fake_t)) + softplus(-D(x_real_t))     (fake-score update, weight w_D)
    loss_G = softplus(-D(G(z)_t))                                (generator update, weight w_G)

D(x_t) = head(mid_block(fake_score(x_t, t))); x_t is the sample noised at a level drawn over all levels.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

Tensor = torch.Tensor
# DMD2's ImageNet-64 settings (tianweiy/DMD2, experiments/imagenet/*gan_classifier_genloss3e-3*.sh):
# --gen_cls_loss_weight 3e-3, --cls_loss_weight 1e-2
GAN_WEIGHT_GENERATOR = 3e-3
GAN_WEIGHT_DISCRIMINATOR = 1e-2


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """softplus(D(fake)) + softplus(-D(real)), means over samples: the logistic loss of 'real vs generated'."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def generator_gan_loss(logits_fake: Tensor) -> Tensor:
    """softplus(-D(G(z))): the non-saturating generator loss (Goodfellow et al. 2014)."""
    return F.softplus(-logits_fake).mean()


def _groups(channels: int) -> int:
    """DMD2's 32 groups for its 768 channels; at least 16 channels per group for small bottlenecks (after the
    1x1 reduction a group of 2 channels would normalise to +-1 whatever the input)."""
    return math.gcd(channels, min(32, max(1, channels // 16)))


class BottleneckHead(nn.Module):
    """DMD2's classifier branch sized for any bottleneck (C, H, W): conv 4x4 stride 2 (H -> H/2), GroupNorm,
    SiLU, a conv over the remaining H/2 x W/2 (-> 1x1), GroupNorm, SiLU, 1x1 conv to one logit. For DMD2's
    768 x 8 x 8 bottleneck this is exactly its head (tianweiy/DMD2, main/edm/edm_guidance.py)."""

    def __init__(self, channels: int, size: tuple[int, int]):
        super().__init__()
        h, w = max(size[0] // 2, 1), max(size[1] // 2, 1)
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1) if min(size) >= 2 else nn.Identity(),
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, kernel_size=(h, w)),
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, 1, kernel_size=1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features.float()).flatten(1).squeeze(1)


class _BottleneckReached(Exception):
    """Raised by a stopping tap's hook: ends the UNet's forward at its mid block."""


class BottleneckTap:
    """Keeps the output of ``unet.mid_block`` (diffusers UNets) from the network's latest forward (one
    bottleneck-sized tensor, held until taken).

    One hook for the network's life, registered before the first forward: torch.compile traces a module's
    hooks into its graphs but by default does not guard on them, so a hook added after compiling would
    silently never run, and one added per call would recompile per call.

    ``stop_early``: ``bottleneck()`` ends the forward at the mid block (the up path's output is unused: DMD2
    runs only the encoder for its classifier). diffusers' forward has no such exit, so the hook raises; for
    a compiled UNet that splits the graph into pieces, so compiled runs leave it off and run the whole forward.
    """

    def __init__(self, unet: nn.Module, stop_early: bool = False):
        if getattr(unet, "mid_block", None) is None:
            why = ("its UNet has none (mid_block_type null in its config.json)" if hasattr(unet, "down_blocks")
                   else f"its network is a {type(unet).__name__}, a transformer without one")
            raise InputError(f"distill.gan: the head reads a UNet's mid block, and {why}. Fix: set distill.gan=false.")
        self.out: Tensor | None = None
        self.stop_early, self.stopping = stop_early, False
        unet.mid_block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args, output: Tensor) -> None:
        self.out = output
        if self.stopping:
            raise _BottleneckReached

    def take(self) -> Tensor:
        """The bottleneck of the latest forward, released by the tap; a second take without a forward between fails."""
        out, self.out = self.out, None
        if out is None:
            raise RuntimeError("no forward of the tapped UNet since the last take()")
        return out

    def bottleneck(self, forward: Callable[[], object]) -> Tensor:
        """Runs ``forward()`` (a call of the tapped UNet) only as far as the bottleneck where allowed; returns it."""
        self.stopping = self.stop_early
        try:
            forward()
        except _BottleneckReached:
            pass
        finally:
            self.stopping = False
        return self.take()

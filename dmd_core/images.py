"""Sample grids as PNG (torchvision's make_grid), upscaled so 8x8 digits are visible."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def grid_image(images: torch.Tensor, nrow: int, min_cell: int = 32) -> Image.Image:
    """Images in [-1, 1], shape (N, C, H, W), as one PIL image with ``nrow`` images per row."""
    x = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    scale = max(1, min_cell // x.shape[-1])
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    array = (grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 or x.shape[1] == 1 else array)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    grid_image(images, nrow).save(tmp, format="PNG")
    tmp.replace(path)
    return path

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


def caption_columns(grid: Image.Image, captions: list[str], pad: int = 2) -> Image.Image:
    """``grid`` (from grid_image, one column per caption) with each caption written upwards above its column."""
    from PIL import ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=11)  # Pillow's bundled scalable font (needs FreeType)
    except (ImportError, TypeError):  # older Pillow / no FreeType: the bitmap font
        font = ImageFont.load_default()
    n = len(captions)
    cell = (grid.width - pad) / n  # make_grid: width = n * (cell + pad) + pad
    boxes = [font.getbbox(c) for c in captions]
    height = max(b[2] - b[0] for b in boxes) + 6
    canvas = Image.new(grid.mode, (grid.width, grid.height + height), 255)
    canvas.paste(grid, (0, height))
    for i, (text, box) in enumerate(zip(captions, boxes)):
        label = Image.new("L", (box[2] - box[0] + 2, box[3] + 2), 255)
        ImageDraw.Draw(label).text((-box[0] + 1, 0), text, fill=0, font=font)
        label = label.rotate(90, expand=True)  # reads bottom to top
        x = round(pad + i * cell + (cell - pad - label.width) / 2)
        canvas.paste(label.convert(grid.mode), (x, height - 3 - label.height))
    return canvas

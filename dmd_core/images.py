"""Sample grids as PNG (torchvision's make_grid), upscaled so 8x8 digits are visible."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from .render import one_line


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


CAPTION_CHARS = 1000  # a caption is cut to this before it is measured: Pillow takes seconds over a megabyte


def fitted_caption(text: str, font, max_px: int) -> str:
    """``text`` (a prompt: any string) as one line of drawable text at most ``max_px`` long, cut with an ellipsis."""
    from PIL import ImageFont

    text = one_line(text, limit=CAPTION_CHARS)
    ellipsis = "…"
    if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap font draws Latin-1 only
        text, ellipsis = text.encode("latin-1", "replace").decode("latin-1"), "..."
    if font.getlength(text) <= max_px:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if font.getlength(text[:mid] + ellipsis) <= max_px else (lo, mid - 1)
    return text[:lo].rstrip() + ellipsis


def caption_columns(grid: Image.Image, captions: list[str], pad: int = 2) -> Image.Image:
    """``grid`` (from grid_image, one column per caption) with each caption written upwards above its column,
    cut to the grid's height (at least 64 px)."""
    from PIL import ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=11)  # Pillow's bundled scalable font (needs FreeType)
    except (ImportError, TypeError):  # older Pillow / no FreeType: the bitmap font
        font = ImageFont.load_default()
    n = len(captions)
    if n == 0:
        return grid
    captions = [fitted_caption(c, font, max(grid.height, 64)) for c in captions]
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


def training_curves_png(rows: list[dict]) -> bytes:
    """A distill run's curves as PNG bytes: the losses; with quality probes also their FD (best marked) and
    the generator's per-channel std against the teacher's (over-saturation shows as std above the line)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = [r for r in rows if r.get("probe_fd") is not None]
    fig, axes = plt.subplots(1, 3 if probes else 1, figsize=(14 if probes else 6, 3.2), dpi=100, squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in rows]
    for name in ("loss_dm", "loss_reg", "loss_fake"):
        values = [r.get(name) for r in rows]
        if any(v is not None and v > 0 for v in values):
            ax.plot(steps, values, label=name)
    ax.set(xlabel="step", yscale="log", title="losses")
    ax.legend()
    if probes:
        ps = [r["step"] for r in probes]
        ax = axes[0][1]
        ax.plot(ps, [r["probe_fd"] for r in probes], marker="o", ms=3, label="FD of the probe sample")
        best = min(probes, key=lambda r: r["probe_fd"])
        ax.scatter([best["step"]], [best["probe_fd"]], color="red", zorder=3, label=f"best: step {best['step']}")
        ax.set(xlabel="step", title="quality during training")
        ax.legend()
        ax = axes[0][2]
        channels = sorted({k[len("probe_std_c"):] for r in probes for k in r if k.startswith("probe_std_c")})
        for c in channels:
            line = ax.plot(ps, [r.get(f"probe_std_c{c}") for r in probes], label=f"generator std, channel {c}")[0]
            if probes[-1].get(f"teacher_std_c{c}") is not None:
                ax.axhline(probes[-1][f"teacher_std_c{c}"], color=line.get_color(), ls="--", lw=1)
        ax.set(xlabel="step", title="sample std (dashed: teacher)")
        ax.legend(fontsize=7)
    for a in axes[0]:
        a.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()

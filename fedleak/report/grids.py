"""Image grids: generated samples, and Hitaj et al. Figure 6 (nearest real image above each fake).

PIL only (no matplotlib, no display) so training processes can write grids cheaply.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fedleak.runfolder import atomic_write_bytes

# Mid-grey separators: MNIST digits are white on black, so black padding would hide the cells.
PAD_VALUE = 128


def _to_uint8(images: torch.Tensor, name: str = "images") -> np.ndarray:
    """NxCxHxW in [-1, 1] -> NxHxWxC uint8, after checking what a caller can get wrong."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(np.asarray(images))
    if images.dim() != 4:
        raise ValueError(f"{name} must be NxCxHxW, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"{name} is empty: shape {tuple(images.shape)}")
    if c not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got {c}")
    x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _tile(arr: np.ndarray, nrow: int, padding: int) -> np.ndarray:
    """Row-major tiling like torchvision's make_grid: ``nrow`` images per row."""
    n, h, w, c = arr.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full(
        (rows * (h + padding) + padding, cols * (w + padding) + padding, c), PAD_VALUE, np.uint8
    )
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def _upscale(grid: np.ndarray, scale: int) -> np.ndarray:
    # Nearest neighbour: 28-px digits stay crisp instead of being blurred by interpolation.
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def _to_image(grid: np.ndarray) -> Image.Image:
    if grid.shape[2] == 1:
        return Image.fromarray(grid[..., 0], "L")
    return Image.fromarray(grid, "RGB")


def _save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _check_layout(nrow: int, padding: int, scale: int) -> None:
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(
            f"need nrow >= 1, padding >= 0, scale >= 1 (got {nrow}, {padding}, {scale})"
        )


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int = 10,
    padding: int = 2,
    scale: int = 2,
) -> Path:
    """Write NxCxHxW images in [-1, 1] as one PNG grid (values outside are clamped).

    Size: ``(cols * (W + padding) + padding) * scale`` wide with ``cols = min(nrow, N)``,
    ``(ceil(N / cols) * (H + padding) + padding) * scale`` high.
    """
    _check_layout(nrow, padding, scale)
    grid = _tile(_to_uint8(images), nrow, padding)
    return _save_png(_to_image(_upscale(grid, scale)), path)


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def save_comparison_grid(
    top: torch.Tensor,
    bottom: torch.Tensor,
    path: str | os.PathLike,
    labels: tuple[str, str] | None = ("nearest victim image", "generated"),
    scale: int = 2,
) -> Path:
    """Hitaj et al. Figure 6: real images (top row) over the generated ones (bottom row).

    Column i of the top row is the real image nearest to generated image i, so both tensors
    must have the same shape. ``labels`` (or None) are drawn in a white margin on the left.
    """
    _check_layout(1, 0, scale)
    a, b = _to_uint8(top, "top"), _to_uint8(bottom, "bottom")
    if a.shape != b.shape:
        raise ValueError(f"top {a.shape} and bottom {b.shape} must have the same NxHxWxC shape")
    padding = 2
    grid = _upscale(_tile(np.concatenate([a, b]), nrow=len(a), padding=padding), scale)
    img = _to_image(grid)
    if labels and any(labels):
        img = _add_labels(img, labels, row_h=a.shape[1], padding=padding, scale=scale)
    return _save_png(img, path)


def _add_labels(
    img: Image.Image, labels: tuple[str, str], row_h: int, padding: int, scale: int
) -> Image.Image:
    font = _font(max(10, min(16, row_h * scale // 4)))
    probe = ImageDraw.Draw(img)
    margin = 6
    width = int(max(probe.textlength(str(t), font=font) for t in labels)) + 2 * margin
    white = 255 if img.mode == "L" else (255, 255, 255)
    out = Image.new(img.mode, (img.width + width, img.height), white)
    out.paste(img, (width, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        # No `anchor=`: the bitmap fallback font does not support it.
        _, top, _, bottom = draw.textbbox((0, 0), str(text), font=font)
        centre_y = (padding + r * (row_h + padding) + row_h / 2) * scale
        y = int(centre_y - (top + bottom) / 2)
        draw.text((margin, y), str(text), fill=0 if img.mode == "L" else (0, 0, 0), font=font)
    return out

"""Image grids: the one place tensors become PNG files."""

from __future__ import annotations

from pathlib import Path

import torch


def grid(images: torch.Tensor, nrow: int, pad: int = 2, scale: int = 1) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> one (3, H', W') image, `nrow` images per row."""
    b, c, h, w = images.shape
    ncol = -(-b // nrow)
    canvas = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    if scale > 1:  # nearest-neighbour: tiny images stay crisp
        canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return canvas


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path)
    return path

"""Small image helpers: tensors in [0, 1] to PNG files and grids (no torchvision needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL RGB."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """(N, 3, H, W) -> (3, rows*(H+pad)+pad, nrow*(W+pad)+pad) on a white background."""
    n, c, h, w = images.shape
    nrow = min(nrow, n)
    rows = (n + nrow - 1) // nrow
    out = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.detach().float().cpu()):
        r, col = divmod(i, nrow)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Write a grid PNG; `scale` > 1 enlarges small images (nearest) so they are easy to look at."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = to_pil(grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path

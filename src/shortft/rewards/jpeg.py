"""JPEG compressibility (Black et al., "Training Diffusion Models with Reinforcement Learning" (DDPO), 2023).

Metric (evaluation): the real file size of the image saved by PIL as JPEG at quality 95, in kB
(bytes / 1000), as DDPO measures it. Not differentiable.

Reward (training): a differentiable estimate of that size, in approximate kB, with no weights:
  1. RGB in [0, 1] -> 255 · YCbCr (JFIF), chroma averaged over 2x2 (PIL's default 4:2:0 at q95);
  2. each plane padded to a multiple of 8 by edge replication, split in 8x8 blocks, minus 128,
     orthonormal 2-D DCT-II (exactly JPEG's FDCT);
  3. divided by the standard luminance / chrominance tables scaled to quality 95 (libjpeg's
     rule: scale = 200 - 2q percent, so x0.1, floor at 1);
  4. coded size ≈ Σ over coefficients of [log2(1 + |q|) + NZ · (1 - exp(-(|q| / 0.5)²))] bits:
     the magnitude bits of Huffman coding plus a smooth count of non-zero coefficients, each costing
     about NZ bits of run/size symbol. No rounding: the soft count stands in for it, so the gradient
     is never zero or straight-through.
  5. kB = A · bits / 8000 + B, with A, B fitted once by least squares to the real size on the
     procedural image set below (`procedural_images`), so the number reads like the metric.
`compressibility` = -estimate (smaller files are better), `incompressibility` = +estimate.
Rank agreement with the real size: see docs/rewards.md (Spearman on 240 procedural images).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from shortft.rewards import RewardSettings, check_inputs, register

QUALITY = 95
# ITU T.81 Annex K tables (quality 50), row-major.
_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32
NZ_BITS = 4.0  # run/size symbol cost of a non-zero coefficient, bits (typical AC Huffman code length)
FIT_A, FIT_B = 1.0, 0.6  # kB = FIT_A * bits / 8000 + FIT_B: least squares gave A = 1.00-1.01 (128-512 px), B ~ headers


def quant_table(base: list[int], quality: int = QUALITY) -> torch.Tensor:
    """libjpeg's jpeg_quality_scaling + jpeg_add_quant_table (baseline): (8, 8) float."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return torch.tensor([min(max((b * scale + 50) // 100, 1), 255) for b in base], dtype=torch.float32).view(8, 8)


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D: coefficients = D @ block @ Dᵀ (equal to JPEG's FDCT for n = 8)."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, N, 8, 8), padded to multiples of 8 by edge replication like libjpeg."""
    b, h, w = plane.shape
    ph, pw = -h % 8, -w % 8
    if ph or pw:
        plane = F.pad(plane[:, None], (0, pw, 0, ph), mode="replicate")[:, 0]
    h, w = plane.shape[-2:]
    return plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(b, -1, 8, 8)


def jpeg_bits(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B,) differentiable estimate of the entropy-coded size in bits."""
    x = images.float() * 255
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b  # (B, H, W)
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    chroma = torch.stack([cb, cr], 1)  # (B, 2, H, W)
    if chroma.shape[-1] % 2 or chroma.shape[-2] % 2:
        chroma = F.pad(chroma, (0, chroma.shape[-1] % 2, 0, chroma.shape[-2] % 2), mode="replicate")
    chroma = F.avg_pool2d(chroma, 2)  # 4:2:0
    d = dct_matrix().to(x.device)
    total = 0
    for plane, table in ((y, _LUMA), (chroma[:, 0], _CHROMA), (chroma[:, 1], _CHROMA)):
        coef = d @ (_blocks(plane) - 128) @ d.T  # (B, N, 8, 8)
        q = (coef / quant_table(table, quality).to(x.device)).abs()
        total = total + (torch.log2(1 + q) + NZ_BITS * (1 - torch.exp(-(q / 0.5) ** 2))).sum(dim=(1, 2, 3))
    return total  # (B,)


def jpeg_size_surrogate(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B,) approximate JPEG q95 size in kB, differentiable."""
    return FIT_A * jpeg_bits(images) / 8000 + FIT_B


def jpeg_size_kb(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B,) real PIL JPEG size in kB (bytes / 1000), as DDPO measures it."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes)


def procedural_images(n: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: a varied set for checking the surrogate's ranking. Kinds cycle
    through noise at scales 2..size, linear gradients, shapes on flat backgrounds, stripes of random
    frequency, checkerboards, and blends of two kinds with a random weight."""
    g = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.rand(*s, generator=g)

    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")

    def one(kind: int) -> torch.Tensor:
        if kind == 0:  # noise at a random scale, optionally grey
            k = int(2 ** (1 + rand(1).item() * (math.log2(size) - 1)))
            img = F.interpolate(rand(1, 3, k, k), size=(size, size), mode="bilinear", align_corners=False)[0]
            return img.mean(0, keepdim=True).expand(3, -1, -1) if rand(1) < 0.3 else img
        if kind == 1:  # linear gradient between two colours
            a = rand(1) * 2 * math.pi
            t = (math.cos(a) * xx + math.sin(a) * yy).sub(-1).div(2)
            return rand(3, 1, 1) * (1 - t) + rand(3, 1, 1) * t
        if kind == 2:  # a few shapes on a flat background
            img = rand(3, 1, 1).expand(3, size, size).clone()
            for _ in range(int(rand(1) * 6) + 1):
                cx, cy, r = rand(1), rand(1), 0.05 + 0.3 * rand(1)
                mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2) if rand(1) < 0.5 else (
                    ((xx - cx).abs() < r) & ((yy - cy).abs() < r))
                img[:, mask] = rand(3, 1)
            return img
        if kind == 3:  # stripes
            f, a = 1 + rand(1) * size / 4, rand(1) * math.pi
            t = 0.5 + 0.5 * torch.sin(2 * math.pi * f * (math.cos(a) * xx + math.sin(a) * yy))
            return rand(3, 1, 1) * t + rand(3, 1, 1) * (1 - t)
        # checkerboard of random cell size
        cell = int(2 + rand(1).item() * size / 4)
        idx = torch.arange(size) // cell
        t = ((idx[:, None] + idx[None, :]) % 2).float()
        return rand(3, 1, 1) * t + rand(3, 1, 1) * (1 - t)

    out = []
    for i in range(n):
        img = one(i % 5)
        if (i // 5) % 3 == 2:  # blend in a second kind
            w = rand(1)
            img = w * img + (1 - w) * one(int(rand(1) * 5))
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (no tie correction; sizes are continuous)."""
    ra = torch.from_numpy(np.argsort(np.argsort(a.detach().cpu().numpy()))).double()
    rb = torch.from_numpy(np.argsort(np.argsort(b.detach().cpu().numpy()))).double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def compressibility_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """-(estimated JPEG q95 size in kB): higher = more compressible."""
    check_inputs(images, prompts)
    return -jpeg_size_surrogate(images)


def incompressibility_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """+(estimated JPEG q95 size in kB)."""
    check_inputs(images, prompts)
    return jpeg_size_surrogate(images)


@register("compressibility")
def build_compressibility(settings: RewardSettings):
    return compressibility_reward


@register("incompressibility")
def build_incompressibility(settings: RewardSettings):
    return incompressibility_reward


def rank_check(n: int = 240, sizes: tuple[int, ...] = (64, 128, 256, 512), seed: int = 0) -> list[dict]:
    """Spearman and mean |estimate - real| (kB) of the surrogate on `procedural_images` at each size."""
    rows = []
    for size in sizes:
        x = procedural_images(n, size, seed=seed)
        real, est = jpeg_size_kb(x), jpeg_size_surrogate(x)
        rows.append({"images": n, "size": size, "spearman": spearman(est, real),
                     "real_kb": f"{float(real.min()):.2f}-{float(real.max()):.2f}",
                     "mean_abs_err_kb": float((est - real).abs().mean())})
    return rows


if __name__ == "__main__":  # python -m shortft.rewards.jpeg: the figure in docs/rewards.md
    print("| images | size | Spearman | real size range (kB) | mean abs. error (kB) |\n|---|---|---|---|---|")
    for r in rank_check():
        print(f"| {r['images']} | {r['size']}x{r['size']} | {r['spearman']:.3f} | {r['real_kb']} | "
              f"{r['mean_abs_err_kb']:.2f} |")

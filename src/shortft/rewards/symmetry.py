"""Horizontal symmetry (the paper's Symmetry metric, lower is better) and its negation as a reward.

Metric: the mean absolute difference between an image and its left-right mirror, on pixel values in
[0, 1], averaged over channels and pixels, divided by the image's mean absolute deviation from its own
mean (so a flat image does not win by being flat):

    asym(x) = mean|x - flip(x)| / (mean|x - mean(x)| + 1e-3)

0 means perfectly symmetric. Scale: for two unrelated halves with Gaussian-like pixel values the
ratio is E|a - b| / E|a - mu| = (2/sqrt(pi)) / sqrt(2/pi) = sqrt(2) ≈ 1.41; natural images, whose halves
share colours and layout, land below that (the paper reports 0.853 for SD 1.5 on its own definition,
which it does not spell out, so compare trends rather than absolute values). The reward is -asym(x). It is differentiable everywhere except on the
measure-zero set where a pixel equals its mirror.
"""

from __future__ import annotations

import torch

from shortft.rewards import RewardSettings, check_inputs, register


def asymmetry(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B,) normalised mean absolute left-right difference (lower = more symmetric)."""
    diff = (images - images.flip(-1)).abs().mean(dim=(1, 2, 3))  # (B,)
    spread = (images - images.mean(dim=(1, 2, 3), keepdim=True)).abs().mean(dim=(1, 2, 3))  # (B,)
    return diff / (spread + 1e-3)


def symmetry_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Reward = -asymmetry; see the module docstring."""
    check_inputs(images, prompts)
    return -asymmetry(images)


@register("symmetry")
def build_symmetry(settings: RewardSettings):
    return symmetry_reward

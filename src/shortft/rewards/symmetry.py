"""Horizontal symmetry (the paper's Symmetry metric, lower is better) and its negation as a reward.

Metric: the mean absolute difference between an image and its left-right mirror, on pixel values in
[0, 1], averaged over channels and pixels, divided by the image's mean absolute deviation from its own
mean (so a flat image does not win by being flat):

    asym(x) = mean|x - flip(x)| / (mean|x - mean(x)| + 1e-3)

0 means perfectly symmetric. The reward is -asym(x). It is differentiable everywhere except on the
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

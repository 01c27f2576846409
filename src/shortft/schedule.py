"""The learning-rate schedule of the project's own training loops (distillation, world pretraining)."""

from __future__ import annotations

import math


def cosine_lr(lr: float, step: int, warmup: int, progress: float, lr_min: float = 0.0) -> float:
    """Linear warm-up over the first `warmup` steps times a cosine from `lr` to `lr_min` over `progress`
    in [0, 1] (the caller says what progress means: steps done, time used, or whichever ends first)."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return lr_min + (lr - lr_min) * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))

"""What every part's training loop shares: the learning-rate schedule, the optimiser step, and fp16 saving."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from shortft.errors import MissingFileError
from shortft.schedule import cosine_lr


def lr_at(step: int, total: int, lr: float, lr_min: float, warmup: int = 0) -> float:
    """Linear warm-up from lr / warmup to lr over `warmup` steps, then a cosine from lr to lr_min over the
    remaining steps (shortft.schedule.cosine_lr)."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return warm * cosine_lr(lr, step, 0, (step - warmup) / max(1, total - warmup), lr_min)


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, clip: list | None = None) -> float:
    """One optimiser step on `loss`: every group's learning rate is `lr` times its "scale" (1 if unset),
    gradients are clipped to norm 1 when `clip` lists the parameters. Returns the loss value."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], step: int, rate: float) -> None:
    """One step of the weights' moving average, its decay warmed up: min(rate, (1 + step) / (10 + step))."""
    decay = min(rate, (1 + step) / (10 + step))
    for e, p in zip(ema, params):
        e.lerp_(p.detach(), 1 - decay)


@torch.no_grad()
def load_ema(params: list[torch.Tensor], ema: list[torch.Tensor]) -> None:
    """Put the moving average into the trained weights (what is shipped)."""
    for e, p in zip(ema, params):
        p.copy_(e)


def load_as_fp32(folder: Path) -> None:
    """Weights ship in fp16 (half the size); mark a transformers config so that a plain from_pretrained
    (dtype "auto" in transformers 5) loads them in fp32, as diffusers does for the UNet and VAE, so a
    stock StableDiffusionPipeline.from_pretrained(folder) runs on a CPU without a dtype argument."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_fp16(model, folder: Path) -> Path:
    """`save_pretrained` an fp16 copy of `model` (safetensors); the model itself stays fp32."""
    copy.deepcopy(model).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def require(folder: Path, part: str) -> Path:
    """`folder`, which an earlier part writes; a MissingFileError naming that part when it is not there."""
    if not Path(folder).is_dir():
        raise MissingFileError(f"{folder} does not exist: build it first with `shortft world pretrain --part {part}` "
                               "(with the same --out)")
    return Path(folder)

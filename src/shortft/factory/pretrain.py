"""`shortft world pretrain`: rebuild every asset of the embedded world from scratch, part by part.

Each part is one function `(cfg) -> ...` that reads only the world generator and the parts before it,
and writes `save_pretrained` folders below `cfg.root`. The order of `PARTS` is the order of `--part all`:
the CLIP before the UNet (the UNet's text encoder starts from the CLIP's text tower), the decoder
refinement after the UNet (the UNet only sees the VAE encoder's latents, so refining the decoder changes
nothing it learned), the shortcut last (it distils the finished model).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from shortft.errors import ConfigError
from shortft.factory.clip import pretrain_clip
from shortft.factory.common import require
from shortft.factory.config import PART_NAMES, PretrainConfig
from shortft.factory.flow import pretrain_flow
from shortft.factory.tokenizer import build_tokenizers
from shortft.factory.unet import pretrain_unet
from shortft.factory.vae import pretrain_vae, pretrain_vae_decoder

# `shortft.distill` settings of the shortcut part in the tiny preset (shortcut.tiny): a tiny LoRA in seconds.
TINY_SHORTCUT = dict(num_steps=10, segments=2, batch_size=2, rank=4, pool=4, steps=3, time_budget=0)


def distill_part(cfg: PretrainConfig, model: str, preset: str, out: str, part: str) -> Path:
    """`shortft distill --preset PRESET` on the model folder just built, written as cfg.root/OUT (fp16)."""
    from shortft.config import build
    from shortft.distill import DISTILL_PRESETS, DistillConfig, distill

    overrides = {"model": str(require(cfg.root / model, part)), "out": str(cfg.root / out),
                 "work_dir": str(cfg.work / out.removesuffix(".safetensors")), "seed": cfg.seed}
    if cfg.shortcut.tiny:
        overrides.update(TINY_SHORTCUT)
    return distill(build(DistillConfig, DISTILL_PRESETS, preset, overrides=overrides))


def pretrain_shortcut(cfg: PretrainConfig) -> Path:
    """The world's 4-segment shortcut: the recipe of the shipped file (docs/distill.md) on model/."""
    return distill_part(cfg, "model", "world", "shortcut.safetensors", "unet")


def pretrain_flow_shortcut(cfg: PretrainConfig) -> Path:
    """The flow world's 4-segment shortcut on flow-model/ (docs/world.md)."""
    return distill_part(cfg, "flow-model", "world-flow", "flow-shortcut.safetensors", "flow")


PARTS = {  # in the order of PART_NAMES
    "tokenizer": build_tokenizers,
    "vae": pretrain_vae,
    "clip": pretrain_clip,
    "unet": pretrain_unet,
    "vae_decoder": pretrain_vae_decoder,
    "shortcut": pretrain_shortcut,
    "flow": pretrain_flow,
    "flow_shortcut": pretrain_flow_shortcut,
}


def run_pretrain(cfg: PretrainConfig, part: str = "all") -> None:
    """Build one part of `PARTS`, or "all" of them in order."""
    if part != "all" and part not in PARTS:
        raise ConfigError(f"unknown part {part!r}; choose from {', '.join(PART_NAMES)}, all")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    for name, build_part in PARTS.items():
        if part in (name, "all"):
            build_part(cfg)
    print(f"pretrain {part}: {time.time() - t0:.0f} s")

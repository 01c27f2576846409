"""`PretrainConfig`: the settings of `shortft world pretrain`, one section per part.

Built by shortft.config's machinery (`vae.steps=500` or `--vae.steps 500` on the command line; unknown
keys, wrong types and values outside a choice are `ConfigError`s). Two presets: "shipped", exactly the
recipe of the assets in src/shortft/world/assets, and "tiny", tiny networks and a few steps, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shortft import config
from shortft.errors import ConfigError
from shortft.world import ASSETS


@dataclass
class VAEConfig:
    tiny: bool = False  # tiny network (block widths 8, 8, 8, 8) for tests; the shipped VAE has 16, 32, 64, 64
    steps: int = 3000  # optimiser steps; the shape read back from reconstructions still rose at 1,500
    batch: int = 16  # images per step; small batches trained faster than 32 per wall-clock minute
    lr: float = 1e-3  # peak learning rate (after the warm-up), cosine-decayed to lr_min
    lr_min: float = 2e-4  # learning rate at the last step
    warmup: int = 100  # linear warm-up steps
    object_weight: float = 8.0  # extra loss weight on object pixels (also in the decoder refinement): the background is trivial
    kl: float = 1e-6  # KL weight: keeps the latent scale bounded; the reconstruction decodes the posterior mean
    random_colour: float = 0.5  # share of images (also in the decoder refinement) whose object gets a random RGB colour (never one read as a held-out pair), so the codec does not tie shape to colour
    scale_images: int = 1024  # train images whose posterior means set the scaling factor (1 / their std, as SD's 0.18215)
    readback_every: int = 250  # steps between logs of the shape read back from reconstructions; 0 = never
    checkpoint_every: int = 250  # steps between checkpoints in work_dir/vae (a rerun resumes there); 0 = never


@dataclass
class DecoderConfig:
    steps: int = 2000  # decoder-only steps on the saved VAE, encoder (the latent space) frozen: decodes the UNet's off-manifold latents cleanly
    batch: int = 16  # images per step
    lr: float = 4e-4  # learning rate at step 0 (no warm-up), cosine-decayed to lr_min
    lr_min: float = 4e-5  # learning rate at the last step
    noise: float = 0.1  # on every other step the decoder reads mean + noise x (latent std) x N(0, 1): slightly-off latents, as the UNet makes them
    readback_every: int = 250  # steps between logs of the shape read back from reconstructions; 0 = never
    checkpoint_every: int = 250  # steps between checkpoints in work_dir/vae_decoder; 0 = never


@dataclass
class UNetConfig:
    tiny: bool = False  # tiny UNet (widths 8, 16, 16) and joint text tower for tests; the shipped UNet has 64, 128, 128
    text: Literal["joint", "clip", "clip-tuned"] = "clip-tuned"  # the UNet's text encoder: joint (a fresh CLIPTextModel trained with it), clip (the world CLIP's text tower, frozen, as SD freezes OpenAI CLIP's) or clip-tuned (that tower, trained with the UNet)
    steps: int = 5000  # optimiser steps
    batch: int = 32  # latents per step; half the step time of 64 on 2 shared cores: more updates in the same time
    lr: float = 5e-4  # peak AdamW learning rate (after the warm-up), cosine-decayed to lr_min
    lr_min: float = 5e-5  # learning rate at the last step
    warmup: int = 100  # linear warm-up steps
    text_lr_scale: float = 0.1  # with text=clip-tuned: the text tower's learning rate relative to the UNet's
    drop_caption: float = 0.1  # share of empty captions, so classifier-free guidance works
    ema: float = 0.999  # EMA decay of the shipped weights
    highnoise: float = 5.0  # loss weight 1 + min(1/SNR, this) favours high-noise (layout) steps; 0 = plain epsilon MSE
    pool: int = 10000  # train scenes encoded once up front (posterior means) that every batch is drawn from
    checkpoint_every: int = 200  # steps between checkpoints in work_dir/unet (a rerun resumes there); 0 = never


@dataclass
class CLIPConfig:
    tiny: bool = False  # tiny network (width 16, one layer per tower) for tests; the shipped one: text width 48, ViT width 96
    steps: int = 1000  # optimiser steps
    batch: int = 64  # images per step, each with its caption
    lr: float = 1e-3  # peak AdamW learning rate (after the warm-up), cosine-decayed to lr_min
    lr_min: float = 5e-5  # learning rate at the last step
    warmup: int = 100  # linear warm-up steps
    hard_negatives: int = 2  # one-attribute-wrong captions per image in each batch


@dataclass
class FlowConfig:
    tiny: bool = False  # tiny transformer (1 layer, width 16) for tests; the shipped one: 8 layers, width 128
    steps: int = 8000  # optimiser steps (the shipped flow-model/ was trained for 8,000)
    batch: int = 32  # latents per step
    lr: float = 5e-4  # peak AdamW learning rate (after the warm-up), cosine-decayed to lr_min
    lr_min: float = 5e-5  # learning rate at the last step
    warmup: int = 100  # linear warm-up steps
    text_lr_scale: float = 0.1  # CLIP-L's (the world CLIP tower's) learning rate relative to the transformer's
    drop_caption: float = 0.1  # share of empty captions, so classifier-free guidance works
    ema: float = 0.999  # EMA decay of the shipped weights
    shift: float = 3.0  # the flow scheduler's shift (SD 3's), used for training times and sampling alike
    pool: int = 10000  # train scenes encoded once up front (posterior means) that every batch is drawn from
    checkpoint_every: int = 200  # steps between checkpoints in work_dir/flow (a rerun resumes there); 0 = never


@dataclass
class ShortcutConfig:
    tiny: bool = False  # a 3-step distillation of a 2-segment rank-4 LoRA (tests) instead of `shortft distill --preset world` as shipped


@dataclass
class PretrainConfig:
    out: str = ""  # asset root: writes model/, clip/ and shortcut.safetensors below it; "" = the shipped assets (src/shortft/world/assets)
    work_dir: str = "runs/world-pretrain"  # checkpoints of the long parts and the shortcut's distillation folder (never committed)
    seed: int = 0  # every data stream and initialisation derives from it
    threads: int = 0  # torch CPU threads; 0 = torch's default
    vae: VAEConfig = field(default_factory=VAEConfig)  # the VAE (encoder + decoder)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # the VAE decoder refinement
    unet: UNetConfig = field(default_factory=UNetConfig)  # the UNet and its text encoder
    clip: CLIPConfig = field(default_factory=CLIPConfig)  # the CLIP preference model
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)  # the shortcut LoRA (shortft distill)
    flow: FlowConfig = field(default_factory=FlowConfig)  # the flow world's transformer and CLIP-L (flow-model/)

    @property
    def root(self) -> Path:
        """The asset root `out` as a path."""
        return Path(self.out) if self.out else ASSETS

    @property
    def work(self) -> Path:
        return Path(self.work_dir)


# The parts in the order `--part all` builds them (shortft.factory.pretrain.PARTS holds their functions).
PART_NAMES = ("tokenizer", "vae", "clip", "unet", "vae_decoder", "shortcut", "flow", "flow_shortcut")

PRETRAIN_PRESETS: dict[str, dict] = {
    "shipped": {},  # the defaults above: the recipe of the shipped assets
    "tiny": {  # tiny networks and a few steps: every part in seconds (tests); no checkpoints unless asked
        "vae.tiny": True, "vae.steps": 4, "vae.batch": 4, "vae.warmup": 1, "vae.scale_images": 64,
        "vae.readback_every": 0, "vae.checkpoint_every": 0,
        "decoder.steps": 2, "decoder.batch": 4, "decoder.readback_every": 0, "decoder.checkpoint_every": 0,
        "unet.tiny": True, "unet.steps": 4, "unet.batch": 4, "unet.pool": 16, "unet.warmup": 1,
        "unet.checkpoint_every": 0,
        "clip.tiny": True, "clip.steps": 4, "clip.batch": 8, "clip.warmup": 1,
        "shortcut.tiny": True,
        "flow.tiny": True, "flow.steps": 4, "flow.batch": 4, "flow.pool": 16, "flow.warmup": 1,
        "flow.checkpoint_every": 0,
    },
}

_AT_LEAST_ONE = {"batch", "pool", "scale_images", "shift"}
_FRACTIONS = {"random_colour", "drop_caption", "ema"}


def validate(cfg: PretrainConfig) -> None:
    """Counts and rates must be >= 0 (sizes >= 1), shares within [0, 1]."""
    for key, value in config.flatten(config.to_dict(cfg)).items():
        name = key.rpartition(".")[2]
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if name in _AT_LEAST_ONE and value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
        if name in _FRACTIONS and value > 1:
            raise ConfigError(f"{key} must be within [0, 1], got {value}")


def build_config(preset: str = "shipped", overrides: dict | None = None) -> PretrainConfig:
    """The preset with `overrides` (`{"vae.steps": 500}`) on top, every value checked."""
    cfg = config.build(PretrainConfig, PRETRAIN_PRESETS, preset, overrides=overrides)
    validate(cfg)
    return cfg

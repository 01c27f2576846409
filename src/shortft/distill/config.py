"""`DistillConfig`: the settings of `shortft distill`, its named recipes, and the checks of their values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shortft.config import TrainConfig, coerce, to_dict
from shortft.errors import ConfigError
from shortft.presets import TRAIN_PRESETS, default_preset

STUDENT = "shortcut"  # the adapter being trained; ShortFT loads the output file under this name
# targets="all" adds these UNet layers to the family's attention + feed-forward ones: the CFG-free student must
# also learn what guidance adds, and they give it more room (UNet families only)
UNET_EXTRA = ("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj")


def lora_targets(cfg: DistillConfig, fmt) -> tuple[str, ...]:
    """The layers the student LoRA goes on, for a family's LoraFormat `fmt`."""
    if cfg.targets == "attn_ff":
        return fmt.targets
    if fmt.component != "unet":
        raise ConfigError(f"targets={cfg.targets!r} adds UNet layers; this model is a {fmt.component}: use attn_ff")
    return fmt.targets + UNET_EXTRA


@dataclass
class DistillConfig:
    model: str = "world"  # hub id, local diffusers folder, or "world" (the embedded model)
    out: str = ""  # output LoRA file (.safetensors, diffusers format)
    segments: int = 4  # k: shortcut segments (ShortFT: 4)
    num_steps: int = 0  # sampling grid of the teacher and of ShortFT's chain (edges snap to it); 0 = the model's (SD 1.5 50, SD 3 28)
    steps: int = 2000  # optimiser steps
    batch_size: int = 8  # rows per segment per step (every step trains all k segments)
    lr: float = 1e-3  # AdamW peak learning rate (reached after --warmup steps)
    decay: Literal["none", "cosine"] = "none"  # learning rate after warm-up: constant, or a cosine to 0 at --steps or --time-budget, whichever ends first
    rank: int = 8  # LoRA rank (file size grows linearly)
    targets: Literal["attn_ff", "all"] = "attn_ff"  # LoRA layers: attention + feed-forward (as Hyper-SD), or all (+ resnets, proj)
    guidance: float = 0.0  # teacher CFG; 0 = the model's ShortFT default (world 5, other models 7.5)
    student_guidance: float = 1.0  # CFG of the student; 1 = conditional-only (ShortFT's shortcut_guidance default)
    prompts: str = ""  # prompt set or file; "" = world-train on the world model, simple-animals otherwise
    pool: int = 256  # teacher trajectories sampled up front (memory: pool x (num_steps+1) latents)
    noised_fraction: float = 0.0  # share of rows that re-noise a clean teacher sample (the teacher then runs live to the edge) (the shipped recipe: 0)
    anchor_fraction: float = 0.0  # share of steps whose rows start where jumps are taken (ShortFT's segment start or the previous edge, as k-step sampling does) instead of any grid point of the segment
    warmup: int = 50  # linear learning-rate warm-up steps
    seed: int = 0  # seeds the LoRA init, the pool's prompts and noises, and every draw
    time_budget: float = 0.0  # stop training after this many seconds (0 = no limit); the file is still written
    checkpoint_every: int = 50  # steps between checkpoints in work_dir (an interrupted run resumes there)
    work_dir: str = ""  # checkpoint, pool and log; "" = runs/distill-<out stem>
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # frozen weights (the LoRA trains in fp32)
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # tensors of the written file (the world's shortcut ships in fp16)
    device: str = ""  # "" = cuda if available, else cpu
    threads: int = 0  # CPU threads for torch; 0 = torch's default (on a shared CPU, 1 is often faster)


# Named recipes (`shortft distill --preset NAME`). "world" is exactly the recipe of the shipped world
# shortcut (src/shortft/world/assets/shortcut.safetensors); `shortft world pretrain --part shortcut` runs it.
DISTILL_PRESETS: dict[str, dict] = {
    "default": {},
    "world": dict(model="world", prompts="world-train", guidance=5.0, student_guidance=5.0, steps=10000,
                  time_budget=3000.0, pool=1024, decay="cosine", noised_fraction=0.0, anchor_fraction=0.5,
                  save_dtype="fp16"),
}
# The flow world's shortcut (src/shortft/world/assets/flow-shortcut.safetensors, `--part flow_shortcut`): the
# same recipe on flow-model/, on its 28-step grid; its time budget is what that rebuild ran (docs/world.md).
DISTILL_PRESETS["world-flow"] = dict(DISTILL_PRESETS["world"], model="world-flow", time_budget=1200.0)

# Config fields that may change between an interrupted run and its resume.
RESUMABLE = {"steps", "time_budget", "checkpoint_every", "out", "work_dir", "device", "threads", "save_dtype"}

# (lowest, highest) allowed value of each numeric field; None = no bound.
RANGES = {"segments": (1, None), "num_steps": (0, None), "steps": (0, None), "batch_size": (1, None),
          "lr": (0, None), "rank": (1, None), "guidance": (0, None), "student_guidance": (0, None),
          "pool": (1, None), "noised_fraction": (0, 1), "anchor_fraction": (0, 1), "warmup": (0, None),
          "time_budget": (0, None), "checkpoint_every": (1, None), "threads": (0, None)}


def validate(cfg: DistillConfig, training: bool = True) -> None:
    """ConfigError naming the first bad value: a wrong type, not one of a field's choices, or out of its
    range (the message names the valid choices or range); training also needs `out`."""
    for key, value in to_dict(cfg).items():
        coerce(DistillConfig, key, value)
    for key, (lo, hi) in RANGES.items():
        value = getattr(cfg, key)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            valid = f"{lo} <= {key} <= {hi}" if hi is not None else f"{key} >= {lo}"
            raise ConfigError(f"{key}={value} is out of range; valid: {valid}")
    if training and not cfg.out:
        raise ConfigError("distill needs --out FILE.safetensors")


def model_defaults(model: str) -> dict:
    """ShortFT's own defaults for this model: its chain's steps and CFG scale, and its prompt sets."""
    preset = {**to_dict(TrainConfig()), **TRAIN_PRESETS[default_preset(model)]}
    return {k: preset[k] for k in ("num_steps", "guidance", "prompts", "eval_prompts")}

"""One typed training config, its presets, and strict parsing (unknown keys and wrong types are errors).

Precedence: preset < --config file.yaml < command-line `--key value` / `key=value`. The preset defaults
to "world" when the model is the embedded world and "sd15" for any other model.
"""

from __future__ import annotations

import difflib
import inspect
import io
import tokenize
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A bad key or value; the CLI prints it on one line and exits with status 2."""


@dataclass
class TrainConfig:
    # --- model --------------------------------------------------------------------------------------------
    model: str = "world"  # hub id, local diffusers folder, or "world" (the embedded small model)
    shortcut: str = ""  # shortcut LoRA: local file or repo_id/filename; "" = the world's shipped shortcut
    shortcut_scale: float = 1.0  # multiplier on the shortcut LoRA (Hyper-SD's N-step LoRAs use 1.0)
    shortcut_guidance: float = 1.0  # CFG of shortcut steps; Hyper-SD is distilled without CFG, so 1 (off)
    dtype: str = "auto"  # storage dtype of the frozen weights: fp32, fp16, bf16; auto = fp16 on a GPU, else fp32
    mixed_precision: str = "auto"  # accelerate autocast: no, fp16, bf16; auto = fp16 on a GPU, else no (LoRAs stay fp32)
    cpu: bool = False  # force the CPU even where a GPU is present
    # --- method -------------------------------------------------------------------------------------------
    method: str = "shortft"  # a name from shortft.methods.METHODS
    num_steps: int = 50  # DDIM sampling steps of the original chain (the paper: 50)
    guidance: float = 5.0  # CFG scale of the original chain (SD 1.5: 7.5 as in DRaFT)
    lora_rank: int = 8  # LoRA rank on attention + feed-forward layers (paper: 128 on SD 1.5)
    lora_alpha: float = 8.0  # LoRA alpha; the update is scaled by alpha / rank
    segments: int = 4  # ShortFT: k segments / LoRAs / stages (paper: 4)
    s1_grad_steps: int = 2  # ShortFT: steps of segment 1 kept in the graph at stage 1 (7-8 calls total)
    stage_fractions: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])  # ShortFT: share of max_steps per stage
    tlora: bool = True  # ShortFT: timestep-aware stacked LoRAs (false = one LoRA at every step, ablation)
    progressive: bool = True  # ShortFT: k-stage progressive training (false = stage-1 chain throughout)
    inner_weights: str = "base"  # ShortFT: weights at inner timesteps of segments 2..k: base, prev, stack
    draft_k: int = 1  # DRaFT-K: last steps that carry gradient
    lv_copies: int = 2  # DRaFT-LV: extra re-noised copies of the last step (n)
    alignprop_cut: str = "gaussian"  # AlignProp truncation draw: gaussian (42 +- 5 of 50), uniform, fixed
    drtune_k: int = 5  # DRTune: equally spaced steps trained with detached input
    drtune_m: int = 10  # DRTune: early stop drawn among the last M steps
    refl_window: int = 10  # ReFL: gradient step drawn among the last N steps (ImageReward: 10 of 40)
    # --- reward -------------------------------------------------------------------------------------------
    reward: str = "world_clip"  # registered name, weighted sum "a=1,b=2", or package.module:function
    reward_paths: str = ""  # where reward weights live: "hpsv2=/path/HPS_v2_compressed.pt,pickscore=/dir"
    reg_weight: float = 0.0  # lambda of the paper's HPS v2 + PickScore (1:10) regulariser; 0 = off
    # --- data ---------------------------------------------------------------------------------------------
    prompts: str = "world-train"  # training prompts: a built-in set name or a text file, one per line
    eval_prompts: str = "world-heldout"  # prompts for grids and before/after figures (held out)
    eval_count: int = 32  # number of eval prompts (one fixed seed each) for the before/after summary
    # --- optimisation -------------------------------------------------------------------------------------
    max_steps: int = 120  # optimiser steps (world: ~4.5 min on 2 CPU cores)
    batch_size: int = 4  # prompts per rollout per process
    grad_accum: int = 1  # rollouts accumulated per optimiser step
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay (DRaFT: 0.1)
    time_budget: float = 0.0  # stop after this many seconds of training (0 = no limit); equal-compute benchmarks
    unet_call_budget: int = 0  # stop after this many UNet calls in rollouts (0 = no limit); equal-call benchmarks
    max_grad_norm: float = 1.0  # gradient-norm clipping; a non-finite norm skips the step
    seed: int = 0  # seeds LoRA init, prompts, noise and every random draw of the methods
    # --- output -------------------------------------------------------------------------------------------
    run_dir: str = ""  # run folder; "" = runs/<method>-<date>-<time>
    log_every: int = 1  # steps between TensorBoard scalars
    grid_every: int = 0  # steps between image grids of the eval prompts; 0 = before and after only
    checkpoint_every: int = 10  # steps between checkpoints (the final one is always written)
    wandb: bool = False  # also log to Weights & Biases (imported only then)
    resume: str = ""  # run folder to continue from its latest checkpoint


PRESETS: dict[str, dict] = {
    # The embedded world on a laptop CPU: the zero-argument `shortft train`.
    "world": {"shortcut_guidance": 5.0},  # the world's shortcut is distilled with a CFG-5 student (docs/world.md)
    # Stable Diffusion 1.5 as in the paper (GPU): Hyper-SD 4-step LoRA as the shortcut, HPS v2 reward.
    "sd15": dict(model="runwayml/stable-diffusion-v1-5",
                 shortcut="ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors",
                 guidance=7.5, lora_rank=128, lora_alpha=128.0, reward="hpsv2", prompts="simple-animals",
                 eval_prompts="simple-animals", eval_count=8, max_steps=2000, batch_size=2, lr=1e-4,
                 grid_every=100, checkpoint_every=100),
}
PRESETS["sd15-tiny"] = {**PRESETS["sd15"], "max_steps": 10}  # a quick end-to-end check on one GPU

FIELDS = {f.name: f for f in fields(TrainConfig)}


def field_comments() -> dict[str, str]:
    """The trailing comment of every config field: the CLI's help text (one source of truth)."""
    src = inspect.getsource(TrainConfig)
    out, current = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in FIELDS:
            current = tok.string
        elif tok.type == tokenize.COMMENT and current:
            out[current] = tok.string.lstrip("# ")
            current = None
        elif tok.type == tokenize.NEWLINE:
            current = None
    return out


def _field_type(name: str):
    return typing.get_type_hints(TrainConfig)[name]


def coerce(name: str, value):
    """Convert `value` (a string from the command line, or a YAML value) to field `name`'s type."""
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(FIELDS)}"
        raise ConfigError(f"unknown config key {name!r}{hint}")
    typ = _field_type(name)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typing.get_origin(typ) is list:
            items = value if isinstance(value, list) else [v for v in str(value).strip("[]").split(",") if v.strip()]
            return [float(v) for v in items]
        if typ is int:
            if isinstance(value, float) or isinstance(value, bool):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (ValueError, TypeError):
        pass
    tname = typ.__name__ if isinstance(typ, type) else str(typ)
    raise ConfigError(f"config key {name!r} expects {tname}, got {value!r}")


def parse_overrides(items: list[str]) -> dict:
    """['lr=1e-4', 'tlora=false'] -> {'lr': 1e-4, 'tlora': False} (typed; errors name the key)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} is not key=value")
        out[key.strip().replace("-", "_")] = coerce(key.strip().replace("-", "_"), value)
    return out


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
    return {k: coerce(k, v) for k, v in data.items()}


def build_config(preset: str | None = None, file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Compose preset, file and overrides into a validated TrainConfig."""
    overrides = dict(overrides or {})
    from_file = load_yaml(file) if file else {}
    model = overrides.get("model", from_file.get("model", "world"))
    if preset is None:
        preset = "world" if model == "world" else "sd15"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **from_file, **overrides}
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


CHOICES = {"dtype": ("auto", "fp32", "fp16", "bf16"), "mixed_precision": ("auto", "no", "fp16", "bf16"),
           "inner_weights": ("base", "prev", "stack"), "alignprop_cut": ("gaussian", "uniform", "fixed")}


def validate(cfg: TrainConfig) -> None:
    """Cheap checks that need no model: choices, positive sizes, known method and reward names."""
    from shortft.methods import METHODS
    from shortft.rewards import validate_reward_spec

    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(choices)}")
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    try:
        validate_reward_spec(cfg.reward)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for key in ("num_steps", "batch_size", "grad_accum", "max_steps", "lora_rank", "segments", "eval_count"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.method == "drtune" and not (1 <= cfg.drtune_m <= cfg.num_steps and cfg.drtune_k <= cfg.num_steps - cfg.drtune_m + 1):
        raise ConfigError(f"drtune_k={cfg.drtune_k}, drtune_m={cfg.drtune_m} do not fit num_steps={cfg.num_steps}")
    if cfg.method == "shortft" and len(cfg.stage_fractions) != cfg.segments:
        raise ConfigError(f"stage_fractions has {len(cfg.stage_fractions)} entries but segments={cfg.segments}")


def to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def from_dict(data: dict) -> TrainConfig:
    """Rebuild a saved config (a run folder's config.yaml) strictly."""
    return TrainConfig(**{k: coerce(k, v) for k, v in data.items()})

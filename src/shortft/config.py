"""The config system: typed dataclasses with a comment on every field, presets, and strict parsing.

Every command's settings (`TrainConfig` here, `DistillConfig`, the asset factory's `PretrainConfig`)
are plain dataclasses. One nesting level is allowed: a field whose type is itself a dataclass is a
section, addressed with a dot (`vae.steps=500`). The machinery below is shared by all of them:

- `field_help(cls)`: each field's trailing comment, the `--help` text (one source of truth);
- `coerce(cls, key, value)`: a command-line string or YAML value to the field's type, strictly:
  unknown keys, wrong types, values outside a `Literal[...]` and non-finite numbers are `ConfigError`s
  that name the valid choices;
- `build(cls, presets, preset, file, overrides)`: preset < YAML file < command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import math
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shortft.errors import ConfigError
from shortft.presets import TRAIN_PRESETS, default_preset


# --- the machinery ---------------------------------------------------------------------------------------------
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_section(typ) -> bool:
    return dataclasses.is_dataclass(typ)


def keys(cls) -> dict[str, type]:
    """Every settable key of `cls` with its type; section fields appear as `section.field`."""
    out = {}
    for name, typ in _hints(cls).items():
        if name.startswith("_"):
            continue
        if _is_section(typ):
            out.update({f"{name}.{k}": t for k, t in keys(typ).items()})
        else:
            out[name] = typ
    return out


def field_help(cls) -> dict[str, str]:
    """The trailing comment of every field (sections included, as `section.field`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out, current = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and current is None:
            current = tok.string
        elif tok.type == tokenize.COMMENT and current:
            out[current] = tok.string.lstrip("# ")
            current = None
        elif tok.type == tokenize.NEWLINE:
            current = None
    for name, typ in _hints(cls).items():
        if _is_section(typ):
            out.update({f"{name}.{k}": v for k, v in field_help(typ).items()})
    return out


def _type_name(typ) -> str:
    if typing.get_origin(typ) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(typ)))
    if typing.get_origin(typ) is list:
        return f"list of {typing.get_args(typ)[0].__name__}"
    return getattr(typ, "__name__", str(typ))


def _scalar(typ, value):
    """Convert one value to `typ` (bool, int, float, str); ValueError/TypeError when it is not one."""
    if isinstance(value, bool) and typ is not bool:
        raise TypeError
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError
    if typ is int:
        if isinstance(value, float):
            raise TypeError
        return int(value)
    if typ is float:
        number = float(value)
        if not math.isfinite(number):
            raise OverflowError
        return number
    if typ is str:
        if not isinstance(value, str | int | float):
            raise TypeError
        return str(value)
    raise TypeError


def coerce(cls, key: str, value):
    """`value` (a command-line string or a YAML value) as the type of field `key` of `cls`."""
    known = keys(cls)
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(known)}"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    typ = known[key]
    if typing.get_origin(typ) is Literal:
        choices = typing.get_args(typ)
        if str(value) not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
        return str(value)
    try:
        if typing.get_origin(typ) is list:
            inner = typing.get_args(typ)[0]
            items = value if isinstance(value, list) else [v for v in str(value).strip("[]").split(",") if v.strip()]
            return [_scalar(inner, v.strip() if isinstance(v, str) else v) for v in items]
        return _scalar(typ, value)
    except OverflowError:
        raise ConfigError(f"config key {key!r} needs a finite number, got {value!r}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"config key {key!r} expects {_type_name(typ)}, got {value!r}") from None


def make(cls, values: dict):
    """An instance of `cls` from already-coerced flat values (`section.field` keys for sections)."""
    own, sections = {}, {}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if dot:
            sections.setdefault(head, {})[rest] = value
        else:
            own[key] = value
    for name, typ in _hints(cls).items():
        if _is_section(typ):
            own[name] = make(typ, sections.pop(name, {}))
    return cls(**own)


def flatten(data: dict, prefix: str = "") -> dict:
    """{'vae': {'steps': 5}, 'seed': 0} -> {'vae.steps': 5, 'seed': 0}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def from_dict(cls, data: dict):
    """Rebuild a saved config (nested or flat keys) strictly."""
    return make(cls, {k: coerce(cls, k, v) for k, v in flatten(data).items()})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_overrides(cls, items: list[str]) -> dict:
    """['lr=1e-4', 'tlora=false'] -> {'lr': 1e-4, 'tlora': False} (typed; errors name the key)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} is not key=value")
        key = key.strip().replace("-", "_")
        out[key] = coerce(cls, key, value)
    return out


def load_yaml(cls, path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values")
    return {k: coerce(cls, k, v) for k, v in flatten(data).items()}


def build(cls, presets: dict[str, dict], preset: str, file: str | None = None, overrides: dict | None = None):
    """preset < YAML file < overrides, every value coerced strictly."""
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
    values = {**presets[preset], **(load_yaml(cls, file) if file else {}), **(overrides or {})}
    return make(cls, {k: coerce(cls, k, v) for k, v in values.items()})


def add_arguments(parser, cls, extra_help: dict[str, str] | None = None) -> None:
    """A `--key` flag for every key of `cls` (`--section.key` for sections), help from the comments,
    and trailing `key=value` overrides; `overrides_from_args` reads both back."""
    helps, extra = field_help(cls), extra_help or {}
    for key, typ in keys(cls).items():
        text = helps.get(key, "")
        if typing.get_origin(typ) is Literal:
            text += f" ({'|'.join(typing.get_args(typ))})"
        parser.add_argument(f"--{key.replace('_', '-')}", dest=f"cfg:{key}", metavar="V",
                            help=f"{text} {extra.get(key, '')}".strip())
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=1e-4")


def overrides_from_args(cls, args) -> dict:
    out = {k[4:]: coerce(cls, k[4:], v) for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    out.update(parse_overrides(cls, args.overrides))
    return out


# --- training ---------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    # --- model --------------------------------------------------------------------------------------------
    model: str = "world"  # hub id, local diffusers folder, "world" or "world-flow" (the embedded small models)
    shortcut: str = ""  # shortcut LoRA: local file or repo_id/filename; "" = the embedded model's shipped one; "none" = ShortFT with the base model's own one-step jump
    shortcut_scale: float = 1.0  # multiplier on the shortcut LoRA (Hyper-SD's N-step LoRAs use 1.0)
    shortcut_guidance: float = 1.0  # CFG of shortcut steps; Hyper-SD is distilled without CFG, so 1 (off)
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # storage dtype of the frozen weights; auto = fp16 on a GPU, else fp32
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # accelerate autocast; auto = fp16 on a GPU, else no (LoRAs stay fp32)
    cpu: bool = False  # force the CPU even where a GPU is present
    resolution: int = 0  # image side in pixels; 0 = the model's own (SD 1.5 512, SDXL and SD 3 1024)
    # --- memory levers (each leaves the gradient as it is, to float precision) ---------------------------------
    vae_checkpoint: bool = False  # recompute the VAE decoder's activations in backward: most of the peak at 512-1024 px, for about one more decode per step
    vae_slicing: bool = False  # decode the batch one image at a time: the decoder's peak of one image instead of the batch's, a little slower
    checkpoint_calls: bool = False  # recompute every in-graph network call in backward (ShortFT's too; the paper needs none): less memory for about one more forward per call
    reward_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # reward model weights; fp16/bf16 halve their memory on a GPU (scores and gradients change at that precision)
    # --- method -------------------------------------------------------------------------------------------
    method: str = "shortft"  # the fine-tuning method
    num_steps: int = 50  # DDIM sampling steps of the original chain (the paper: 50)
    guidance: float = 5.0  # CFG scale of the original chain (SD 1.5: 7.5 as in DRaFT)
    lora_rank: int = 8  # LoRA rank on attention + feed-forward layers (paper: 128 on SD 1.5)
    lora_alpha: float = 8.0  # LoRA alpha; the update is scaled by alpha / rank
    lora_layers: Literal["attn_ff", "attn"] = "attn_ff"  # layers the LoRAs wrap: attention + feed-forward (the paper), or attention only
    segments: int = 4  # ShortFT: k segments / LoRAs / stages (paper: 4)
    s1_grad_steps: int = 2  # ShortFT: steps of segment 1 kept in the graph at stage 1 (7-8 calls total)
    stage_fractions: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])  # ShortFT: share of max_steps per stage
    tlora: bool = True  # ShortFT: timestep-aware stacked LoRAs (false = one LoRA at every step, ablation)
    progressive: bool = True  # ShortFT: k-stage progressive training (false = stage-1 chain throughout)
    inner_weights: Literal["base", "prev", "stack"] = "base"  # ShortFT: weights at inner timesteps of segments 2..k
    draft_k: int = 1  # DRaFT-K: last steps that carry gradient
    lv_copies: int = 2  # DRaFT-LV: extra re-noised copies of the last step (n)
    alignprop_cut: Literal["gaussian", "uniform", "fixed"] = "gaussian"  # AlignProp truncation draw: gaussian = 42 +- 5 of 50
    drtune_k: int = 5  # DRTune: equally spaced steps trained with detached input
    drtune_m: int = 10  # DRTune: early stop drawn among the last M steps
    refl_window: int = 10  # ReFL: gradient step drawn among the last N steps (ImageReward: 10 of 40)
    leap_range: float = 1.0  # LeapAlign: steps k < j, a uniform distinct pair among this last share of the chain (paper: 1)
    leap_discount: float = 0.3  # LeapAlign: alpha, share kept of the nested gradient through x_j (paper: 0.3; 0 = cut)
    leap_tau: float = 0.1  # LeapAlign: floor tau of the distances in w = 1 / (max(d_j, tau) + max(d_0, tau)) (paper: 0.1)
    # --- reward -------------------------------------------------------------------------------------------
    reward: str = "world_clip"  # registered name, weighted sum "a=1,b=2", or package.module:function
    reward_paths: str = ""  # where reward weights live: "hpsv2=/path/HPS_v2_compressed.pt,pickscore=/dir"
    reg_weight: float = 0.0  # lambda of the paper's HPS v2 + PickScore (1:10) regulariser; 0 = off
    # --- data ---------------------------------------------------------------------------------------------
    prompts: str = "world-train"  # training prompts: a built-in set name or a text file, one per line
    eval_prompts: str = "world-heldout"  # prompts for grids and before/after figures (held out)
    eval_count: int = 32  # number of eval prompts (one fixed seed each) for the before/after summary
    # --- optimisation -------------------------------------------------------------------------------------
    max_steps: int = 120  # optimiser steps
    batch_size: int = 4  # prompts per rollout per process
    grad_accum: int = 1  # rollouts accumulated per optimiser step
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay (DRaFT: 0.1)
    time_budget: float = 0.0  # stop after this many seconds of training (0 = no limit); equal-compute benchmarks
    unet_call_budget: int = 0  # stop after this many UNet calls in rollouts (0 = no limit); equal-call benchmarks
    max_grad_norm: float = 1.0  # gradient-norm clipping; a non-finite norm or loss skips the step
    max_skipped_steps: int = 5  # this many non-finite steps in a row stop the run (the checkpoint before them is kept)
    seed: int = 0  # seeds LoRA init, prompts, noise and every random draw of the methods
    # --- output -------------------------------------------------------------------------------------------
    run_dir: str = ""  # run folder; "" = runs/<method>-<date>-<time>
    log_every: int = 1  # steps between TensorBoard scalars
    grid_every: int = 0  # steps between image grids of the eval prompts; 0 = before and after only
    checkpoint_every: int = 10  # steps between checkpoints (the final one is always written)
    snapshots: list[float] = field(default_factory=list)  # fractions of the run's budget at which the LoRAs are also saved to snapshots/<fraction>/ (held-out curves)
    wandb: bool = False  # also log to Weights & Biases (imported only then)
    resume: str = ""  # run folder to continue from its latest checkpoint


def build_config(preset: str | None = None, file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Compose preset, file and overrides into a validated TrainConfig. With `resume` (and no file) the run
    folder's own config.yaml is the base, so `shortft train --resume RUN_DIR` needs nothing else."""
    overrides = dict(overrides or {})
    saved = Path(overrides.get("resume") or "-", "config.yaml")
    if file is None and overrides.get("resume") and saved.is_file():
        cfg = make(TrainConfig, {**load_yaml(TrainConfig, str(saved)), **overrides})
    else:
        model = overrides.get("model") or (load_yaml(TrainConfig, file).get("model") if file else None) or "world"
        cfg = build(TrainConfig, TRAIN_PRESETS, preset or default_preset(model), file, overrides)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need no model: the method and reward names (from their registries), positive sizes,
    and each method's own constraints (`Method.check`)."""
    from shortft.methods import METHODS
    from shortft.rewards import validate_reward_spec

    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    validate_reward_spec(cfg.reward)
    for key in ("num_steps", "batch_size", "grad_accum", "max_steps", "lora_rank", "segments", "eval_count",
                "checkpoint_every", "log_every", "max_skipped_steps"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("guidance", "shortcut_guidance", "lr", "time_budget", "max_grad_norm", "reg_weight", "weight_decay",
                "resolution"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if any(not 0 < f <= 1 for f in cfg.snapshots):
        raise ConfigError(f"snapshots must be fractions of the budget in (0, 1], got {cfg.snapshots}")
    METHODS[cfg.method].check(cfg)

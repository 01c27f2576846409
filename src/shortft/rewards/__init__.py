"""Reward registry.

A reward is a callable `(images, prompts) -> scores`:
    images  : float tensor (B, 3, H, W) with values in [0, 1], differentiable
    prompts : list of B strings
    scores  : float tensor (B,), higher is better, differentiable w.r.t. `images`

`REWARDS` maps a name to a factory `factory(settings: RewardSettings) -> reward`. The CLI's
`--reward` takes a registered name, a weighted sum (`pickscore=10,hpsv2=2`) or a plug-in
`package.module:function` whose function is itself a reward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Reward = Callable[[torch.Tensor, list[str]], torch.Tensor]


@dataclass
class RewardSettings:
    """Where reward models live and where they run; filled from the training config."""

    device: torch.device | str = "cpu"  # device the reward model runs on
    dtype: torch.dtype = torch.float32  # dtype of frozen reward-model weights
    paths: dict[str, str] = field(default_factory=dict)  # reward name -> hub id / local path of its weights


RewardFactory = Callable[[RewardSettings], Reward]
REWARDS: dict[str, RewardFactory] = {}


def register(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator adding a reward factory to `REWARDS` under `name`."""

    def wrap(factory: RewardFactory) -> RewardFactory:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = factory
        return factory

    return wrap


def check_inputs(images: torch.Tensor, prompts: list[str]) -> None:
    """Raise a clear error for inputs that would give a silently wrong score."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"reward images must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}]")


def _load_plugin(spec: str) -> Reward:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward plug-in {spec!r}: cannot import module {module_name!r} ({err})") from err
    if not hasattr(module, attr):
        raise ValueError(f"reward plug-in {spec!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'pickscore=10,hpsv2=2' -> [('pickscore', 10.0), ('hpsv2', 2.0)]; 'symmetry' -> [('symmetry', 1.0)]."""
    parts = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, weight = item.partition("=")
        try:
            w = float(weight) if eq else 1.0
        except ValueError:
            raise ValueError(f"reward weight {weight!r} in {spec!r} is not a number") from None
        parts.append((name.strip(), w))
    if not parts:
        raise ValueError("empty reward specification")
    return parts


def validate_reward_spec(spec: str) -> None:
    """Check names without loading any model (used by the CLI before anything is written)."""
    _import_builtin_rewards()
    for name, _ in parse_reward_spec(spec):
        if ":" not in name and name not in REWARDS:
            raise ValueError(
                f"unknown reward {name!r}; choose from {sorted(REWARDS)} or give package.module:function"
            )


class WeightedSum:
    """Sum of weighted rewards, each component built once: the paper's Combined reward."""

    def __init__(self, parts: list[tuple[str, float, Reward]]):
        self.parts = parts

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(w * fn(images, prompts) for _, w, fn in self.parts)

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each component's unweighted score, for logging."""
        return {name: fn(images, prompts) for name, _, fn in self.parts}


def build_reward(spec: str, settings: RewardSettings | None = None) -> Reward:
    """Build a reward from a name, a weighted sum `a=w1,b=w2` or a plug-in `package.module:function`."""
    settings = settings or RewardSettings()
    validate_reward_spec(spec)
    parts = parse_reward_spec(spec)
    built = []
    for name, w in parts:
        fn = _load_plugin(name) if ":" in name else REWARDS[name](settings)
        built.append((name, w, fn))
    if len(built) == 1 and built[0][1] == 1.0:
        return built[0][2]
    return WeightedSum(built)


def _import_builtin_rewards() -> None:
    """Import the modules that register the built-in rewards (heavy imports stay inside factories)."""
    from shortft.rewards import symmetry  # noqa: F401

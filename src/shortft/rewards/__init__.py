"""Reward registry.

A reward is a callable `(images, prompts) -> scores`:
    images  : float tensor (B, 3, H, W) with values in [0, 1], differentiable
    prompts : list of B strings
    scores  : float tensor (B,), higher is better, differentiable w.r.t. `images`

`REWARDS` maps a name to a factory `factory(settings: RewardSettings) -> reward`. The CLI's
`--reward` takes a registered name, a weighted sum (`pickscore=10,hpsv2=2`) or a plug-in
`package.module:function` whose function is itself a reward.

Built-in rewards (scales in docs/rewards.md): hpsv2, hpsv2.1 (x100), pickscore, world_clip
(exp(logit_scale) * cosine), aesthetic (1-10), symmetry (-asymmetry), compressibility /
incompressibility (-/+ estimated JPEG q95 kB). `settings.paths[name]` overrides where each finds its
weights; errors about missing or wrong weights are `RewardWeightsError` (a `UserError`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import is_fake

from shortft.errors import ConfigError, RewardError
from shortft.rewards.common import RewardWeightsError  # noqa: F401  (re-exported)

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
    if not images.is_floating_point():
        raise ValueError(f"reward images must be a float tensor in [0, 1], got {images.dtype}")
    if is_fake(images):  # shapes only (shortft.bench.fake counts memory and FLOPs on tensors without values)
        return
    if not bool(torch.isfinite(images.detach()).all()):
        raise ValueError("reward images contain NaN or inf")
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"reward images must lie in [0, 1], got values in [{lo:.3f}, {hi:.3f}]")


def _load_plugin(spec: str) -> Reward:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"reward plug-in {spec!r}: cannot import module {module_name!r} ({err})") from err
    if not hasattr(module, attr):
        raise ConfigError(f"reward plug-in {spec!r}: module {module_name!r} has no attribute {attr!r}")
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
            if w != w or w in (float("inf"), float("-inf")):
                raise ValueError
        except ValueError:
            raise ConfigError(f"reward weight {weight!r} in {spec!r} is not a number") from None
        parts.append((name.strip(), w))
    if not parts:
        raise ConfigError("empty reward specification")
    return parts


def reward_names() -> list[str]:
    """The registered (built-in) reward names."""
    _import_builtin_rewards()
    return list(REWARDS)


def parse_paths(text: str) -> dict[str, str]:
    """'hpsv2=/f.pt,pickscore=/dir' -> {'hpsv2': '/f.pt', 'pickscore': '/dir'}."""
    out = {}
    for item in text.split(","):
        if item.strip():
            name, eq, path = item.partition("=")
            if not eq or not name.strip() or not path.strip():
                raise ConfigError(f"reward path {item.strip()!r} is not name=path (e.g. hpsv2=/path/HPS_v2_compressed.pt)")
            out[name.strip()] = path.strip()
    return out


def validate_reward_spec(spec: str) -> None:
    """Check names without loading any model (used by the CLI before anything is written)."""
    _import_builtin_rewards()
    for name, _ in parse_reward_spec(spec):
        if ":" not in name and name not in REWARDS:
            raise ConfigError(
                f"unknown reward {name!r}; choose from {sorted(REWARDS)} or give package.module:function"
            )


class CheckedReward:
    """The training reward, checked on every call: it must return a (B,) float tensor, and scores with a
    gradient whenever the images have one (a reward that detaches, runs under no_grad or goes through PIL
    would otherwise train nothing, silently). Non-finite scores pass through: the loop skips and counts them."""

    def __init__(self, fn: Reward, name: str):
        self.fn, self.name = fn, name

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = self.fn(images, prompts)
        b = images.shape[0]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (b,) or not out.is_floating_point():
            got = f"{out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise RewardError(f"reward {self.name!r} must return a float tensor of shape ({b},) (one score per "
                              f"image), got a {got}")
        if images.requires_grad and not out.requires_grad:
            raise RewardError(f"reward {self.name!r} returned scores without a gradient: it must be differentiable "
                              "in the images (no torch.no_grad, .detach(), numpy or PIL round trip)")
        return out


class WeightedSum:
    """Sum of weighted rewards, each component built once: the paper's Combined reward."""

    def __init__(self, parts: list[tuple[str, float, Reward]]):
        self.parts = parts
        self.name = ",".join(f"{n}={w:g}" for n, w, _ in parts)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores: dict[int, torch.Tensor] = {}  # a model that appears twice (main + regulariser) runs once
        total = 0
        for _, w, fn in self.parts:
            if id(fn) not in scores:
                scores[id(fn)] = fn(images, prompts)
            total = total + w * scores[id(fn)]
        return total

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each component's unweighted score, for logging (each model run once)."""
        scores: dict[int, torch.Tensor] = {}
        for _, _, fn in self.parts:
            if id(fn) not in scores:
                scores[id(fn)] = fn(images, prompts)
        return {name: scores[id(fn)] for name, _, fn in self.parts}


def build_reward(spec: str, settings: RewardSettings | None = None) -> Reward:
    """Build a reward from a name, a weighted sum `a=w1,b=w2` or a plug-in `package.module:function`."""
    return _build(spec, settings or RewardSettings(), {})


def _build(spec: str, settings: RewardSettings, cache: dict[str, Reward]) -> Reward:
    """build_reward with a name -> built reward cache, so a model named twice is loaded once."""
    validate_reward_spec(spec)
    built = []
    for name, w in parse_reward_spec(spec):
        if name not in cache:
            cache[name] = _load_plugin(name) if ":" in name else REWARDS[name](settings)
        built.append((name, w, cache[name]))
    if len(built) == 1 and built[0][1] == 1.0:
        return built[0][2]
    return WeightedSum(built)


# The paper's regulariser: HPS v2 and PickScore mixed 1:10 (replacing DRTune's CLIPScore), each in its
# reported units (HPS x100 ~ 27, PickScore ~ 20), added to the main reward with weight lambda.
REGULARISER = (("hpsv2", 1.0), ("pickscore", 10.0))


def build_regularised_reward(main: str | Reward, lam: float, settings: RewardSettings | None = None,
                             mix: tuple[tuple[str, float], ...] = REGULARISER) -> Reward:
    """main + lam * (1 * hpsv2 + 10 * pickscore), as one WeightedSum.

    `main` is a spec string or an already built reward; components it already holds (a WeightedSum
    part, or a reward object whose `.name` is hpsv2 / pickscore) are reused, not loaded again."""
    settings = settings or RewardSettings()
    _import_builtin_rewards()
    if lam < 0:
        raise ValueError(f"regulariser weight must be >= 0, got {lam}")
    cache: dict[str, Reward] = {}
    if isinstance(main, str):
        main = _build(main, settings, cache)
    if isinstance(main, WeightedSum):
        parts = list(main.parts)
        cache.update({n: fn for n, _, fn in parts})
    else:
        name = getattr(main, "name", None) or "main"
        parts = [(name, 1.0, main)]
        cache[name] = main
    if lam == 0:
        return main
    for name, w in mix:
        if name not in cache:
            cache[name] = REWARDS[name](settings)
        parts.append((f"reg:{name}", lam * w, cache[name]))
    return WeightedSum(parts)


def _import_builtin_rewards() -> None:
    """Import the modules that register the built-in rewards (heavy imports stay inside factories)."""
    from shortft.rewards import aesthetic, clip_pref, hps, jpeg, symmetry  # noqa: F401

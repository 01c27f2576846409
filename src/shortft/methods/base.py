"""What every method shares: the rollout context, the default loss, the default single LoRA."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from shortft import lora
from shortft.chain import Plan, run_plan, sampling_plan
from shortft.errors import ConfigError

SHORTCUT = "shortcut"  # adapter name of the frozen shortcut LoRA (ShortFT, shortcut-ft)
NO_SHORTCUT = "none"  # TrainConfig.shortcut for ShortFT without one: each jump is the base model's own one step


@dataclass
class Rollout:
    """Everything one training rollout needs besides the plan."""

    backend: object  # a backend (shortft.backends)
    prompts: list[str]  # (B,) prompts of this rollout
    cond: dict  # the prompts' conditioning (backend.encode_prompts; batch-first tensors)
    uncond: dict  # the empty prompt's, one row per prompt (CFG)
    x_T: torch.Tensor  # (B, C, h, w) initial noise
    reward: object  # (images in [0,1], prompts) -> (B,)
    generator: torch.Generator  # for noise a method draws during the rollout (DRaFT-LV)


class Method:
    """Base class: one LoRA ("lora") used at every timestep, the reward of the final image as the loss.

    Subclasses set `name` and implement `plan`; they may override `loss` (DRaFT-LV) and the adapter
    layout (ShortFT). `setup` is called once with the backend before training or sampling.
    """

    name = "base"
    uses_shortcut = False  # True for methods that load the frozen shortcut LoRA (`load_shortcut`)

    def __init__(self, cfg):
        self.cfg = cfg  # the TrainConfig (fields used by each method are listed in its docstring)
        self.timesteps: list[int] = []  # sampling timesteps, e.g. 981, 961, ..., 1 for 50 DDIM steps

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ConfigError for settings this method cannot run with (called by config.validate)."""

    # --- adapters -------------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """Adapters this method creates and trains."""
        return ["lora"]

    def adapters_at(self, index: int) -> tuple[str, ...]:
        """Adapters active at sampling step `index` (0 = the noisiest)."""
        return ("lora",)

    def trainable(self, progress: float) -> list[str]:
        """Adapters trained at this point of training (progress in [0, 1))."""
        return self.adapter_names()

    def use_timesteps(self, timesteps: list[int]) -> None:
        """Fix the sampling timesteps (everything a plan needs from the model)."""
        self.timesteps = list(timesteps)

    def setup(self, backend) -> None:
        """Fix the timesteps and add this method's fresh LoRA adapters to the backend's UNet."""
        self.use_timesteps(backend.timesteps(self.cfg.num_steps))
        for name in self.adapter_names():
            if name not in lora.adapter_names(backend.net):
                lora.add_lora(backend.net, name, self.cfg.lora_rank, self.cfg.lora_alpha,
                              backend.lora_format.layers(self.cfg.lora_layers))

    # --- rollouts -------------------------------------------------------------------------------------
    def plan(self, progress: float, rng: random.Random) -> Plan:
        """The training rollout; randomness is drawn from `rng`, once per rollout."""
        raise NotImplementedError

    def sample_plan(self) -> Plan:
        """Inference: the original chain with no gradient, each step with its adapters."""
        return sampling_plan(self.timesteps, self.adapters_at, self.cfg.guidance)

    def loss(self, ro: Rollout, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """-mean reward of the rollout's final image; returns (loss, rewards (B,), extra scalars to log: floats or
        0-d tensors, read by the loop)."""
        x0 = run_plan(ro.backend, plan, ro.x_T, ro.cond, ro.uncond)
        rewards = ro.reward(ro.backend.decode(x0), ro.prompts)  # (B,)
        return -rewards.mean(), rewards.detach(), {}


def shortcut_file(cfg) -> str:
    """The shortcut LoRA a config names: its `shortcut`, or for "" the embedded model's shipped one (the config
    keeps "", so a run folder names the shipped file, not where this install put it)."""
    from shortft.world import SHIPPED_SHORTCUTS

    if cfg.shortcut:
        return cfg.shortcut
    if cfg.model not in SHIPPED_SHORTCUTS:
        raise ConfigError(f"method {cfg.method!r} needs a shortcut LoRA for {cfg.model!r}: pass --shortcut "
                          "(e.g. ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors) or make one with "
                          "`shortft distill`")
    return str(SHIPPED_SHORTCUTS[cfg.model])


def load_shortcut(backend, cfg) -> None:
    """Load the frozen shortcut LoRA (`shortcut_file`, at cfg.shortcut_scale) as adapter SHORTCUT, once; a
    method that needs one calls this from `setup`."""
    if cfg.shortcut != NO_SHORTCUT and SHORTCUT not in lora.adapter_names(backend.net):
        lora.load_lora(backend.net, shortcut_file(cfg), SHORTCUT, trainable=False, fmt=backend.lora_format)
        lora.set_scale(backend.net, SHORTCUT, cfg.shortcut_scale)


def steps_with(timesteps: list[int], adapters, grads: list[str], guidance: float, stop: int | None = None):
    """Original-chain steps 0..stop with per-step grad modes; the step at `stop` jumps to x̂0.

    `grads[i]` is the grad mode of step i; without `stop` the chain runs to the end (END)."""
    from shortft.chain import END, X0, Step

    last = len(timesteps) - 1 if stop is None else stop
    out = []
    for i in range(last + 1):
        if i < len(timesteps) - 1 and i < last:
            t_to = timesteps[i + 1]
        else:
            t_to = END if stop is None else X0
        out.append(Step(timesteps[i], t_to, tuple(adapters), grads[i], guidance))
    return out

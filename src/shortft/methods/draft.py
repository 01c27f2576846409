"""DRaFT-K and DRaFT-LV: Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable
Rewards", ICLR 2024.

DRaFT-K: sample the whole chain, keep only the last K steps in the autograd graph (full gradient,
UNet input included). DRaFT-LV: K = 1, plus n extra copies: the stop-gradient final latents are
re-noised to the last timestep with fresh noise and denoised once more with gradient; the loss sums
the rewards of all copies (lower-variance estimate of the last step's gradient).

Defaults (PAPER.md sec. 3): CFG 7.5 on SD 1.5, AdamW with weight decay 0.1 (the config's `guidance`,
`weight_decay`); K = `draft_k`, n = `lv_copies` = 2.

Flow models: DRaFT re-noises with the DDPM forward process √ᾱ x0 + √(1-ᾱ) ε. The same step here is the
family's own forward process x_t = a(t) x0 + b(t) ε (backend.coefficients), so on a rectified-flow model
the copies are (1-σ) x0 + σ ε at the last step's σ: the state that step sees on a straight path.
"""

from __future__ import annotations

import random

import torch

from shortft.chain import END, Plan, Step, run_plan
from shortft.errors import ConfigError
from shortft.methods.base import Method, Rollout, steps_with


class DraftK(Method):
    name = "draft"

    @classmethod
    def check(cls, cfg) -> None:
        if not 1 <= cfg.draft_k <= cfg.num_steps:
            raise ConfigError(f"draft_k={cfg.draft_k} must be between 1 and num_steps={cfg.num_steps}")
        if cfg.lv_copies < 0:
            raise ConfigError(f"lv_copies must be >= 0, got {cfg.lv_copies}")

    def plan(self, progress: float, rng: random.Random) -> Plan:
        n, k = len(self.timesteps), self.cfg.draft_k
        grads = ["none"] * (n - k) + ["full"] * k
        return Plan(steps_with(self.timesteps, ("lora",), grads, self.cfg.guidance), {"grad_steps": k})


class DraftLV(DraftK):
    name = "draft-lv"

    def plan(self, progress: float, rng: random.Random) -> Plan:
        n = len(self.timesteps)
        grads = ["none"] * (n - 1) + ["full"]
        return Plan(steps_with(self.timesteps, ("lora",), grads, self.cfg.guidance),
                    {"lv_copies": self.cfg.lv_copies})

    def loss(self, ro: Rollout, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, dict]:
        backend, last = ro.backend, plan.steps[-1]
        x0 = run_plan(backend, plan, ro.x_T, ro.cond, ro.uncond)
        rewards = ro.reward(backend.decode(x0), ro.prompts)  # (B,) the ordinary copy
        total = rewards.mean()
        a, b = backend.coefficients(last.t_from)
        renoise = Step(last.t_from, END, last.adapters, "full", last.guidance)
        for _ in range(self.cfg.lv_copies):
            noise = torch.randn(x0.shape, generator=ro.generator).to(x0.device)
            x_t = a * x0.detach() + b * noise  # re-noise the stop-gradient sample (x_t = a x0 + b ε, any family)
            x0_j = run_plan(backend, [renoise], x_t, ro.cond, ro.uncond)
            total = total + ro.reward(backend.decode(x0_j), ro.prompts).mean()
        return -total, rewards.detach(), {"graph_calls": 1 + self.cfg.lv_copies,
                                          "unet_calls": len(plan.steps) + self.cfg.lv_copies}

"""DRTune: Wu et al., "Deep Reward Supervisions for Tuning Text-to-Image Diffusion Models", ECCV 2024.

The UNet input is detached at every step, so the gradient reaches early steps only through the linear
√ᾱ x_t term. Only K = `drtune_k` equally spaced steps (random offset) run with gradient; sampling stops
early at a random step among the last M = `drtune_m`, and the reward scores that step's x̂0.
K and M follow a public reimplementation; the paper's exact values are unverified (PAPER.md sec. 3).

Flow models: the model input is detached the same way; the linear term through which early steps get
gradient is then x itself in x + (σ' - σ) v, and the early stop scores x̂0 = x - σ v.
"""

from __future__ import annotations

import random

from shortft.chain import Plan
from shortft.errors import ConfigError
from shortft.methods.base import Method, steps_with


class DRTune(Method):
    name = "drtune"

    @classmethod
    def check(cls, cfg) -> None:
        n, k, m = cfg.num_steps, cfg.drtune_k, cfg.drtune_m
        if not (1 <= m <= n and 1 <= k <= n - m + 1):
            raise ConfigError(f"drtune_k={k}, drtune_m={m} do not fit num_steps={n} (need 1 <= m <= n, 1 <= k <= n - m + 1)")

    def plan(self, progress: float, rng: random.Random) -> Plan:
        n, k, m = len(self.timesteps), self.cfg.drtune_k, self.cfg.drtune_m
        stop = rng.randint(n - m, n - 1)  # last step run; it jumps to x̂0
        stride = (stop + 1) // k
        offset = rng.randint(0, stride - 1)
        trained = {offset + j * stride for j in range(k)}
        grads = ["detach_input" if i in trained else "none" for i in range(n)]
        steps = steps_with(self.timesteps, ("lora",), grads, self.cfg.guidance, stop=stop)
        return Plan(steps, {"early_stop": stop, "trained_steps": sorted(trained)})

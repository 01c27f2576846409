"""ReFL: Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation", NeurIPS 2023.

Run without gradient to a random late step, take one step with gradient that predicts x̂0 directly,
and score x̂0. ImageReward draws the step among steps 30..39 of 40; here among the last `refl_window`
steps of the chain (10 of 40 there).

Flow models: x̂0 is the flow's clean estimate x - σ v (the same jump to t' = X0, a = 1, b = 0).
"""

from __future__ import annotations

import random

from shortft.chain import Plan
from shortft.errors import ConfigError
from shortft.methods.base import Method, steps_with


class ReFL(Method):
    name = "refl"

    @classmethod
    def check(cls, cfg) -> None:
        if not 1 <= cfg.refl_window <= cfg.num_steps:
            raise ConfigError(f"refl_window={cfg.refl_window} must be between 1 and num_steps={cfg.num_steps}")

    def plan(self, progress: float, rng: random.Random) -> Plan:
        n, w = len(self.timesteps), self.cfg.refl_window
        stop = rng.randint(n - w, n - 1)
        grads = ["none"] * stop + ["full"] + ["none"] * (n - stop - 1)
        return Plan(steps_with(self.timesteps, ("lora",), grads, self.cfg.guidance, stop=stop), {"stop": stop})

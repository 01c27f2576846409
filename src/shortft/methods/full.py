"""Full backpropagation through every step with gradient checkpointing: the unbiased gradient of the
reward of the whole chain, which ShortFT approximates (the DRaFT paper's "DRaFT-K with K = T")."""

from __future__ import annotations

import random

from shortft.chain import Plan
from shortft.methods.base import Method, steps_with


class Full(Method):
    name = "full"

    def plan(self, progress: float, rng: random.Random) -> Plan:
        grads = ["checkpoint"] * len(self.timesteps)
        return Plan(steps_with(self.timesteps, ("lora",), grads, self.cfg.guidance))

"""Fine-tune the few-step shortcut model itself (ShortFT paper, Table 2: "fine-tune Hyper-SD").

A LoRA is trained on top of the frozen shortcut adapter and the model samples with the shortcut's own
k-step schedule (DDIM "trailing" spacing, e.g. 999, 749, 499, 249; on a flow model its k-step grid, which
starts at σ = 1), every step with full gradient.
The paper finds this worse than ShortFT on the base model (32.92 vs 35.97 HPS v2); this variant lets
the comparison be rerun.
"""

from __future__ import annotations

import random

from shortft.chain import Plan, sampling_plan
from shortft.errors import ConfigError
from shortft.methods.base import NO_SHORTCUT, SHORTCUT, Method, load_shortcut, steps_with


class ShortcutFT(Method):
    name = "shortcut-ft"
    uses_shortcut = True

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.shortcut == NO_SHORTCUT:
            raise ConfigError("shortcut-ft fine-tunes the shortcut model itself: it needs a shortcut, not 'none'")

    def setup(self, backend) -> None:
        super().setup(backend)
        self.use_timesteps(backend.timesteps(self.cfg.segments, spacing="trailing"))
        load_shortcut(backend, self.cfg)

    def adapters_at(self, index: int) -> tuple[str, ...]:
        return (SHORTCUT, "lora")

    def plan(self, progress: float, rng: random.Random) -> Plan:
        grads = ["full"] * len(self.timesteps)
        return Plan(steps_with(self.timesteps, self.adapters_at(0), grads, self.cfg.shortcut_guidance))

    def sample_plan(self) -> Plan:
        return sampling_plan(self.timesteps, self.adapters_at, self.cfg.shortcut_guidance)

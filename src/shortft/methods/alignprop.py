"""AlignProp: Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with Reward
Backpropagation", 2023.

Every step runs with gradient checkpointing. A truncation point is drawn once per rollout
(`alignprop_cut`: gaussian with mean 42 and std 5 of 50 steps, scaled to `num_steps`; uniform; or
fixed at the last step): steps before it compute ε̂ without gradient, but the latents are never
detached, so the gradient still flows along the √ᾱ x_t path. Drawing a new cut at every step (as the
AlignProp repository once did, and TRL's copy of it) is a known bug and not reproduced.

Flow models: "the model output without gradient, the latents kept" is the same rule; the path the
gradient keeps is then the identity term of the Euler step x + (σ' - σ) v (coefficient 1, not √ᾱ'/√ᾱ).
"""

from __future__ import annotations

import random

from shortft.chain import Plan
from shortft.methods.base import Method, steps_with


class AlignProp(Method):
    name = "alignprop"

    def draw_cut(self, rng: random.Random) -> int:
        """Index of the first step whose ε̂ keeps its gradient."""
        n, how = len(self.timesteps), self.cfg.alignprop_cut
        if how == "gaussian":  # mean 42, std 5 out of 50 (AlignProp's defaults), scaled to n steps
            cut = round(rng.gauss(42 / 50 * n, 5 / 50 * n))
        elif how == "uniform":
            cut = rng.randint(0, n - 1)
        else:  # "fixed": only the last step keeps ε̂'s gradient
            cut = n - 1
        return min(max(cut, 0), n - 1)

    def plan(self, progress: float, rng: random.Random) -> Plan:
        n, cut = len(self.timesteps), self.draw_cut(rng)
        grads = ["none"] * cut + ["checkpoint"] * (n - cut)
        return Plan(steps_with(self.timesteps, ("lora",), grads, self.cfg.guidance), {"cut": cut})

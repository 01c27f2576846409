"""ShortFT: Guo et al., "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025.

The sampling chain is cut into k segments (`segments`, default 4); with 50 DDIM steps on SD 1.5,
segment j covers indices [floor(50 (j-1)/4), floor(50 j/4)): 981..761, 741..501, 481..261, 241..1.

Timestep-aware stacked LoRAs (T-LoRA): `lora1` is shared over all of segment 1; `lora<j>` (j >= 2)
runs only at segment j's final timestep (761, 501, 261, 1 are the LoRA timesteps), stacked on
lora1..lora<j-1>. The inner timesteps of later segments run `inner_weights` at inference: "base"
(default), "prev" (lora1..j-1) or "stack" (lora1..j); training uses the same, so the two agree.

Denoising shortcut: a frozen trajectory-preserving few-step LoRA (Hyper-SD; `shortcut`) jumps from a
segment's first timestep to its final one (741->501, 481->261, 241->1) in one deterministic DDIM move
from its x̂0 prediction, conditional-only by default (`shortcut_guidance` = 1). Gradients flow through
its input, never into its weights.

Progressive training (our reading, PAPER.md sec. 2): stage i of k (`stage_fractions` of `max_steps`)
trains lora<i>..lora<k>. Segments 1..i run the original chain; the graph starts at lora<i>'s first step
(at stage 1: the last `s1_grad_steps` steps of segment 1, truncated backprop); segments i+1..k run
[shortcut jump, LoRA step] each, with gradient. Stage 1 with k = 4 holds s1_grad_steps + 6 UNet calls in
the graph (7-8: the paper's "about 7-8 steps"); stage i >= 2 holds 1 + 2 (k - i); stage k is one step.

Ablations: `tlora=false` uses one LoRA at every step; `progressive=false` keeps the stage-1 chain.

Flow models (SD 3): the segments come from the flow schedule (28 steps, k = 4: 7 steps each); a shortcut
jump is one step of the shortcut's velocity, x + (σ' - σ) v, exact like the DDIM move; Hyper-SD3's CFG LoRAs
run at `shortcut_guidance` 3 and `shortcut_scale` 0.125 (the sd3 / sd35 presets).
"""

from __future__ import annotations

import random

from shortft.chain import END, Plan, Step
from shortft.errors import ConfigError
from shortft.methods.base import NO_SHORTCUT, SHORTCUT, Method, load_shortcut


def segment_bounds(num_steps: int, k: int) -> list[int]:
    """Start index of each segment plus the end: 50 steps, k = 4 -> [0, 12, 25, 37, 50]."""
    if not 1 <= k <= num_steps:
        raise ConfigError(f"segments={k} must be between 1 and num_steps={num_steps}")
    return [num_steps * j // k for j in range(k + 1)]


class ShortFT(Method):
    name = "shortft"
    uses_shortcut = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.k = cfg.segments
        self.bounds: list[int] = []

    @classmethod
    def check(cls, cfg) -> None:
        segment_bounds(cfg.num_steps, cfg.segments)
        fracs = cfg.stage_fractions
        if cfg.progressive and (len(fracs) != cfg.segments or abs(sum(fracs) - 1) > 1e-6):
            raise ConfigError(f"stage_fractions {fracs} must have segments={cfg.segments} entries summing to 1")
        if cfg.s1_grad_steps < 1:
            raise ConfigError(f"s1_grad_steps must be >= 1 (more than segment 1 holds means all of it), "
                              f"got {cfg.s1_grad_steps}")

    def use_timesteps(self, timesteps: list[int]) -> None:
        super().use_timesteps(timesteps)
        self.bounds = segment_bounds(len(self.timesteps), self.k)

    def setup(self, backend) -> None:
        super().setup(backend)
        load_shortcut(backend, self.cfg)

    # --- adapter layout -------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return [f"lora{j}" for j in range(1, self.k + 1)] if self.cfg.tlora else ["lora1"]

    def segment_of(self, index: int) -> int:
        """1-based segment of sampling step `index`."""
        return next(j for j in range(1, self.k + 1) if index < self.bounds[j])

    def stack(self, j: int) -> tuple[str, ...]:
        """LoRA j with everything below it: lora1..lora<j>."""
        return tuple(f"lora{i}" for i in range(1, j + 1)) if self.cfg.tlora else ("lora1",)

    def adapters_at(self, index: int) -> tuple[str, ...]:
        j = self.segment_of(index)
        if j == 1 or index == self.bounds[j] - 1 or not self.cfg.tlora:
            return self.stack(j)
        return {"base": (), "prev": self.stack(j - 1), "stack": self.stack(j)}[self.cfg.inner_weights]

    # --- training -------------------------------------------------------------------------------------
    def stage(self, progress: float) -> int:
        """1-based progressive-training stage at this point of training."""
        if not self.cfg.progressive:
            return 1
        edge = 0.0
        for i, f in enumerate(self.cfg.stage_fractions, start=1):
            edge += f
            if progress < edge:
                return i
        return self.k

    def trainable(self, progress: float) -> list[str]:
        return self.adapter_names()[self.stage(progress) - 1:] if self.cfg.tlora else ["lora1"]

    def jump(self, t_from, t_to) -> Step:
        """The shortcut's one jump over a segment's inner steps, with gradient through its input; with
        shortcut="none" the base model's own one-step jump at the chain's CFG (the naive jump)."""
        if self.cfg.shortcut == NO_SHORTCUT:
            return Step(t_from, t_to, (), "full", self.cfg.guidance)
        return Step(t_from, t_to, (SHORTCUT,), "full", self.cfg.shortcut_guidance)

    def plan(self, progress: float, rng: random.Random) -> Plan:
        stage, ts, b, g = self.stage(progress), self.timesteps, self.bounds, self.cfg.guidance
        steps = []
        # segments 1..stage: the original chain
        for i in range(b[stage]):
            j = self.segment_of(i)
            if stage == 1:
                grad = "full" if i >= b[1] - self.cfg.s1_grad_steps else "none"
            else:
                grad = "full" if i == b[stage] - 1 else "none"  # lora<stage>'s only step
            steps.append(Step(ts[i], ts[i + 1] if i + 1 < len(ts) else END, self.adapters_at(i), grad, g))
        # segments stage+1..k: shortcut jump over the inner steps, then the segment's LoRA step
        for j in range(stage + 1, self.k + 1):
            first, last = b[j - 1], b[j] - 1
            if last > first:
                steps.append(self.jump(ts[first], ts[last]))
            steps.append(Step(ts[last], ts[last + 1] if last + 1 < len(ts) else END, self.stack(j), "full", g))
        return Plan(steps, {"stage": stage})

"""LeapAlign: Liang et al., "LeapAlign: Post-Training Flow Matching Models at Any Generation Step by Building
Two-Step Trajectories", CVPR 2026 (arXiv 2604.15311; equation numbers of its v1).

A rollout runs the whole chain without gradient, x_T -> ... -> x_k -> ... -> x_j -> ... -> x_0, with step
indices k < j drawn once (times t_k > t_j), then two leaps with gradient, each one engine step (the family's
own jump x' = a(t') x̂0 + b(t') ε̂, see shortft.chain):

    x̂_j = leap(x_k; t_k -> t_j)          flow: x_k + (σ_j - σ_k) v(x_k)               (Eq. 4)
    x̃_j = x_j + (x̂_j - sg x̂_j)           the real x_j's value, the leap's gradient     (Eq. 6)
    x̂_0 = leap(x̃_j; t_j -> END)          flow: x̃_j - σ_j v(α x̃_j + (1 - α) sg x̃_j)   (Eq. 5, 9)
    x̃_0 = x_0 + (x̂_0 - sg x̂_0)           the real final latent's value                 (Eq. 7)
    loss = -mean_b sg(w_b) r(decode(x̃_0))_b,   w = 1 / (max(d_j, τ) + max(d_0, τ))     (Eq. 12, 13)
    d_j = mean |x̂_j - x_j|,  d_0 = mean |x̂_0 - x_0|   per sample, over (C, h, w)

So the reward is the real image's, and its gradient reaches the weights at t_k and t_j along the leap path
only. Through x_j the gradient of the t_k call is (I - σ_j ∂v/∂x) ∂x̂_j/∂θ: the identity term whole, the
nested term (through the second call's input) times α = `leap_discount` (Step.input_grad): scaled down, not
cut as DRTune cuts it (α = 0 gives DRTune's stop-gradient, α = 1 the full gradient; Eq. 8). Leap trajectories
close to the real path weigh more; τ = `leap_tau` floors each distance.

Where each part comes from. The paper (abstract and project page; sections 4.2-4.5 and Fig. 4 as public
reading notes quote them, checked against FlowBP): the two leaps and their straight-through connectors, the
reward of the real x_0, the discount, the weight w and its floor; defaults α = 0.3 (Fig. 4a), τ = 0.1, k and
j over the whole chain (Fig. 4e: [0, 1] beats [0, 1/2]). FlowBP (RuoyuWang-2077/FlowBP,
flowbp/trainers/sd35/leapalign.py, flowbp/trainers/common/jk_sampling.py, configs/final/sd35/
sd3_5_leapalign.yaml: alpha 0.3, tau 0.1, all 25 steps): k, j as a uniform pair of distinct steps, d as the
per-sample mean absolute difference, the discount applied at the second call's input only, x̂_0 as the jump
to σ = 0.

Left open or chosen here: the loss is the raw reward, as for every method of this repository; the paper's
hinge max(0, λ - r) (Eq. 11, λ = 0.55 on HPS v2.1) is tied to that reward's scale, and FlowBP gives it to
every method it compares alike. FlowBP takes the leaps from the chain's own calls at t_k and t_j (n model calls); a
plan is a list of steps, so here they are two more calls (n + 2; the same values and gradient).
`leap_range` < 1 (the ablation's [0, 1/2]) draws k, j among the chain's last steps.

ε-prediction (DDIM) models: the leap is the exact DDIM jump x̂_j = √ᾱ_j x̂0(x_k) + √(1-ᾱ_j) ε̂(x_k), and
x̂_0 = (a_E / a_j) x̃_j + (b_E - a_E b_j / a_j) ε̂(α x̃_j + (1 - α) sg x̃_j) with (a_E, b_E) of END (ᾱ_0, the
time x_0 has): the linear term keeps its whole gradient, the nested one through ε̂'s input is discounted, as
in the flow case, whose linear coefficient is 1. The weights compare the same latents.
"""

from __future__ import annotations

import random

import torch

from shortft.chain import END, Plan, Step, routed, run_plan
from shortft.errors import ConfigError
from shortft.methods.base import Method, Rollout


def leap_window(num_steps: int, share: float) -> int:
    """How many of the chain's last steps k and j are drawn from."""
    return round(share * num_steps)


def consistency_weight(leap_j: torch.Tensor, x_j: torch.Tensor, leap_0: torch.Tensor, x_0: torch.Tensor,
                       tau: float) -> torch.Tensor:
    """w = 1 / (max(d_j, τ) + max(d_0, τ)) (B,), d the mean absolute difference of a leap's latent from the
    real one; a constant (no gradient)."""
    with torch.no_grad():
        d_j = (leap_j - x_j).double().abs().flatten(1).mean(1)
        d_0 = (leap_0 - x_0).double().abs().flatten(1).mean(1)
        return 1 / (d_j.clamp(min=tau) + d_0.clamp(min=tau))


class LeapAlign(Method):
    name = "leapalign"

    @classmethod
    def check(cls, cfg) -> None:
        if not 0 < cfg.leap_range <= 1 or leap_window(cfg.num_steps, cfg.leap_range) < 2:
            raise ConfigError(f"leap_range={cfg.leap_range} must be in (0, 1] and leave at least 2 of "
                              f"num_steps={cfg.num_steps} steps to draw k and j from")
        if not 0 <= cfg.leap_discount <= 1:
            raise ConfigError(f"leap_discount must be in [0, 1], got {cfg.leap_discount}")
        if cfg.leap_tau <= 0:
            raise ConfigError(f"leap_tau must be > 0, got {cfg.leap_tau}")

    def plan(self, progress: float, rng: random.Random) -> Plan:
        """The no-grad chain, then the leaps t_k -> t_j and t_j -> END with gradient (the second discounted)."""
        n, ts, g = len(self.timesteps), self.timesteps, self.cfg.guidance
        k, j = sorted(rng.sample(range(n - leap_window(n, self.cfg.leap_range), n), 2))
        leaps = [Step(ts[k], ts[j], ("lora",), "full", g),
                 Step(ts[j], END, ("lora",), "full", g, input_grad=self.cfg.leap_discount)]
        return Plan(self.sample_plan().steps + leaps, {"leap_k": k, "leap_j": j})

    def loss(self, ro: Rollout, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, dict]:
        backend, k, j = ro.backend, plan.info["leap_k"], plan.info["leap_j"]
        *chain, first, second = plan.steps
        x_k = run_plan(backend, chain[:k], ro.x_T, ro.cond, ro.uncond)  # (B, C, h, w), the real chain, no graph
        x_j = run_plan(backend, chain[k:j], x_k, ro.cond, ro.uncond)
        x_0 = run_plan(backend, chain[j:], x_j, ro.cond, ro.uncond)
        leap_j = run_plan(backend, [first], x_k, ro.cond, ro.uncond)  # x̂_j, graph into the weights at t_k
        leap_0 = run_plan(backend, [second], routed(x_j, leap_j), ro.cond, ro.uncond)  # x̂_0 from the real x_j
        w = consistency_weight(leap_j, x_j, leap_0, x_0, self.cfg.leap_tau)  # (B,)
        rewards = ro.reward(backend.decode(routed(x_0, leap_0)), ro.prompts)  # (B,) the real image's
        return -(w.to(rewards.dtype) * rewards).mean(), rewards.detach(), {"leap_weight": w.mean().detach()}

"""The chain engine: a rollout is an explicit plan of denoising steps, run by one pure function.

Every backprop-through-sampling method differs only in which steps run, with which weights, and where
the gradient may flow. A `Step` says all of that; `run_plan` executes a list of them with the DDIM
(eta = 0) update written out, so a jump t -> t' between any two timesteps is exact:

    ε̂   = ε_θ(x_t, t, c)                                   (with CFG: ε̂_u + g (ε̂_c - ε̂_u))
    x̂0  = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t
    x_t' = √ᾱ_t' x̂0 + √(1-ᾱ_t') ε̂

Gradient modes of a step:
    none          ε̂ computed without a graph; x_t' still depends on x_t linearly (AlignProp keeps this path)
    full          ε̂ with a graph, through the UNet's input too
    detach_input  ε̂ with a graph for the weights, but the UNet input is detached (DRTune)
    checkpoint    like full, with the UNet call recomputed in backward (gradient checkpointing)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GRAD_MODES = ("none", "full", "detach_input", "checkpoint")
END = -1  # t_to after the last DDIM step: the scheduler's final ᾱ (SD 1.5: ᾱ_0, as the stock pipeline does)
X0 = None  # t_to of a jump straight to the clean-image estimate x̂0 (ᾱ = 1): ReFL, DRTune's early stop


@dataclass(frozen=True)
class Step:
    """One UNet call and the DDIM jump it drives."""

    t_from: int  # timestep of the input x_t
    t_to: int | None  # timestep of the output; END after the last step, X0 for x̂0
    adapters: tuple[str, ...] = ()  # adapters active for this call; () = base weights
    grad: str = "none"  # one of GRAD_MODES
    guidance: float = 1.0  # classifier-free guidance scale; <= 1 runs the conditional branch only

    def __post_init__(self):
        if self.grad not in GRAD_MODES:
            raise ValueError(f"grad mode {self.grad!r} not in {GRAD_MODES}")


@dataclass
class Plan:
    """A rollout: the steps in order plus what the method drew for it (cut point, stage, ...)."""

    steps: list[Step]
    info: dict = field(default_factory=dict)

    @property
    def graph_calls(self) -> int:
        """UNet calls whose weights get gradient in this plan."""
        return sum(s.grad != "none" for s in self.steps)


def ddim_jump(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """Deterministic DDIM move from ᾱ_from to ᾱ_to along the predicted noise."""
    x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5  # (B, C, h, w) clean estimate
    return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps


def guided_eps(backend, step: Step, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
               checkpoint: bool = False) -> torch.Tensor:
    """ε̂ at step.t_from with the step's adapters; CFG runs both branches in one batched call like the
    stock pipeline: input (2B, ...) = [uncond; cond]."""
    if step.guidance > 1:
        if uncond is None:
            raise ValueError(f"step at t={step.t_from} has guidance {step.guidance} but no unconditional embedding")
        out = backend.model_eps(torch.cat([x, x]), step.t_from, torch.cat([uncond, cond]),
                                step.adapters, checkpoint)  # (2B, C, h, w)
        eps_u, eps_c = out.chunk(2)
        return eps_u + step.guidance * (eps_c - eps_u)
    return backend.model_eps(x, step.t_from, cond, step.adapters, checkpoint)


def run_plan(backend, plan: Plan | list[Step], x: torch.Tensor, cond: torch.Tensor,
             uncond: torch.Tensor | None = None) -> torch.Tensor:
    """Run the steps from latents `x` (B, C, h, w); return the final latents. Pure: no scheduler state,
    and where the gradient flows is decided by each step's `grad` alone."""
    steps = plan.steps if isinstance(plan, Plan) else plan
    for step in steps:
        if step.grad == "none":
            with torch.no_grad():
                eps = guided_eps(backend, step, x, cond, uncond)
        elif step.grad == "detach_input":
            eps = guided_eps(backend, step, x.detach(), cond, uncond)
        else:
            eps = guided_eps(backend, step, x, cond, uncond, checkpoint=step.grad == "checkpoint")
        x = ddim_jump(x, eps, backend.alpha(step.t_from), backend.alpha(step.t_to))
    return x


def sampling_plan(timesteps: list[int], adapters_at, guidance: float) -> Plan:
    """The original chain over `timesteps` with no gradient; `adapters_at(i)` names the weights of step i."""
    ends = timesteps[1:] + [END]
    return Plan([Step(t, t2, tuple(adapters_at(i)), "none", guidance)
                 for i, (t, t2) in enumerate(zip(timesteps, ends))])

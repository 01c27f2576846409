"""The chain engine: a rollout is an explicit plan of denoising steps, run by one pure function.

Every backprop-through-sampling method differs only in which steps run, with which weights, and where
the gradient may flow. A `Step` says all of that; `run_plan` executes a list of them. Both model families
write a noisy sample the same way, x_t = a(t) x0 + b(t) ε (DDPM / DDIM: a = √ᾱ_t, b = √(1-ᾱ_t); rectified
flow: a = 1-σ_t, b = σ_t), so one update serves them all:

    out   = f_θ(x_t, t, c)                       (with CFG: out_u + g (out_c - out_u), as the stock pipelines)
    x̂0, ε̂ = backend.split(out, x_t, t)           (ε-, v- or flow-prediction converted by the backend)
    x_t'  = a(t') x̂0 + b(t') ε̂

For DDIM (η = 0) this is exact for any jump t -> t'; for flow matching it equals the Euler step
x_t + (σ' - σ) v. A shortcut jump, an early stop to x̂0 (t' = X0) and a re-noising are the same move.

Gradient modes of a step:
    none          the model output without a graph; x_t' still depends on x_t linearly (AlignProp keeps this path)
    full          the model output with a graph, through the model's input too
    detach_input  the model output with a graph for the weights, but the model input is detached (DRTune)
    checkpoint    like full, with the model call recomputed in backward (gradient checkpointing)
A full or checkpoint step may keep only a share `input_grad` of the gradient through the model's input (the
input's value unchanged; the linear x-term of the update keeps all of it): 0 is detach_input's gradient, 1 full's,
LeapAlign's discount of its nested term lies between.

The conditioning `cond` is opaque here: a dict of batch-first tensors that the backend made (`batch_cat`
joins the unconditional and conditional rows for CFG).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GRAD_MODES = ("none", "full", "detach_input", "checkpoint")
END = -1  # t_to after the last step: the scheduler's final noise level (DDIM on SD 1.5: ᾱ_0; flow: σ = 0)
X0 = None  # t_to of a jump straight to the clean-image estimate x̂0 (a = 1, b = 0): ReFL, DRTune's early stop


@dataclass(frozen=True)
class Step:
    """One model call and the jump it drives."""

    t_from: float  # time of the input x_t (a DDPM timestep, or a flow timestep σ * 1000)
    t_to: float | None  # time of the output; END after the last step, X0 for x̂0
    adapters: tuple[str, ...] = ()  # adapters active for this call; () = base weights
    grad: str = "none"  # one of GRAD_MODES
    guidance: float = 1.0  # classifier-free guidance scale; <= 1 runs the conditional branch only
    input_grad: float = 1.0  # share of the gradient through the model's input (full / checkpoint steps), in [0, 1]

    def __post_init__(self):
        if self.grad not in GRAD_MODES:
            raise ValueError(f"grad mode {self.grad!r} not in {GRAD_MODES}")
        if not 0 <= self.input_grad <= 1 or (self.input_grad != 1 and self.grad not in ("full", "checkpoint")):
            raise ValueError(f"input_grad={self.input_grad} needs a full or checkpoint step and a value in [0, 1]")


@dataclass
class Plan:
    """A rollout: the steps in order plus what the method drew for it (cut point, stage, ...)."""

    steps: list[Step]
    info: dict = field(default_factory=dict)

    @property
    def graph_calls(self) -> int:
        """Model calls whose weights get gradient in this plan."""
        return sum(s.grad != "none" for s in self.steps)


def routed(value: torch.Tensor, path: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`value` in the forward pass, `scale` times the gradient of `path` in the backward one (a straight-through
    connector where the two differ). The value is exact: path - path.detach() is zero."""
    return value.detach() + scale * (path - path.detach())


def batch_cat(*conds: dict) -> dict:
    """Join conditionings along the batch: {k: cat([c1[k], c2[k], ...])}."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def batch_rows(cond: dict, rows) -> dict:
    """Rows `rows` (an index tensor or slice) of every tensor of a conditioning."""
    return {k: v[rows] for k, v in cond.items()}


def batch_repeat(cond: dict, n: int) -> dict:
    """A one-row conditioning (the empty prompt's) as n rows (views, no copies)."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def batch_to(cond: dict, device) -> dict:
    return {k: v.to(device) for k, v in cond.items()}


def guided_output(backend, step: Step, x: torch.Tensor, cond: dict, uncond: dict | None, both: dict | None,
                  checkpoint: bool = False) -> torch.Tensor:
    """The model output at step.t_from with the step's adapters; CFG runs both branches in one batched call
    like the stock pipelines: input (2B, ...) = [uncond; cond] (`both`, joined once per plan)."""
    if step.guidance > 1:
        if uncond is None:
            raise ValueError(f"step at t={step.t_from} has guidance {step.guidance} but no unconditional embedding")
        out_u, out_c = backend.model_output(torch.cat([x, x]), step.t_from, both, step.adapters, checkpoint).chunk(2)
        return out_u + step.guidance * (out_c - out_u)
    return backend.model_output(x, step.t_from, cond, step.adapters, checkpoint)


def run_plan(backend, plan: Plan | list[Step], x: torch.Tensor, cond: dict, uncond: dict | None = None) -> torch.Tensor:
    """Run the steps from latents `x` (B, C, h, w); return the final latents. Pure: no scheduler state,
    and where the gradient flows is decided by each step's `grad` (and `input_grad`) alone."""
    steps = plan.steps if isinstance(plan, Plan) else plan
    both = batch_cat(uncond, cond) if uncond is not None and any(s.guidance > 1 for s in steps) else None
    for step in steps:
        if step.grad == "none":
            with torch.no_grad():
                out = guided_output(backend, step, x, cond, uncond, both)
        elif step.grad == "detach_input":
            out = guided_output(backend, step, x.detach(), cond, uncond, both)
        else:
            inp = x if step.input_grad == 1 else routed(x, x, step.input_grad)
            out = guided_output(backend, step, inp, cond, uncond, both, checkpoint=step.grad == "checkpoint")
        x0, eps = backend.split(out, x, step.t_from)  # linear in x: the gradient's x-path survives grad="none"
        a, b = backend.coefficients(step.t_to)
        x = a * x0 + b * eps
    return x


def sampling_plan(timesteps: list, adapters_at, guidance: float) -> Plan:
    """The original chain over `timesteps` with no gradient; `adapters_at(i)` names the weights of step i."""
    ends = timesteps[1:] + [END]
    return Plan([Step(t, t2, tuple(adapters_at(i)), "none", guidance)
                 for i, (t, t2) in enumerate(zip(timesteps, ends))])

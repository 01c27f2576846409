"""The baseline the engine is measured against: the same training iteration written by hand.

Same draws, same plan (the list of steps a method builds), same LoRA layout and initialisation, same
reward, clipping and AdamW step; but the UNet and the VAE are called directly: no Denoiser module, no
adapter switch at every call (only where the adapters change), no accelerate, no `run_plan`, no
`Method.loss`. What the engine costs on top of this is its overhead. A test holds that both compute the
same loss and gradients.
"""

from __future__ import annotations

import time

import torch
import torch.utils.checkpoint

from shortft import lora
from shortft.bench import sync
from shortft.chain import END, Step, routed


def switch(unet, adapters: tuple[str, ...]) -> None:
    """Activate `adapters` unless they are active already."""
    if tuple(lora.active(unet)) != tuple(adapters):
        lora.activate(unet, adapters)


def raw_chain(backend, steps: list[Step], x: torch.Tensor, cond: dict, uncond: dict) -> torch.Tensor:
    """The same UNet calls as `run_plan(steps)` made by hand (an ε-prediction SD model): the UNet module called
    directly, adapters switched only when they change, the DDIM update folded into two scalars per step."""
    unet = backend.net
    cond, both = cond["hidden"], torch.cat([uncond["hidden"], cond["hidden"]])  # (B, L, D), (2B, L, D) for CFG
    for s in steps:
        (a, b), (a2, b2) = backend.coefficients(s.t_from), backend.coefficients(s.t_to)
        inp = x.detach() if s.grad == "detach_input" else x
        if s.input_grad != 1:  # the input's value, a share of its gradient (LeapAlign's discount)
            inp = routed(x, x, s.input_grad)
        ctx = cond
        if s.guidance > 1:
            inp, ctx = torch.cat([inp, inp]), both
        t = torch.tensor(s.t_from, device=x.device)

        def call(i, c, t=t, adapters=s.adapters):
            switch(unet, adapters)  # also when a checkpointed call is recomputed in backward
            return unet(i, t, encoder_hidden_states=c).sample

        if s.grad == "none":
            with torch.no_grad():
                eps = call(inp, ctx)
        elif s.grad == "checkpoint":
            eps = torch.utils.checkpoint.checkpoint(call, inp, ctx, use_reentrant=False)
        else:
            eps = call(inp, ctx)
        if s.guidance > 1:
            eu, ec = eps.chunk(2)
            eps = eu + s.guidance * (ec - eu)
        # x_t' = a' (x - b ε) / a + b' ε, folded into two scalars
        c1 = a2 / a
        x = c1 * x + (b2 - c1 * b) * eps
    return x


def leapalign_objective(backend, ro, steps: list[Step], k: int, j: int, decode, tau: float):
    """LeapAlign's weighted reward by hand: the no-grad chain through x_k and x_j to x_0, the two leaps with
    gradient (the plan's last two steps), straight-through connectors to the real x_j and x_0. (rewards, total)"""
    from shortft.methods.leapalign import consistency_weight

    *chain, first, second = steps
    x_k = raw_chain(backend, chain[:k], ro.x_T, ro.cond, ro.uncond)
    x_j = raw_chain(backend, chain[k:j], x_k, ro.cond, ro.uncond)
    x_0 = raw_chain(backend, chain[j:], x_j, ro.cond, ro.uncond)
    leap_j = raw_chain(backend, [first], x_k, ro.cond, ro.uncond)
    leap_0 = raw_chain(backend, [second], routed(x_j, leap_j), ro.cond, ro.uncond)
    w = consistency_weight(leap_j, x_j, leap_0, x_0, tau)  # (B,) no gradient
    rewards = ro.reward(decode(routed(x_0, leap_0)), ro.prompts)  # (B,) the real image's
    return rewards, (w.to(rewards.dtype) * rewards).mean()


def hand_iteration(ctx: dict, it: int, progress: float, zero_grad: bool = True) -> dict:
    """`engine.train_iteration` written by hand on a context built with `prepare=False`; the trainable
    adapters are set once beforehand (`lora.set_trainable(unet, method.trainable(progress))`)."""
    from shortft.train import make_rollout

    cfg, backend, params = ctx["cfg"], ctx["backend"], ctx["params"]
    if getattr(backend, "prediction_type", None) != "epsilon":
        raise ValueError("the hand-written baseline handles epsilon-prediction SD models only")
    vae = backend.vae

    def decode(z):  # (B, 4, h, w) -> (B, 3, H, W) in [0, 1]
        return (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    sync(ctx["device"])
    t0, c0 = time.perf_counter(), time.process_time()
    ro, rng = make_rollout(cfg, backend, ctx["prompts"], ctx["reward"], it)
    plan = ctx["method"].plan(progress, rng)
    steps = plan.steps
    if cfg.method == "leapalign":
        rewards, total = leapalign_objective(backend, ro, steps, plan.info["leap_k"], plan.info["leap_j"], decode,
                                             cfg.leap_tau)
    else:
        x0 = raw_chain(backend, steps, ro.x_T, ro.cond, ro.uncond)
        rewards = ro.reward(decode(x0), ro.prompts)  # (B,)
        total = rewards.mean()
    if cfg.method == "draft-lv":  # the last step again from re-noised copies of the stop-gradient sample
        last = steps[-1]
        a, b = backend.coefficients(last.t_from)
        for _ in range(cfg.lv_copies):
            x_t = a * x0.detach() + b * torch.randn(x0.shape, generator=ro.generator).to(x0.device)
            x0_j = raw_chain(backend, [Step(last.t_from, END, last.adapters, "full", last.guidance)], x_t, ro.cond,
                             ro.uncond)
            total = total + ro.reward(decode(x0_j), ro.prompts).mean()
    loss = -total
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm))
    ctx["opt"].step()
    if zero_grad:
        ctx["opt"].zero_grad(set_to_none=True)
    reward = float(rewards.detach().mean())
    sync(ctx["device"])
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "loss": float(loss.detach()), "grad_norm": grad_norm, "reward": reward}

"""The training iteration as shortft runs it, for the benchmarks: a context built as `train` builds it
(backend, method, reward, AdamW, accelerate) and one iteration of `train`'s loop body on it."""

from __future__ import annotations

import math
import time

from shortft.bench import rss_mark, rss_peak, sync


def setup_method(backend, method, targets: tuple[str, ...] | None = None) -> None:
    """`method.setup(backend)`, with the method's LoRAs wrapping `targets` (None: the engine's layers).
    Adapters added here first are kept: `Method.setup` adds only the ones that are missing."""
    from shortft import lora

    if targets is not None:
        for name in method.adapter_names():
            if name not in lora.adapter_names(backend.unet):
                lora.add_lora(backend.unet, name, method.cfg.lora_rank, method.cfg.lora_alpha, targets)
    method.setup(backend)


def targets_of(spec: dict) -> tuple[str, ...] | None:
    """The LoRA layers a worker spec names (None: the engine's)."""
    return tuple(spec["targets"]) if spec.get("targets") else None


def build_model(cfg, device, targets: tuple[str, ...] | None = None):
    """`train.build_model`, with the trained LoRAs on `targets` (see `setup_method`)."""
    from shortft.backends import SDBackend
    from shortft.methods import METHODS
    from shortft.train import precision

    backend = SDBackend.load(cfg.model, device=device, dtype=precision(cfg)[0])
    method = METHODS[cfg.method](cfg)
    setup_method(backend, method, targets)
    return backend, method


def memory_mark(device) -> dict:
    """Memory in use now (MB): RSS, whose peak mark is reset to it, and on a GPU the CUDA memory allocated,
    whose peak statistic is reset too. `memory_peak` then reads the peaks since."""
    import torch

    out = {"rss_mb": rss_mark()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        out["cuda_mb"] = torch.cuda.memory_allocated() / 2**20
    return out


def memory_peak(device) -> dict:
    """Peak RSS (MB) since `memory_mark` and, on a GPU, CUDA max_memory_allocated (MB) since then."""
    import torch

    out = {"rss_mb": rss_peak()}
    if device.type == "cuda":
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def build_context(overrides: dict, preset: str | None = "world", targets: tuple[str, ...] | None = None,
                  prepare: bool = True) -> dict:
    """Backend, method, reward, optimizer for a config, exactly as `train` builds them (same seed, so the
    same LoRA initialisation); `prepare=False` leaves accelerate out (the hand-written baseline's)."""
    import torch

    from shortft import lora
    from shortft.config import build_config
    from shortft.prompts import load_prompts
    from shortft.train import build_accelerator, build_reward_fn

    cfg = build_config(preset, overrides=overrides)
    acc = build_accelerator(cfg) if prepare else None  # resolves dtype / mixed precision as training does
    device = acc.device if acc else torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    torch.manual_seed(cfg.seed)
    backend, method = build_model(cfg, device, targets)
    reward = build_reward_fn(cfg, device)
    params = lora.set_trainable(backend.unet, method.adapter_names())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if acc:
        backend.denoiser, opt = acc.prepare(backend.denoiser, opt)
    return dict(cfg=cfg, acc=acc, device=device, backend=backend, method=method, reward=reward, params=params,
                opt=opt, prompts=load_prompts(cfg.prompts))


def train_iteration(ctx: dict, it: int, progress: float, zero_grad: bool = True) -> dict:
    """Step `it` of `train`'s loop as it runs there (one process, no accumulation): trainable adapters,
    rollout, plan, chain, decode, reward, backward, clipping, AdamW step. `zero_grad=False` keeps the
    clipped gradients for inspection."""
    from shortft import lora
    from shortft.train import make_rollout

    cfg, method, backend, acc, params = ctx["cfg"], ctx["method"], ctx["backend"], ctx["acc"], ctx["params"]
    sync(ctx["device"])
    t0 = time.perf_counter()
    lora.set_trainable(backend.unet, method.trainable(progress))
    with acc.accumulate(backend.denoiser):
        ro, rng = make_rollout(cfg, backend, ctx["prompts"], ctx["reward"], it)
        plan = method.plan(progress, rng)
        loss, rewards, extra = method.loss(ro, plan)
        acc.backward(loss)
        for p in params:  # adapters outside this stage's set never move
            if not p.requires_grad:
                p.grad = None
        grad_norm = float(acc.clip_grad_norm_([p for p in params if p.requires_grad], cfg.max_grad_norm))
        if math.isfinite(grad_norm) and math.isfinite(float(loss.detach())):
            ctx["opt"].step()
        if zero_grad:
            ctx["opt"].zero_grad(set_to_none=True)
    reward = float(acc.gather(rewards).mean())
    sync(ctx["device"])
    return {"seconds": time.perf_counter() - t0, "loss": float(loss.detach()), "grad_norm": grad_norm,
            "reward": reward, "unet_calls": extra.get("unet_calls", len(plan.steps)),
            "graph_calls": extra.get("graph_calls", plan.graph_calls), "stage": plan.info.get("stage", 0)}

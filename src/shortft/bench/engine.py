"""The training iteration as shortft runs it, for the benchmarks: a context built as `train` builds it
(backend, method, reward, AdamW, accelerate) and one optimiser step through `train.optimizer_step`, the
loop's own code."""

from __future__ import annotations

import time

from shortft.bench import rss_mark, rss_peak, sync


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


def build_context(overrides: dict, preset: str | None = "world", prepare: bool = True) -> dict:
    """Backend, method, reward, optimizer for a config, exactly as `train` builds them (same seed, so the
    same LoRA initialisation); `prepare=False` leaves accelerate out (the hand-written baseline's)."""
    import torch

    from shortft import lora
    from shortft.config import build_config
    from shortft.prompts import load_prompts
    from shortft.train import build_accelerator, build_model, build_reward_fn

    cfg = build_config(preset, overrides=overrides)
    acc = build_accelerator(cfg) if prepare else None  # resolves dtype / mixed precision as training does
    device = acc.device if acc else torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    torch.manual_seed(cfg.seed)
    backend, method = build_model(cfg, device)
    reward = build_reward_fn(cfg, device)
    params = lora.set_trainable(backend.net, method.adapter_names())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if acc:
        backend.denoiser, opt = acc.prepare(backend.denoiser, opt)
    return dict(cfg=cfg, acc=acc, device=device, backend=backend, method=method, reward=reward, params=params,
                opt=opt, prompts=load_prompts(cfg.prompts), trainable=method.adapter_names())


def train_iteration(ctx: dict, it: int, progress: float) -> dict:
    """Step `it` of `train`'s loop as it runs there: the trainable adapters of the stage (set when they
    change, as the loop does: a parameter walk), then `train.optimizer_step` (rollout, plan, chain, decode,
    reward, backward, clipping, AdamW)."""
    from shortft import lora
    from shortft.train import optimizer_step

    cfg, method, backend, acc = ctx["cfg"], ctx["method"], ctx["backend"], ctx["acc"]
    sync(ctx["device"])
    t0, c0 = time.perf_counter(), time.process_time()
    if method.trainable(progress) != ctx["trainable"]:
        ctx["trainable"] = method.trainable(progress)
        lora.set_trainable(backend.net, ctx["trainable"])
    rewards, info, grad_norm, _, loss = optimizer_step(cfg, acc, backend, method, ctx["reward"], ctx["prompts"],
                                                       ctx["params"], ctx["opt"], it, progress)
    reward = float(acc.gather(rewards).mean())
    sync(ctx["device"])
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "loss": loss,
            "grad_norm": grad_norm, "reward": reward, "unet_calls": info["unet_calls"],
            "graph_calls": info["graph_calls"], "stage": info.get("stage", 0)}

"""The training loop: one function, read top to bottom. Setup lives in the build_* helpers.

Every rollout: draw prompts and noise, let the method build a plan, run it through the chain engine,
score the final image with the reward, and ascend the reward. accelerate handles devices, DDP (the
chain calls the prepared denoiser, so gradients synchronise), mixed precision and accumulation.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shortft import lora
from shortft.config import TrainConfig, to_dict
from shortft.methods import METHODS, Method, Rollout
from shortft.prompts import load_prompts
from shortft.sample import generate, run_metadata

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- setup helpers ------------------------------------------------------------------------------------------
def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Progressive training changes which adapters get gradient, so DDP must tolerate unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    gpu = torch.cuda.is_available() and not cfg.cpu
    if cfg.dtype == "auto":
        cfg.dtype = "fp16" if gpu else "fp32"
    if cfg.mixed_precision == "auto":
        cfg.mixed_precision = "fp16" if gpu else "no"
    return Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision,
                       gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=[ddp])


def resolve_shortcut(cfg: TrainConfig) -> None:
    """"" means the embedded world's shipped shortcut; other models must name theirs."""
    if cfg.shortcut or cfg.method not in ("shortft", "shortcut-ft"):
        return
    if cfg.model != "world":
        raise ValueError(f"method {cfg.method!r} needs a shortcut LoRA for {cfg.model!r}: pass --shortcut "
                         "(e.g. ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors) or make one with "
                         "`shortft distill`")
    from shortft.world import WORLD_SHORTCUT

    cfg.shortcut = str(WORLD_SHORTCUT)


def build_model(cfg: TrainConfig, device) -> tuple[object, Method]:
    """Backend with the method's adapters (and shortcut) on its UNet."""
    from shortft.backends import SDBackend

    resolve_shortcut(cfg)
    backend = SDBackend.load(cfg.model, device=device, dtype=DTYPES[cfg.dtype])
    method = METHODS[cfg.method](cfg)
    method.setup(backend)
    return backend, method


def build_reward_fn(cfg: TrainConfig, device):
    from shortft.rewards import RewardSettings, build_reward

    paths = dict(kv.split("=", 1) for kv in cfg.reward_paths.split(",") if kv.strip())
    settings = RewardSettings(device=device, paths=paths)
    reward = build_reward(cfg.reward, settings)
    if cfg.reg_weight:
        from shortft.rewards import build_regularised_reward

        reward = build_regularised_reward(reward, cfg.reg_weight, settings)
    return reward


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def step_rng(cfg: TrainConfig, step: int, rank: int, micro: int) -> tuple[random.Random, torch.Generator]:
    """Every random draw of a rollout comes from (seed, step, rank, micro-batch): resume is exact without
    saving generator state, and processes draw different prompts and noise."""
    key = ((cfg.seed * 1_000_003 + step) * 1009 + rank) * 101 + micro
    return random.Random(key), torch.Generator().manual_seed(key)


# --- checkpoints --------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, unet, method: Method, optimizer, state: dict) -> Path:
    """Adapters (exact tensors), optimizer, step and history, written to a temp folder then renamed."""
    final = run_dir / "checkpoints" / f"step-{state['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in unet.named_parameters()
               if any(f".{a}." in n for a in method.adapter_names())}
    save_file(tensors, tmp / "adapters.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted((run_dir / "checkpoints").glob("step-*"))[:-2]:  # keep the two newest
        if not old.name.endswith(".tmp"):
            shutil.rmtree(old)
    return final


def load_checkpoint(run_dir: Path, unet, optimizer) -> dict:
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir / 'checkpoints'}")
    ckpt = ckpts[-1]
    params = dict(unet.named_parameters())
    for name, value in load_file(ckpt / "adapters.safetensors").items():
        params[name].data.copy_(value)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())


def save_loras(run_dir: Path, unet, method: Method, cfg: TrainConfig) -> None:
    """The deliverable: one diffusers LoRA file per adapter plus the per-timestep schedule."""
    for name in method.adapter_names():
        lora.save_lora(unet, name, run_dir / "lora" / f"{name}.safetensors")
    (run_dir / "lora" / "shortft.json").write_text(json.dumps(run_metadata(method, to_dict(cfg)), indent=1))


# --- evaluation on fixed prompts and seeds ------------------------------------------------------------------
def evaluate(backend, method: Method, reward, prompts: list[str], model: str) -> tuple[dict, torch.Tensor]:
    """Mean reward (and, on the embedded world, the evaluator's prompt fidelity) of the inference chain."""
    images = generate(backend, method.sample_plan(), prompts, list(range(len(prompts))))
    with torch.no_grad():
        scores = reward(images.to(backend.device), prompts).float().cpu()
    out = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0}
    if model == "world":
        from shortft.world.evaluator import prompt_fidelity

        out["fidelity"] = prompt_fidelity(images, prompts)
    return out, images


# --- the loop -----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    """Train `cfg.method` on `cfg.model` with `cfg.reward`; return the run folder."""
    from tqdm.auto import tqdm

    from shortft.images import save_grid
    from shortft.report import plot_curve, write_summary

    prompts, eval_prompts = load_prompts(cfg.prompts), load_prompts(cfg.eval_prompts)[: cfg.eval_count]  # fail early
    accelerator = build_accelerator(cfg)
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    run_dir = Path(cfg.resume) if cfg.resume else default_run_dir(cfg)
    if cfg.resume and not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--resume {cfg.resume!r}: no run folder with config.yaml there")
    torch.manual_seed(cfg.seed)  # LoRA initialisation (DDP also broadcasts rank 0's weights)
    backend, method = build_model(cfg, accelerator.device)
    reward = build_reward_fn(cfg, accelerator.device)
    unet = backend.unet
    params = lora.set_trainable(unet, method.adapter_names())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    backend.denoiser, optimizer = accelerator.prepare(backend.denoiser, optimizer)

    history, start, skipped = [], 0, 0
    if cfg.resume:
        state = load_checkpoint(run_dir, unet, optimizer)
        start, skipped, history = state["step"], state["skipped"], state["history"]
    elapsed = sum(h["seconds"] for h in history)  # training time so far (budgets survive a resume)
    calls = history[-1]["unet_calls"] if history else 0
    writer = None
    if is_main:
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        writer = SummaryWriter(run_dir / "tb")
        if cfg.wandb:
            import wandb

            wandb.init(project="shortft", config=to_dict(cfg), dir=str(run_dir))
        n_params = sum(p.numel() for p in params)
        print(f"shortft: {cfg.method} on {cfg.model}, reward {cfg.reward}; {n_params:,} trainable parameters in "
              f"{len(method.adapter_names())} adapter(s); {cfg.batch_size * cfg.grad_accum * accelerator.num_processes} "
              f"rollouts per step over {accelerator.num_processes} process(es); run folder {run_dir}")
    before = None
    if is_main and start == 0:
        before, images = evaluate(backend, method, reward, eval_prompts, cfg.model)
        save_grid(images, run_dir / "grids" / "step-0000000.png", scale=2)
        (run_dir / "before.json").write_text(json.dumps(before, indent=1))
        print(f"before training: eval reward {before['reward']:.4f}")

    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not is_main,
               desc=cfg.method, dynamic_ncols=True)
    for step in bar:
        # progress in [0, 1) drives progressive training; a time or UNet-call budget can end training early
        progress = max(step / cfg.max_steps, elapsed / cfg.time_budget if cfg.time_budget else 0.0,
                       calls / cfg.unet_call_budget if cfg.unet_call_budget else 0.0)
        if progress >= 1:
            break
        t0 = time.perf_counter()
        lora.set_trainable(unet, method.trainable(progress))  # progressive training: stage i trains i..k
        step_rewards, info = [], {}
        for micro in range(cfg.grad_accum):
            with accelerator.accumulate(backend.denoiser):
                rng, gen = step_rng(cfg, step, rank, micro)
                batch = [rng.choice(prompts) for _ in range(cfg.batch_size)]
                x_T = torch.randn(backend.latent_shape(cfg.batch_size), generator=gen).to(backend.device)
                cond, uncond = backend.encode_prompts(batch), backend.encode_prompts([""] * cfg.batch_size)
                plan = method.plan(progress, rng)
                loss, rewards, extra = method.loss(Rollout(backend, batch, cond, uncond, x_T, reward, gen), plan)
                accelerator.backward(loss)
                step_rewards.append(rewards)
                info = {**plan.info, "graph_calls": plan.graph_calls, "unet_calls": len(plan.steps), **extra}
                calls += info["unet_calls"]
                if accelerator.sync_gradients:
                    for p in params:  # adapters outside this stage's set never move (AdamW would decay them)
                        if not p.requires_grad:
                            p.grad = None
                    grad_norm = accelerator.clip_grad_norm_([p for p in params if p.requires_grad], cfg.max_grad_norm)
                    finite = math.isfinite(float(grad_norm)) and math.isfinite(float(loss.detach()))
                    if finite or accelerator.scaler is not None:  # a grad scaler (fp16) skips and rescales itself
                        optimizer.step()
                    skipped += int(not finite)
                optimizer.zero_grad(set_to_none=True)
        mean_reward = float(accelerator.gather(torch.cat(step_rewards).to(accelerator.device)).mean())
        seconds = time.perf_counter() - t0
        elapsed += seconds
        history.append({"step": step + 1, "reward": mean_reward, "grad_norm": float(grad_norm), "seconds": seconds,
                        "unet_calls": calls, "graph_calls": info["graph_calls"], "stage": info.get("stage", 0)})
        if is_main:
            bar.set_postfix(reward=f"{mean_reward:.4f}", s_it=f"{history[-1]['seconds']:.2f}", skipped=skipped)
            if (step + 1) % cfg.log_every == 0:
                writer.add_scalar("train/reward", mean_reward, step + 1)
                writer.add_scalar("train/grad_norm", float(grad_norm), step + 1)
                writer.add_scalar("train/skipped_steps", skipped, step + 1)
                for key, value in info.items():
                    if isinstance(value, (int, float)):
                        writer.add_scalar(f"plan/{key}", value, step + 1)
                if cfg.wandb:
                    import wandb

                    wandb.log({"reward": mean_reward, "grad_norm": float(grad_norm), **info}, step=step + 1)
            if cfg.grid_every and (step + 1) % cfg.grid_every == 0 and step + 1 < cfg.max_steps:
                _, images = evaluate(backend, method, reward, eval_prompts, cfg.model)
                save_grid(images, run_dir / "grids" / f"step-{step + 1:07d}.png", scale=2)
        if (step + 1) % cfg.checkpoint_every == 0:
            accelerator.wait_for_everyone()
            if is_main:
                save_checkpoint(run_dir, unet, method, optimizer,
                                {"step": step + 1, "skipped": skipped, "history": history})
    bar.close()

    accelerator.wait_for_everyone()
    final_step = history[-1]["step"] if history else 0
    if is_main:
        if final_step % cfg.checkpoint_every:
            save_checkpoint(run_dir, unet, method, optimizer, {"step": final_step, "skipped": skipped, "history": history})
        save_loras(run_dir, unet, method, cfg)
        after, images = evaluate(backend, method, reward, eval_prompts, cfg.model)
        save_grid(images, run_dir / "grids" / f"step-{final_step:07d}.png", scale=2)
        if before is None and (run_dir / "before.json").is_file():
            before = json.loads((run_dir / "before.json").read_text())
        plot_curve(history, run_dir / "reward_curve.png", title=f"{cfg.method} / {cfg.reward}")
        write_summary(run_dir, before, after, history, skipped)
        writer.close()
        print(f"done: eval reward {before['reward']:.4f} -> {after['reward']:.4f}; run folder {run_dir}")
    accelerator.end_training()
    return run_dir

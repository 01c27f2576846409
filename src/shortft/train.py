"""The training loop: one function, read top to bottom. Setup lives in the build_* helpers.

Every rollout: draw prompts and noise, let the method build a plan, run it through the chain engine,
score the final image with the reward, and ascend the reward. accelerate handles devices, DDP (the
chain calls the prepared denoiser, so gradients synchronise), mixed precision and accumulation.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shortft import files, lora
from shortft.config import TrainConfig, to_dict
from shortft.errors import MissingFileError, TrainingStopped
from shortft.methods import METHODS, Method, Rollout
from shortft.methods.base import NO_SHORTCUT, shortcut_file
from shortft.prompts import load_prompts
from shortft.run_folder import load_checkpoint, save_checkpoint, save_loras, write_config
from shortft.sample import generate
from shortft.stopping import EXIT_STATUS, StopSignal

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Run:
    """What `train` returns: the run folder and the trained model still in memory."""

    dir: Path
    backend: object  # the backend whose UNet carries the trained adapters
    method: Method
    summary: dict | None  # summary.json's content (None on processes other than the main one)


# --- setup helpers ------------------------------------------------------------------------------------------
HALF = {"sd": "fp16", "sdxl": "fp16", "sd3": "bf16"}  # each family's usual half precision on a GPU


def precision(cfg: TrainConfig) -> tuple[torch.dtype, str]:
    """(dtype of the frozen weights, accelerate's mixed_precision). "auto": on a GPU the family's half precision
    (fp16 for the UNet families, bf16 for SD 3), on a CPU fp32 and no autocast. LoRAs always train in fp32."""
    from shortft.backends import model_family, resolve_model

    half = HALF[model_family(resolve_model(cfg.model))] if torch.cuda.is_available() and not cfg.cpu else None
    dtype = cfg.dtype if cfg.dtype != "auto" else (half or "fp32")
    mixed = cfg.mixed_precision if cfg.mixed_precision != "auto" else (half or "no")
    return DTYPES[dtype], mixed


def build_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Progressive training changes which adapters get gradient, so DDP must tolerate unused parameters. The
    # networks' buffers are constants (SD 3's positional embedding): broadcasting them on every call would cost a
    # collective per call, and would hang the main process's evaluation, which the other ranks do not run.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    return Accelerator(cpu=cfg.cpu, mixed_precision=precision(cfg)[1], gradient_accumulation_steps=cfg.grad_accum,
                       kwargs_handlers=[ddp])


def check_files(cfg: TrainConfig) -> None:
    """Find the model folder and the shortcut file (cache lookups, no loading): a missing one fails at once."""
    from shortft.backends import resolve_model

    resolve_model(cfg.model)
    if METHODS[cfg.method].uses_shortcut and cfg.shortcut != NO_SHORTCUT:
        lora.resolve_file(shortcut_file(cfg))


def build_model(cfg: TrainConfig, device) -> tuple[object, Method]:
    """Backend with the method's adapters (and shortcut) on its UNet."""
    from shortft.backends import load_backend

    backend = load_backend(cfg.model, device=device, dtype=precision(cfg)[0])
    backend.resolution, backend.vae_slicing = cfg.resolution, cfg.vae_slicing
    backend.denoiser.checkpoint_all = cfg.checkpoint_calls
    if cfg.vae_checkpoint:
        backend.vae.enable_gradient_checkpointing()
    method = METHODS[cfg.method](cfg)
    method.setup(backend)
    if precision(cfg)[1] != "no":  # accelerate runs the denoiser under autocast
        lora.keep_input_dtype(backend.net)
    return backend, method


def build_reward_fn(cfg: TrainConfig, device):
    from shortft.rewards import CheckedReward, RewardSettings, build_regularised_reward, build_reward, parse_paths

    settings = RewardSettings(device=device, dtype=DTYPES[cfg.reward_dtype], paths=parse_paths(cfg.reward_paths))
    reward = build_reward(cfg.reward, settings)
    if cfg.reg_weight:
        reward = build_regularised_reward(reward, cfg.reg_weight, settings)
    return CheckedReward(reward, cfg.reward)


def step_rng(cfg: TrainConfig, step: int, rank: int, micro: int) -> tuple[random.Random, torch.Generator]:
    """Every random draw of a rollout comes from (seed, step, rank, micro-batch): resume is exact without
    saving generator state, and processes draw different prompts and noise."""
    key = ((cfg.seed * 1_000_003 + step) * 1009 + rank) * 101 + micro
    return random.Random(key), torch.Generator().manual_seed(key)


def make_rollout(cfg: TrainConfig, backend, prompts: list[str], reward, step: int, rank: int = 0, micro: int = 0):
    """The Rollout of (step, rank, micro-batch) and the rng its plan draws from."""
    rng, gen = step_rng(cfg, step, rank, micro)
    batch = [rng.choice(prompts) for _ in range(cfg.batch_size)]
    x_T = torch.randn(backend.latent_shape(cfg.batch_size), generator=gen).to(backend.device)
    cond, uncond = backend.encode_prompts(batch), backend.encode_prompts([""] * cfg.batch_size)
    return Rollout(backend, batch, cond, uncond, x_T, reward, gen), rng


# --- evaluation on fixed prompts and seeds ------------------------------------------------------------------
def evaluate(backend, method: Method, reward, prompts: list[str]) -> tuple[dict, torch.Tensor]:
    """Mean reward (and, on world prompts, the evaluator's prompt fidelity) of the inference chain."""
    from shortft.evaluate import score_images

    images = generate(backend, method.sample_plan(), prompts, list(range(len(prompts))))
    scores = score_images(images.to(backend.device), prompts, {"reward": reward}, batch_size=len(prompts))
    out = {"reward": scores["summary"]["reward"]["mean"], "reward_std": scores["summary"]["reward"]["std"]}
    if isinstance(scores["prompt_fidelity"], dict):
        out["fidelity"] = scores["prompt_fidelity"]
    return out, images


# --- logging ------------------------------------------------------------------------------------------------
class Logger:
    """Rank 0's outputs during training: config.yaml, TensorBoard scalars, optional W&B, the header line."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, n_params: int, n_adapters: int, processes: int):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg = cfg
        self.writer = SummaryWriter(run_dir / "tb")
        if cfg.wandb:
            import wandb

            wandb.init(project="shortft", config=to_dict(cfg), dir=str(run_dir))
        print(f"shortft: {cfg.method} on {cfg.model}, reward {cfg.reward}; {n_params:,} trainable parameters in "
              f"{n_adapters} adapter(s); {cfg.batch_size * cfg.grad_accum * processes} rollouts per step over "
              f"{processes} process(es); run folder {run_dir}")

    def log(self, row: dict, info: dict) -> None:
        """TensorBoard (and W&B) scalars of one optimiser step, every `log_every` steps."""
        step = row["step"]
        if step % self.cfg.log_every:
            return
        for key in ("reward", "grad_norm", "skipped"):
            self.writer.add_scalar(f"train/{key}", row[key], step)
        for key, value in info.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(f"plan/{key}", value, step)
        if self.cfg.wandb:
            import wandb

            wandb.log({**row, **info}, step=step)

    def close(self) -> None:
        self.writer.close()


# --- the loop -----------------------------------------------------------------------------------------------
def progress_of(cfg: TrainConfig, steps: int, seconds: float, calls: int) -> float:
    """The share of its budget a run has used after `steps` optimiser steps, `seconds` of training and `calls`
    network calls: whichever of max_steps, time_budget and unet_call_budget runs out first ends it at 1."""
    return max(steps / cfg.max_steps, seconds / cfg.time_budget if cfg.time_budget else 0.0,
               calls / cfg.unet_call_budget if cfg.unet_call_budget else 0.0)


def step_info(plan, extra: dict) -> dict:
    """What one rollout logs: the plan's info and call counts, overridden by the scalars the method's loss
    reports (DRaFT-LV's re-noised copies add calls), read here rather than in the loss (counts stay int)."""
    return {**plan.info, "graph_calls": plan.graph_calls, "unet_calls": len(plan.steps),
            **{k: v.item() if torch.is_tensor(v) else v for k, v in extra.items()}}


def optimizer_step(cfg: TrainConfig, accelerator, backend, method: Method, reward, prompts: list[str], params,
                   optimizer, step: int, progress: float) -> tuple[torch.Tensor, dict, float, bool, float]:
    """One optimiser step: `grad_accum` rollouts (plan, chain, reward, backward), clipping and AdamW.
    Returns (rewards, plan info, gradient norm, finite, the last rollout's loss); a non-finite loss or gradient
    skips the update on every rank alike. Nothing of the step's graph outlives this function."""
    step_rewards, calls = [], 0
    for micro in range(cfg.grad_accum):
        with accelerator.accumulate(backend.denoiser):
            rollout, rng = make_rollout(cfg, backend, prompts, reward, step, accelerator.process_index, micro)
            plan = method.plan(progress, rng)
            loss, rewards, extra = method.loss(rollout, plan)
            accelerator.backward(loss)
            step_rewards.append(rewards)
            info = step_info(plan, extra)
            calls += info["unet_calls"]
            if accelerator.sync_gradients:
                for p in params:  # adapters outside this stage's set never move (AdamW would decay them)
                    if not p.requires_grad:
                        p.grad = None
                grad_norm = float(accelerator.clip_grad_norm_([p for p in params if p.requires_grad],
                                                              cfg.max_grad_norm))
                loss_ok = torch.tensor([float(math.isfinite(float(loss.detach())))], device=accelerator.device)
                finite = math.isfinite(grad_norm) and bool(accelerator.gather(loss_ok).min() > 0)
                if finite or accelerator.scaler is not None:  # a grad scaler (fp16) skips and rescales itself
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return torch.cat(step_rewards), {**info, "unet_calls": calls}, grad_norm, finite, float(loss.detach())


def train(cfg: TrainConfig) -> Run:
    """Train `cfg.method` on `cfg.model` with `cfg.reward`; return the run (folder and in-memory model).
    SIGINT / SIGTERM end it after the step in progress with a checkpoint (`TrainingStopped`, status 130 / 143);
    one that arrives during the final evaluation lets the run finish."""
    with StopSignal() as stop:
        return training_loop(cfg, stop)


def training_loop(cfg: TrainConfig, stop: StopSignal) -> Run:
    """The loop of `train`; `stop` says whether a signal asked it to end."""
    from tqdm.auto import tqdm

    from shortft.images import save_grid

    prompts, eval_prompts = load_prompts(cfg.prompts), load_prompts(cfg.eval_prompts)[: cfg.eval_count]  # fail early
    if cfg.resume and not Path(cfg.resume).is_dir():
        raise MissingFileError(f"--resume {cfg.resume!r}: no such run folder")
    run_dir = Path(cfg.resume or cfg.run_dir or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    accelerator = build_accelerator(cfg)
    is_main = accelerator.is_main_process
    check_files(cfg)
    reward = build_reward_fn(cfg, accelerator.device)  # before the model: missing reward weights fail fast
    torch.manual_seed(cfg.seed)  # LoRA initialisation (DDP also broadcasts rank 0's weights)
    backend, method = build_model(cfg, accelerator.device)
    if is_main:  # everything the config names exists: now the run folder may be written
        write_config(run_dir, cfg)
    unet = backend.net
    params = lora.set_trainable(unet, method.adapter_names())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    backend.denoiser, optimizer = accelerator.prepare(backend.denoiser, optimizer)
    state = load_checkpoint(run_dir, unet, optimizer) if cfg.resume else None
    state = state or {"step": 0, "skipped": 0, "history": []}
    history, trainable, bad, saved = state["history"], method.adapter_names(), 0, state["step"]
    elapsed = sum(h["seconds"] for h in history)  # training time so far (budgets survive a resume)
    calls = history[-1]["unet_calls"] if history else 0
    logger = Logger(cfg, run_dir, sum(p.numel() for p in params), len(method.adapter_names()),
                    accelerator.num_processes) if is_main else None
    if is_main and state["step"] == 0:
        before, images = evaluate(backend, method, reward, eval_prompts)
        save_grid(images, run_dir / "grids" / "step-0000000.png", scale=2)
        files.write_json(run_dir / "before.json", before)
        print(f"before training: eval reward {before['reward']:.4f}")

    bar = tqdm(range(state["step"], cfg.max_steps), initial=state["step"], total=cfg.max_steps,
               disable=not is_main, desc=cfg.method, dynamic_ncols=True)
    for step in bar:
        progress = progress_of(cfg, step, elapsed, calls)  # drives progressive training; 1 ends the run
        if progress >= 1 or stop.agreed(accelerator):
            break
        t0 = time.perf_counter()
        if method.trainable(progress) != trainable:  # progressive training: stage i trains lora i..k
            trainable = method.trainable(progress)
            lora.set_trainable(unet, trainable)
        rewards, info, grad_norm, finite, _ = optimizer_step(cfg, accelerator, backend, method, reward, prompts,
                                                             params, optimizer, step, progress)
        mean_reward = float(accelerator.gather(rewards.to(accelerator.device)).mean())
        seconds = time.perf_counter() - t0
        elapsed, calls, bad = elapsed + seconds, calls + info["unet_calls"], 0 if finite else bad + 1
        state["skipped"] += int(not finite)
        history.append({"step": step + 1, "reward": mean_reward, "grad_norm": grad_norm, "seconds": seconds,
                        "unet_calls": calls, "graph_calls": info["graph_calls"], "stage": info.get("stage", 0),
                        "skipped": state["skipped"]})
        state["step"] = step + 1
        if is_main:
            bar.set_postfix(reward=f"{mean_reward:.4f}", s_it=f"{seconds:.2f}", skipped=state["skipped"])
            logger.log(history[-1], info)
            if cfg.grid_every and (step + 1) % cfg.grid_every == 0 and step + 1 < cfg.max_steps:
                save_grid(evaluate(backend, method, reward, eval_prompts)[1],
                          run_dir / "grids" / f"step-{step + 1:07d}.png", scale=2)
        if bad >= cfg.max_skipped_steps:
            raise TrainingStopped(f"{bad} steps in a row had a non-finite reward or gradient (reward "
                                  f"{cfg.reward!r}, first at step {step + 2 - bad}); stopped. The newest "
                                  f"checkpoint, from before them, is in {run_dir / 'checkpoints'}", status=1)
        if (step + 1) % cfg.checkpoint_every == 0 and not bad:  # a bad streak keeps the last good checkpoint
            saved = checkpoint(accelerator, run_dir, unet, method, optimizer, state)
        for f in cfg.snapshots:  # the LoRAs as they are when the run has used fraction f of its budget
            if is_main and progress < f <= progress_of(cfg, step + 1, elapsed, calls):
                save_loras(run_dir / "snapshots" / f"{f:g}", backend, method, cfg)
    bar.close()
    received = stop.agreed(accelerator)
    if received:
        if saved != state["step"]:
            checkpoint(accelerator, run_dir, unet, method, optimizer, state)
        accelerator.end_training()
        raise TrainingStopped(f"stopped by {signal.Signals(received).name} after step {state['step']} "
                              f"(checkpoint saved); resume with: shortft train --resume {run_dir}",
                              status=EXIT_STATUS[received])
    if saved != state["step"]:
        checkpoint(accelerator, run_dir, unet, method, optimizer, state)
    summary = finish(cfg, run_dir, accelerator, backend, method, reward, eval_prompts, state, logger)
    return Run(run_dir, backend, method, summary)


def checkpoint(accelerator, run_dir: Path, unet, method: Method, optimizer, state: dict) -> int:
    """Every rank waits; rank 0 writes the checkpoint once. Returns the step saved."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(run_dir, unet, method, optimizer, state)
    return state["step"]


def finish(cfg, run_dir, accelerator, backend, method, reward, eval_prompts, state, logger) -> dict | None:
    """LoRA files, the after-evaluation, curve, summary (rank 0)."""
    from shortft.images import save_grid
    from shortft.report import plot_curve, write_summary

    accelerator.wait_for_everyone()
    summary = None
    if accelerator.is_main_process:
        save_loras(run_dir, backend, method, cfg)
        files.write_json(run_dir / "history.json", state["history"])
        after, images = evaluate(backend, method, reward, eval_prompts)
        save_grid(images, run_dir / "grids" / f"step-{state['step']:07d}.png", scale=2)
        before = json.loads((run_dir / "before.json").read_text()) if (run_dir / "before.json").is_file() else None
        plot_curve(state["history"], run_dir / "reward_curve.png", title=f"{cfg.method} / {cfg.reward}")
        summary = write_summary(run_dir, before, after, state["history"], state["skipped"])
        logger.close()
        if before:
            print(f"done: eval reward {before['reward']:.4f} -> {after['reward']:.4f}; run folder {run_dir}")
    accelerator.end_training()
    return summary

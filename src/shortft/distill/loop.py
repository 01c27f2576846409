"""`distill`: train the shortcut LoRA. Setup lives in `build_model`; the loop reads top to bottom.

The work dir holds everything needed to resume: `checkpoint/` (shortft.files: the adapter's tensors and
the torch.Generator's state in safetensors, the optimizer state, the Python rng's state, step, history
and config in state.json), `pool.safetensors` (the teacher's trajectories), and at the end
`distill.json` (config, edges, timings, per-step history) and `loss.png`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shortft.chain import batch_to
from shortft.config import to_dict
from shortft.distill.config import RESUMABLE, STUDENT, DistillConfig, lora_targets, model_defaults, validate
from shortft.distill.loss import SegmentLoss, segment_layout
from shortft.distill.pool import build_pool, load_pool, pool_key, save_pool
from shortft.errors import ConfigError
from shortft.schedule import cosine_lr

if TYPE_CHECKING:
    import torch

# torch, peft and diffusers (and shortft.files / shortft.report, which import torch) are imported inside
# the functions: the CLI imports this package to register `shortft distill`, and `shortft --help` should
# not pay for them.

CHECKPOINT = "checkpoint"  # folder in the work dir
POOL = "pool.safetensors"  # file in the work dir
GENERATOR = "generator"  # key of the torch.Generator's state among the checkpoint's tensors (no parameter has it)


def learning_rate(cfg: DistillConfig, step: int, elapsed: float) -> float:
    """Linear warm-up to cfg.lr, then constant or a cosine to 0. The cosine follows whichever runs out
    first, the step count or the time budget, so a time-budgeted run still ends at a low rate."""
    progress = 0.0
    if cfg.decay == "cosine":
        progress = max(step / max(1, cfg.steps), elapsed / cfg.time_budget if cfg.time_budget else 0.0)
    return cosine_lr(cfg.lr, step, cfg.warmup, progress)


def adapter_tensors(unet) -> dict[str, torch.nn.Parameter]:
    """The shortcut adapter's parameters by their name on the UNet."""
    return {n: p for n, p in unet.named_parameters() if f".{STUDENT}." in n and ".lora_" in n}


# --- setup ------------------------------------------------------------------------------------------------
def build_model(cfg: DistillConfig, prompts: list[str]):
    """(backend, contexts (one row per prompt, on the CPU), uncond (one row), trainable LoRA parameters): the
    frozen model with a fresh shortcut adapter, the only trainable part."""
    import torch

    from shortft import lora
    from shortft.backends import load_backend
    from shortft.chain import batch_cat, batch_to
    from shortft.train import DTYPES

    torch.manual_seed(cfg.seed)  # LoRA initialisation
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = load_backend(cfg.model, device=device, dtype=DTYPES[cfg.dtype])
    contexts = batch_to(batch_cat(*[backend.encode_prompts(prompts[i:i + 64]) for i in range(0, len(prompts), 64)]),
                        "cpu")
    uncond = backend.encode_prompts([""])
    lora.add_lora(backend.net, STUDENT, cfg.rank, targets=lora_targets(cfg, backend.lora_format))
    return backend, contexts, uncond, lora.set_trainable(backend.net, [STUDENT])


# --- checkpoints ------------------------------------------------------------------------------------------
def save_state(work: Path, unet, optimizer, step: int, history: list[dict], cfg: DistillConfig,
               rng: random.Random, generator: torch.Generator) -> Path:
    """Everything a resume needs, written atomically (shortft.files.save_checkpoint)."""
    from shortft import files

    version, internal, gauss = rng.getstate()
    state = {"step": step, "history": history, "config": to_dict(cfg), "rng": [version, list(internal), gauss]}
    tensors = {**adapter_tensors(unet), GENERATOR: generator.get_state()}
    return files.save_checkpoint(work / CHECKPOINT, tensors, state, optimizer.state_dict())


def read_checkpoint(folder: Path, cfg: DistillConfig) -> tuple | None:
    """The checkpoint in `folder` (tensors, state, optimizer state), None when there is none. Read and
    checked before any model loads: a damaged one, or one made with another config (beyond the
    RESUMABLE fields), is refused."""
    from shortft import files

    if not folder.is_dir():
        return None
    tensors, state, optimizer_state = files.load_checkpoint(folder)
    old = {k: v for k, v in state["config"].items() if k not in RESUMABLE}
    new = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE}
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
        raise ConfigError(f"checkpoint {folder} was made with a different config {diff} (old, new); "
                          "pass --fresh to start over or use another --work-dir")
    return tensors, state, optimizer_state


def restore(checkpoint: tuple, unet, optimizer, rng: random.Random,
            generator: torch.Generator) -> tuple[int, list[dict]]:
    """Put a read checkpoint back into the adapter, the optimizer and both random streams; (step, history)."""
    tensors, state, optimizer_state = checkpoint
    params = adapter_tensors(unet)
    for name, value in tensors.items():
        if name != GENERATOR:
            params[name].data.copy_(value)
    generator.set_state(tensors[GENERATOR])
    optimizer.load_state_dict(optimizer_state)
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return state["step"], state["history"]


# --- the loop ---------------------------------------------------------------------------------------------
def distill(cfg: DistillConfig, fresh: bool = False) -> Path:
    """Train the shortcut LoRA and write it to `cfg.out`; return that path. `fresh` ignores a checkpoint
    in the work dir (an unchanged teacher pool is still reused)."""
    import torch
    from tqdm.auto import tqdm

    from shortft.prompts import load_prompts

    validate(cfg)
    defaults = model_defaults(cfg.model)
    guidance, num_steps = cfg.guidance or defaults["guidance"], cfg.num_steps or defaults["num_steps"]
    prompts = load_prompts(cfg.prompts or defaults["prompts"])
    work = Path(cfg.work_dir or f"runs/distill-{Path(cfg.out).stem}")
    # what the work dir holds is read (and refused, if it must be) before the model loads
    checkpoint = None if fresh else read_checkpoint(work / CHECKPOINT, cfg)
    key = pool_key(cfg, prompts, guidance, num_steps)
    stored_pool = load_pool(work / POOL, key)
    work.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backend, contexts, uncond, params = build_model(cfg, prompts)
    ts = backend.timesteps(num_steps)
    layout = segment_layout(ts, cfg.segments)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng, generator = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    if checkpoint is not None:
        step, history = restore(checkpoint, backend.net, optimizer, rng, generator)
        print(f"distill: resuming {work / CHECKPOINT} at step {step}")
    t0 = time.time()
    if stored_pool is None:
        stored_pool = build_pool(backend, ts, batch_to(contexts, backend.device), uncond, cfg, guidance)
        save_pool(work / POOL, key, *stored_pool)
    pool, pool_prompts = stored_pool
    pool_seconds = time.time() - t0
    objective = SegmentLoss(backend, ts, layout, contexts, uncond, pool, pool_prompts, cfg, guidance)
    describe(cfg, ts, layout, guidance, params, len(pool), pool_seconds, work)

    elapsed = history[-1]["seconds"] if history else 0.0
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="distill", dynamic_ncols=True)
    tick = time.time()
    for step in bar:
        if cfg.time_budget and elapsed >= cfg.time_budget:
            print(f"distill: time budget of {cfg.time_budget:.0f} s reached at step {step}")
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, elapsed)
        loss, per_segment = objective.loss(objective.draw(rng, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        now = time.time()
        elapsed, tick = elapsed + now - tick, now
        history.append({"step": step + 1, "loss": loss.item(), "segments": per_segment, "seconds": elapsed})
        recent = [h["loss"] for h in history[-50:]]
        bar.set_postfix(loss=f"{loss.item():.4g}", avg50=f"{sum(recent) / len(recent):.4g}")
        if (step + 1) % cfg.checkpoint_every == 0:
            save_state(work, backend.net, optimizer, step + 1, history, cfg, rng, generator)
            tick = time.time()  # checkpoint time is not training time
    bar.close()
    steps_done = history[-1]["step"] if history else 0
    save_state(work, backend.net, optimizer, steps_done, history, cfg, rng, generator)
    log = {"config": to_dict(cfg), "guidance": guidance, "steps_done": steps_done, "train_seconds": elapsed,
           "pool_seconds": pool_seconds, "edges": [ts[s["edge"]] for s in layout], "history": history}
    return write_outputs(cfg, backend, work, log, [f"{ts[s['start']]}->{ts[s['edge']]}" for s in layout])


# --- reporting --------------------------------------------------------------------------------------------
def describe(cfg: DistillConfig, ts: list[int], layout: list[dict], guidance: float, params: list,
             pool_size: int, pool_seconds: float, work: Path) -> None:
    """The header line: segments and jumps, guidance, LoRA size, and the UNet passes a step costs."""
    n_params = sum(p.numel() for p in params)
    student = 3 * (2 if cfg.student_guidance != 1 else 1)  # forward + backward ~ 3 passes, twice with CFG
    to_edge = sum(s["edge"] - n for s in layout for n in s["train"]) / sum(len(s["train"]) for s in layout)
    teacher = 2 * to_edge if cfg.noised_fraction > 0 else 0  # the live CFG teacher on re-noised rows
    jumps = [f"{ts[s['start']]}->{ts[s['edge']]}" for s in layout]
    print(f"distill: {cfg.model}, k={cfg.segments} segments, lower edges {[ts[s['edge']] for s in layout]} "
          f"(ShortFT jumps {jumps}); CFG {guidance} teacher, student CFG {cfg.student_guidance}; rank {cfg.rank}: "
          f"{n_params:,} LoRA parameters (~{n_params * 4 / 2**20:.2f} MiB file in fp32); {cfg.segments} x "
          f"{cfg.batch_size} rows per step, ~{cfg.segments * (student + teacher):.0f} batched UNet passes per step; "
          f"pool {pool_size} trajectories ({pool_seconds:.0f} s); work dir {work}")


def plot_loss(history: list[dict], labels: list[str], path: Path) -> Path:
    """Per-segment relative loss, (error / naive error)^2, smoothed over 5% of the run, log scale."""
    from shortft.report import axes, running_mean

    steps = [h["step"] for h in history]
    window = max(1, len(history) // 20)
    with axes(path, "optimiser step", "(error / naive error)$^2$", legend_size=8) as ax:
        for j, label in enumerate(labels):
            ax.plot(steps, running_mean([h["segments"][j] for h in history], window), label=f"segment {label}")
        ax.set_yscale("log")
    return path


def write_outputs(cfg: DistillConfig, backend, work: Path, log: dict, labels: list[str]) -> Path:
    """The LoRA file (the family's diffusers format, cfg.save_dtype), distill.json and loss.png; returns the file."""
    from shortft import files, lora
    from shortft.train import DTYPES

    out = lora.save_lora(backend.net, STUDENT, cfg.out, dtype=DTYPES[cfg.save_dtype], fmt=backend.lora_format)
    files.write_json(work / "distill.json", log)
    if log["history"]:
        plot_loss(log["history"], labels, work / "loss.png")
    print(f"distill: wrote {out} ({out.stat().st_size / 2**20:.2f} MiB) after {log['steps_done']} steps, "
          f"{log['train_seconds']:.0f} s training + {log['pool_seconds']:.0f} s teacher pool")
    return out

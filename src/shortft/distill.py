"""`shortft distill`: a trajectory-preserving shortcut LoRA for any SD-family model.

Trajectory-segmented consistency distillation, the idea behind Hyper-SD's TSCD (Ren et al., "Hyper-SD:
Trajectory Segmented Consistency Model for Efficient Image Synthesis", 2024), on top of consistency
distillation (Song et al., "Consistency Models", ICML 2023; Luo et al., LCM, 2023).

Segments. [0, T] is cut into k segments with edges T*j/k, snapped to the DDIM grid that ShortFT samples
on (SD 1.5, 50 steps, k = 4: lower edges 761, 501, 261, 1), so the shortcut lands exactly where ShortFT
asks it to (741->501, 481->261, 241->1, and 981->761). Segment j holds the grid timesteps t with
edge_j < t <= edge_{j-1} (the first segment: every timestep above edge_1).

Student. The base UNet plus the LoRA being trained (adapter "shortcut"), conditional-only, in the
parametrisation ShortFT uses: one DDIM jump from its ε̂ straight to the segment's lower edge,
    f_θ(x_t, t) = √ᾱ_e x̂0 + √(1-ᾱ_e) ε̂,   x̂0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t,   ε̂ = ε_θ(x_t, t, c).
At t = e the jump is the identity, so the consistency boundary condition holds by construction.

Target. The frozen teacher (base weights, CFG, no gradient) runs m ∈ [1, teacher_steps] DDIM steps of
the grid from t toward the edge; if it has not reached the edge, an EMA copy of the student (adapter
"shortcut_ema"; ema = 0 gives the stop-gradient student) bridges the remainder in one jump
(teacher_steps = 0: the teacher always runs to the edge, no bridge: plain trajectory distillation). Loss: MSE
between the student's landing point and the target, in latent space at the edge (what ShortFT consumes),
divided per segment by the MSE of the naive one-step CFG jump over that segment, so that the high-noise
segments (whose errors can be 10x larger) do not drown the others and the loss reads as (error / naive error)^2.

Where x_t comes from: the teacher's own trajectories, no dataset. Before training, `pool` trajectories
are sampled from noise with the teacher and stored at every grid timestep. A row of a batch is either a
point on a stored trajectory (exactly the states ShortFT's base chain visits; the teacher's m steps from
it are then read from the pool, where they were computed) or, with probability `noised_fraction`, a
stored clean sample re-noised with fresh noise (off-trajectory states, which ShortFT's fine-tuned LoRAs
also produce; the teacher runs live from them).

Guidance. ShortFT runs its original chain with CFG (`guidance`: 5 on the world model, 7.5 on SD 1.5)
and the shortcut conditional-only (`shortcut_guidance` = 1). So the teacher here is the CFG teacher
and the student conditional-only: the shortcut then approximates the very trajectories the chain
follows (with guidance), at one UNet call per jump (not two), as Hyper-SD's CFG-free LoRAs do. The
price: the student must learn what guidance adds, which is slow (docs/distill.md has the measurements).
`student_guidance` > 1 trains a CFG student instead (two calls per jump; ShortFT then needs
`shortcut_guidance` at the same scale).

Fidelity (`shortft distill --eval`, `fidelity`): on held-out prompts and fresh noises, (a) the RMSE of
the shortcut's one-step jump from each segment's first 50-step timestep to its lower edge against the
50-step CFG teacher trajectory, next to the base model's naive one-step DDIM jump with the same CFG;
(b) the k-step shortcut sample (jumps start -> edge_1 -> ... -> edge_{k-1} -> end) against the
50-step teacher sample from the same noise, next to the naive k-step DDIM sample.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from shortft.errors import ConfigError

# torch, peft and diffusers are imported inside the functions: the CLI imports this module to register
# `shortft distill`, and `shortft --help` should not pay for them.

STUDENT = "shortcut"  # the adapter being trained; ShortFT loads the output file under this name
EMA = "shortcut_ema"  # the EMA copy that bridges the teacher's remainder
EVAL_SEED = 1_000_000  # eval noises use seeds EVAL_SEED + i: disjoint from the training pool's seeds


@dataclass
class DistillConfig:
    model: str = "world"  # hub id, local diffusers folder, or "world" (the embedded model)
    out: str = ""  # output LoRA file (.safetensors, diffusers format)
    segments: int = 4  # k: shortcut segments (ShortFT: 4)
    num_steps: int = 50  # DDIM grid of the teacher and of ShortFT's chain; edges snap to it
    steps: int = 2000  # optimiser steps
    batch_size: int = 8  # rows per segment per step (every step trains all k segments)
    lr: float = 1e-3  # AdamW peak learning rate (reached after --warmup steps)
    decay: str = "none"  # learning rate after warm-up: none (constant) or cosine (to 0 at --steps or --time-budget, whichever ends first)
    rank: int = 8  # LoRA rank (file size grows linearly)
    targets: str = "attn_ff"  # LoRA layers: attn_ff (attention + feed-forward, as Hyper-SD) or all (+ resnets, proj)
    guidance: float = 0.0  # teacher CFG; 0 = the model's ShortFT default (world 5, other models 7.5)
    student_guidance: float = 1.0  # CFG of the student; 1 = conditional-only (ShortFT's shortcut_guidance default)
    prompts: str = ""  # prompt set or file; "" = world-train on the world model, simple-animals otherwise
    teacher_steps: int = 4  # m is drawn from 1..teacher_steps: teacher DDIM steps before the EMA bridges; 0 = to the edge (no bridge)
    ema: float = 0.95  # EMA decay of the bridging copy (LCM: 0.95); 0 = stop-gradient student
    pool: int = 256  # teacher trajectories sampled up front (memory: pool x (num_steps+1) latents)
    noised_fraction: float = 0.5  # share of rows that re-noise a clean teacher sample instead
    anchor_fraction: float = 0.0  # share of steps whose rows start where jumps are taken (ShortFT's segment start or the previous edge, as k-step sampling does) instead of any grid point of the segment
    warmup: int = 50  # linear learning-rate warm-up steps
    seed: int = 0  # seeds the LoRA init, the pool's prompts and noises, and every draw
    time_budget: float = 0.0  # stop training after this many seconds (0 = no limit); the file is still written
    checkpoint_every: int = 50  # steps between checkpoints in work_dir (an interrupted run resumes there)
    work_dir: str = ""  # checkpoints, pool and log; "" = runs/distill-<out stem>
    dtype: str = "fp32"  # frozen weights: fp32, fp16 or bf16 (the LoRA trains in fp32)
    save_dtype: str = "fp32"  # tensors of the written file: fp32, fp16 or bf16 (the world's shortcut ships in fp16)
    device: str = ""  # "" = cuda if available, else cpu
    threads: int = 0  # CPU threads for torch; 0 = torch's default (on a shared CPU, 1 is often faster)


# Named recipes (`shortft distill --preset NAME`). "world" is exactly the recipe of the shipped world
# shortcut (src/shortft/world/assets/shortcut.safetensors); `shortft world pretrain --part shortcut` runs it.
DISTILL_PRESETS: dict[str, dict] = {
    "default": {},
    "world": dict(model="world", prompts="world-train", guidance=5.0, student_guidance=5.0, steps=10000,
                  time_budget=3000.0, pool=1024, decay="cosine", teacher_steps=0, noised_fraction=0.0,
                  anchor_fraction=0.5, save_dtype="fp16"),
}

# Config fields that may change between an interrupted run and its resume.
RESUMABLE = {"steps", "time_budget", "checkpoint_every", "out", "work_dir", "device", "threads", "save_dtype"}
DTYPES = ("fp32", "fp16", "bf16")  # the keys of shortft.train.DTYPES (not imported here: it pulls in torch)
DECAYS = ("none", "cosine")
_ATTN_FF = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")  # = shortft.lora.ATTN_FF_TARGETS
TARGETS = {"attn_ff": _ATTN_FF,  # the CFG-free student must also learn what guidance adds: "all" gives it more room
           "all": _ATTN_FF + ("proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj")}


def model_defaults(model: str) -> dict:
    """ShortFT's own defaults for this model: the CFG scale of its chain and its prompt sets."""
    from shortft.config import TRAIN_PRESETS, TrainConfig, default_preset

    preset = {**asdict(TrainConfig()), **TRAIN_PRESETS[default_preset(model)]}
    return {"guidance": preset["guidance"], "prompts": preset["prompts"], "eval_prompts": preset["eval_prompts"]}


def learning_rate(cfg: DistillConfig, step: int, elapsed: float) -> float:
    """Linear warm-up to cfg.lr, then constant or a cosine to 0. The cosine follows whichever runs out
    first, the step count or the time budget, so a time-budgeted run still ends at a low rate."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.decay == "cosine":
        progress = step / max(1, cfg.steps)
        if cfg.time_budget:
            progress = max(progress, elapsed / cfg.time_budget)
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr


def segment_layout(timesteps: list[int], k: int) -> list[dict]:
    """Per segment (high noise first): the grid indices it trains on, its lower edge, and where ShortFT
    starts its jump. 50 steps, k = 4: edges 761, 501, 261, 1; starts 981, 741, 481, 241."""
    from shortft.methods.shortft import segment_bounds

    b = segment_bounds(len(timesteps), k)
    out = []
    for j in range(1, k + 1):
        edge = b[j] - 1  # grid index of the segment's last timestep (ShortFT's landing point)
        first = b[j - 1] - 1 if j > 1 else 0  # the previous edge belongs here too: k-step sampling starts there
        if edge - first < 1:
            raise ConfigError(f"segments={k} with num_steps={len(timesteps)} leaves segment {j} without an "
                             "inner step; use fewer segments or more steps")
        out.append({"train": list(range(first, edge)), "edge": edge, "start": b[j - 1],
                    "anchors": sorted({first, b[j - 1]})})
    return out


# --- the teacher's trajectories --------------------------------------------------------------------------
def teacher_trajectories(backend, timesteps: list[int], cond: torch.Tensor, uncond: torch.Tensor,
                         noise: torch.Tensor, guidance: float) -> torch.Tensor:
    """(N, C, h, w) noises -> (N, S+1, C, h, w): the CFG DDIM chain's latent at every grid timestep
    (index i is the input of step i, index S is the final sample)."""
    import torch

    from shortft.chain import END, Step, run_plan

    ends = timesteps[1:] + [END]
    x, out = noise, [noise]
    for t, t2 in zip(timesteps, ends):
        x = run_plan(backend, [Step(t, t2, (), "none", guidance)], x, cond, uncond)  # no grad: grad="none"
        out.append(x)
    return torch.stack(out, dim=1)


def build_pool(backend, timesteps, contexts, uncond, cfg: DistillConfig, guidance: float, batch: int = 32):
    """Sample `cfg.pool` teacher trajectories from seeded noise: (trajectories, prompt index per row)."""
    import torch
    from tqdm.auto import tqdm

    from shortft.sample import seeded_noise

    rng = random.Random(f"pool-{cfg.seed}")
    which = torch.tensor([rng.randrange(len(contexts)) for _ in range(cfg.pool)])
    trajs = []
    for i in tqdm(range(0, cfg.pool, batch), desc="teacher trajectories", dynamic_ncols=True):
        idx = which[i:i + batch]
        noise = seeded_noise(backend.latent_shape(len(idx)), [cfg.seed * 100_000 + i + r for r in range(len(idx))])
        trajs.append(teacher_trajectories(backend, timesteps, contexts[idx], uncond.expand(len(idx), -1, -1),
                                          noise.to(backend.device), guidance).cpu())
    return torch.cat(trajs), which


# --- one distillation step -------------------------------------------------------------------------------
class TSCD:
    """The loss of trajectory-segmented consistency distillation; see the module docstring."""

    def __init__(self, backend, timesteps: list[int], layout: list[dict], contexts: torch.Tensor,
                 uncond: torch.Tensor, pool: torch.Tensor, pool_prompts: torch.Tensor, cfg: DistillConfig,
                 guidance: float):
        self.b, self.ts, self.layout, self.cfg, self.guidance = backend, timesteps, layout, cfg, guidance
        self.contexts, self.uncond, self.pool, self.pool_prompts = contexts, uncond, pool, pool_prompts
        self.bridge = EMA if cfg.ema > 0 else STUDENT  # ema = 0: the stop-gradient student bridges
        self.naive_mse = self.naive_errors()  # per segment: the loss is measured relative to these

    def _uncond(self, x: torch.Tensor) -> torch.Tensor:
        return self.uncond.expand(len(x), -1, -1)

    def naive_errors(self, rows: int = 64) -> list[float]:
        """Per segment, the MSE of the base model's naive one-step CFG jump from the segment's start to its
        edge on pool trajectories. Dividing by it puts the segments on one scale (the far-from-data
        segments' errors are far larger) and makes the loss read as (error / naive error)^2."""
        import torch

        from shortft.chain import Step, run_plan

        traj = self.pool[:rows].to(self.b.device)
        cond = self.contexts[self.pool_prompts[:rows]].to(self.b.device)
        out = []
        with torch.no_grad():
            for seg in self.layout:
                s, e = seg["start"], seg["edge"]
                y = run_plan(self.b, [Step(self.ts[s], self.ts[e], (), "none", self.guidance)], traj[:, s], cond,
                             self.uncond.expand(len(traj), -1, -1))
                out.append(max(float(((y - traj[:, e]) ** 2).mean()), 1e-12))
        return out

    def draw(self, rng: random.Random, generator: torch.Generator) -> list[dict]:
        """One group of rows per segment: a grid index n, teacher steps m, pool rows, fresh noise."""
        import torch

        groups = []
        for seg in self.layout:
            # no extra draw when anchor_fraction = 0: earlier runs' random streams (and files) reproduce
            anchored = self.cfg.anchor_fraction > 0 and rng.random() < self.cfg.anchor_fraction
            n = rng.choice(seg["anchors"] if anchored else seg["train"])
            left = seg["edge"] - n  # teacher steps to the edge
            m = left if self.cfg.teacher_steps == 0 else rng.randint(1, min(self.cfg.teacher_steps, left))
            rows = torch.randint(len(self.pool), (self.cfg.batch_size,), generator=generator)
            noised = torch.rand(self.cfg.batch_size, generator=generator) < self.cfg.noised_fraction
            noise = torch.randn((self.cfg.batch_size, *self.pool.shape[2:]), generator=generator)
            groups.append({"n": n, "m": m, "edge": seg["edge"], "rows": rows, "noised": noised, "noise": noise})
        return groups

    def x_t(self, g: dict) -> torch.Tensor:
        """(B, C, h, w) states at grid index n: on a stored trajectory, or a clean sample re-noised."""
        import torch

        on_traj = self.pool[g["rows"], g["n"]]  # (B, C, h, w)
        a = self.b.alpha(self.ts[g["n"]])
        renoised = a**0.5 * self.pool[g["rows"], -1] + (1 - a) ** 0.5 * g["noise"]
        return torch.where(g["noised"][:, None, None, None], renoised, on_traj).to(self.b.device)

    def target(self, x: torch.Tensor, g: dict, cond: torch.Tensor) -> torch.Tensor:
        """Teacher m CFG steps from n toward the edge, then the bridge's jump for the rest (if any);
        no graph: every step has grad="none". On-trajectory rows read the teacher's m steps from the
        pool (it already ran exactly these steps from exactly this x_t); re-noised rows run them live."""
        from shortft.chain import Step, run_plan

        n, m, e, ts, live = g["n"], g["m"], g["edge"], self.ts, g["noised"]
        y = self.pool[g["rows"], n + m].to(self.b.device)  # (B, C, h, w)
        if live.any():
            y[live] = run_plan(self.b, [Step(ts[i], ts[i + 1], (), "none", self.guidance) for i in range(n, n + m)],
                               x[live], cond[live], self.uncond.expand(int(live.sum()), -1, -1))
        if n + m < e:
            sg = self.cfg.student_guidance
            y = run_plan(self.b, [Step(ts[n + m], ts[e], (self.bridge,), "none", sg)], y, cond, self._uncond(y))
        return y

    def loss(self, groups: list[dict]) -> tuple[torch.Tensor, list[float]]:
        """Mean over segments of the MSE between the student's jump to the edge and the target, each
        relative to the segment's naive-jump MSE (so ~ (error / naive error)^2)."""
        import torch

        from shortft.chain import Step, run_plan

        losses = []
        for g in groups:
            x = self.x_t(g)
            cond = self.contexts[self.pool_prompts[g["rows"]]].to(self.b.device)
            target = self.target(x, g, cond)
            step = Step(self.ts[g["n"]], self.ts[g["edge"]], (STUDENT,), "full", self.cfg.student_guidance)
            pred = run_plan(self.b, [step], x, cond, self._uncond(x))
            losses.append(torch.nn.functional.mse_loss(pred, target) / self.naive_mse[len(losses)])
        return torch.stack(losses).mean(), [float(v.detach()) for v in losses]


def ema_update(unet, decay: float) -> None:
    """EMA ← decay · EMA + (1 - decay) · student, parameter by parameter."""
    if decay <= 0:
        return
    ema = dict(_adapter_named(unet, EMA))
    for name, p in _adapter_named(unet, STUDENT):
        ema[name].data.lerp_(p.detach(), 1 - decay)


def _adapter_named(unet, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Adapter parameters keyed by their name with the adapter name removed (the same key for every adapter)."""
    return [(n.replace(f".{adapter}.", ".<a>."), p) for n, p in unet.named_parameters()
            if f".{adapter}." in n and ".lora_" in n]


# --- checkpoints ---------------------------------------------------------------------------------------------
def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, unet, optimizer, step: int, history: list, cfg: DistillConfig,
                    rng: random.Random, generator: torch.Generator) -> None:
    state = {name: {k: p.detach().cpu().clone() for k, p in _adapter_named(unet, name)} for name in (STUDENT, EMA)}
    _atomic_save({"step": step, "adapters": state, "optimizer": optimizer.state_dict(), "history": history,
                  "config": asdict(cfg), "rng": rng.getstate(), "generator": generator.get_state()}, path)


def load_checkpoint(path: Path, unet, optimizer, cfg: DistillConfig, rng, generator) -> tuple[int, list]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    old = {k: v for k, v in state["config"].items() if k not in RESUMABLE}
    new = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}
    if old != new:
        diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
        raise ConfigError(f"checkpoint {path} was made with a different config {diff} (old, new); "
                         "pass --fresh to start over or use another --work-dir")
    for name in (STUDENT, EMA):
        params = dict(_adapter_named(unet, name))
        for k, v in state["adapters"][name].items():
            params[k].data.copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate(state["rng"])
    generator.set_state(state["generator"])
    return state["step"], state["history"]


# --- the loop ----------------------------------------------------------------------------------------------
def distill(cfg: DistillConfig, fresh: bool = False) -> Path:
    """Train the shortcut LoRA and write it to `cfg.out`; return that path."""
    import torch
    from tqdm.auto import tqdm

    from shortft import lora
    from shortft.backends import SDBackend
    from shortft.prompts import load_prompts
    from shortft.train import DTYPES as TORCH_DTYPES

    if not cfg.out:
        raise ConfigError("distill needs --out FILE.safetensors")
    if cfg.targets not in TARGETS:
        raise ConfigError(f"targets {cfg.targets!r} not in {list(TARGETS)}")
    for name in ("dtype", "save_dtype"):
        if getattr(cfg, name) not in DTYPES:
            raise ConfigError(f"{name} {getattr(cfg, name)!r} not in {list(DTYPES)}")
    if cfg.decay not in DECAYS:
        raise ConfigError(f"decay {cfg.decay!r} not in {list(DECAYS)}")
    dtype = TORCH_DTYPES[cfg.dtype]
    if (not 0 <= cfg.ema < 1 or not 0 <= cfg.noised_fraction <= 1 or not 0 <= cfg.anchor_fraction <= 1
            or cfg.teacher_steps < 0 or cfg.pool < 1):
        raise ConfigError("need 0 <= ema < 1, 0 <= noised_fraction <= 1, 0 <= anchor_fraction <= 1, "
                         f"teacher_steps >= 0, pool >= 1; got ema={cfg.ema}, noised_fraction={cfg.noised_fraction}, "
                         f"anchor_fraction={cfg.anchor_fraction}, teacher_steps={cfg.teacher_steps}, pool={cfg.pool}")
    defaults = model_defaults(cfg.model)
    guidance = cfg.guidance or defaults["guidance"]
    work = Path(cfg.work_dir or f"runs/distill-{Path(cfg.out).stem}")
    work.mkdir(parents=True, exist_ok=True)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # LoRA initialisation

    backend = SDBackend.load(cfg.model, device=device, dtype=dtype)
    ts = backend.timesteps(cfg.num_steps)
    layout = segment_layout(ts, cfg.segments)
    prompts = load_prompts(cfg.prompts or defaults["prompts"])
    contexts = torch.cat([backend.encode_prompts(prompts[i:i + 64]) for i in range(0, len(prompts), 64)]).cpu()
    uncond = backend.encode_prompts([""])  # (1, L, D)
    unet = backend.unet
    targets = TARGETS[cfg.targets]
    lora.add_lora(unet, STUDENT, cfg.rank, targets=targets)
    lora.add_lora(unet, EMA, cfg.rank, targets=targets)
    student = dict(_adapter_named(unet, STUDENT))
    for key, p in _adapter_named(unet, EMA):  # the EMA starts as a copy of the student
        p.data.copy_(student[key].data)
    params = lora.set_trainable(unet, [STUDENT])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng, generator = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)

    ckpt, pool_file = work / "checkpoint.pt", work / "pool.pt"
    step, history = 0, []
    if ckpt.is_file() and not fresh:
        step, history = load_checkpoint(ckpt, unet, optimizer, cfg, rng, generator)
        print(f"distill: resuming {ckpt} at step {step}")
    t0 = time.time()
    # the pool depends on these only: a rerun with another lr, rank, ... reuses it
    pool_key = {"model": cfg.model, "prompts": prompts, "pool": cfg.pool, "num_steps": cfg.num_steps,
                "guidance": guidance, "seed": cfg.seed}
    saved = torch.load(pool_file, map_location="cpu", weights_only=False) if pool_file.is_file() else {}
    if saved.get("key") == pool_key:
        pool, pool_prompts = saved["pool"], saved["prompts"]
    else:
        pool, pool_prompts = build_pool(backend, ts, contexts.to(backend.device), uncond, cfg, guidance)
        _atomic_save({"key": pool_key, "pool": pool, "prompts": pool_prompts}, pool_file)
    pool_seconds = time.time() - t0
    tscd = TSCD(backend, ts, layout, contexts, uncond, pool, pool_prompts, cfg, guidance)

    # per segment: mean m teacher CFG steps (2 passes each) + 1 bridge pass + student forward/backward (~3)
    calls = cfg.segments * ((cfg.teacher_steps + 1) + 1 + 3)
    jumps = [f"{ts[s['start']]}->{ts[s['edge']]}" for s in layout]
    print(f"distill: {cfg.model}, k={cfg.segments} segments, lower edges {[ts[s['edge']] for s in layout]} "
          f"(ShortFT jumps {jumps}); CFG {guidance} teacher, "
          f"conditional-only student; rank {cfg.rank}: {sum(p.numel() for p in params):,} LoRA parameters "
          f"(~{sum(p.numel() for p in params) * 4 / 2**20:.2f} MiB file); {cfg.segments} x {cfg.batch_size} rows "
          f"per step, ~{calls:.0f} batched UNet passes per step; pool {len(pool)} trajectories "
          f"({pool_seconds:.0f} s); work dir {work}")

    elapsed = history[-1]["seconds"] if history else 0.0
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="distill", dynamic_ncols=True)
    tick = time.time()
    for step in bar:
        if cfg.time_budget and elapsed >= cfg.time_budget:
            print(f"distill: time budget of {cfg.time_budget:.0f} s reached at step {step}")
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, elapsed)
        loss, per_segment = tscd.loss(tscd.draw(rng, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_update(unet, cfg.ema)
        now = time.time()
        elapsed, tick = elapsed + now - tick, now
        history.append({"step": step + 1, "loss": loss.item(), "segments": per_segment, "seconds": elapsed})
        recent = [h["loss"] for h in history[-50:]]
        bar.set_postfix(loss=f"{loss.item():.4g}", avg50=f"{sum(recent) / len(recent):.4g}")
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt, unet, optimizer, step + 1, history, cfg, rng, generator)
            tick = time.time()  # checkpoint time is not training time
    bar.close()
    steps_done = history[-1]["step"] if history else 0
    save_checkpoint(ckpt, unet, optimizer, steps_done, history, cfg, rng, generator)
    out = lora.save_lora(unet, STUDENT, cfg.out, dtype=TORCH_DTYPES[cfg.save_dtype])
    log = {"config": asdict(cfg), "guidance": guidance, "steps_done": steps_done, "train_seconds": elapsed,
           "pool_seconds": pool_seconds, "edges": [ts[s["edge"]] for s in layout], "history": history}
    (work / "distill.json").write_text(json.dumps(log, indent=1))
    if history:
        plot_loss(history, [f"{ts[s['start']]}->{ts[s['edge']]}" for s in layout], work / "loss.png")
    print(f"distill: wrote {out} ({out.stat().st_size / 2**20:.2f} MiB) after {steps_done} steps, "
          f"{elapsed:.0f} s training + {pool_seconds:.0f} s teacher pool")
    return out


def plot_loss(history: list[dict], labels: list[str], path: Path) -> Path:
    """Per-segment relative loss, (error / naive error)^2, smoothed over 5% of the run, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    w = max(1, len(history) // 20)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for j, label in enumerate(labels):
        v = [h["segments"][j] for h in history]
        ax.plot(steps, [sum(v[max(0, i - w + 1): i + 1]) / len(v[max(0, i - w + 1): i + 1]) for i in range(len(v))],
                label=f"segment {label}")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("(error / naive error)$^2$")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- fidelity ------------------------------------------------------------------------------------------------
def shortcut_jump(backend, adapters: tuple[str, ...] = (STUDENT,), guidance: float = 1.0):
    """The shortcut as ShortFT runs it: one DDIM jump from the adapters' ε̂ (conditional-only by default).
    With adapters=() and the chain's CFG it is the naive one-step DDIM jump of the base model."""
    from shortft.chain import Step, run_plan

    def jump(x, t_from, t_to, cond, uncond):
        return run_plan(backend, [Step(t_from, t_to, tuple(adapters), "none", guidance)], x, cond, uncond)
    return jump


def fidelity(backend, jump, prompts: list[str], seeds: list[int], num_steps: int = 50, segments: int = 4,
             guidance: float = 7.5, batch_size: int = 16) -> dict:
    """Errors of `jump(x, t_from, t_to, cond, uncond) -> x'` against the 50-step CFG teacher, next to the
    base model's naive DDIM jump with the same CFG: (a) one jump per segment, start -> lower edge;
    (b) the k-jump sample from noise. RMSE in latent space; (b) also in pixels (images in [0, 1])."""
    import torch

    from shortft.chain import END
    from shortft.sample import seeded_noise

    ts = backend.timesteps(num_steps)
    layout = segment_layout(ts, segments)
    naive_jump = shortcut_jump(backend, adapters=(), guidance=guidance)
    k_path = [0] + [s["edge"] for s in layout[:-1]]  # grid indices the k-step sampler visits
    sq = {"jump": [[0.0, 0.0] for _ in layout], "k_latent": [0.0, 0.0], "k_pixel": [0.0, 0.0]}  # [shortcut, naive]
    count = {"jump": 0, "latent": 0, "pixel": 0}
    images = {"teacher": [], "shortcut": [], "naive": []}
    per_sample = {"shortcut": [], "naive": []}  # latent RMSE of each k-step sample: shows rare mode flips
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        cond, uncond = backend.encode_prompts(p), backend.encode_prompts([""] * len(p))
        noise = seeded_noise(backend.latent_shape(len(p)), s).to(backend.device)
        traj = teacher_trajectories(backend, ts, cond, uncond, noise, guidance)  # (B, S+1, C, h, w)
        for j, seg in enumerate(layout):
            x, ref = traj[:, seg["start"]], traj[:, seg["edge"]]
            for w, f in enumerate((jump, naive_jump)):
                sq["jump"][j][w] += float(((f(x, ts[seg["start"]], ts[seg["edge"]], cond, uncond) - ref) ** 2).sum())
        count["jump"] += traj[:, 0].numel()
        ref_img = backend.decode(traj[:, -1])
        images["teacher"].append(ref_img.cpu())
        for w, (name, f) in enumerate((("shortcut", jump), ("naive", naive_jump))):
            x = noise
            for a, b in zip(k_path, k_path[1:] + [None]):
                x = f(x, ts[a], ts[b] if b is not None else END, cond, uncond)
            img = backend.decode(x)
            images[name].append(img.cpu())
            sq["k_latent"][w] += float(((x - traj[:, -1]) ** 2).sum())
            per_sample[name] += ((x - traj[:, -1]) ** 2).flatten(1).mean(1).sqrt().tolist()
            sq["k_pixel"][w] += float(((img - ref_img) ** 2).sum())
        count["latent"] += traj[:, -1].numel()
        count["pixel"] += ref_img.numel()

    def row(pair, n):
        a, b = math.sqrt(pair[0] / n), math.sqrt(pair[1] / n)
        return {"shortcut_rmse": a, "naive_rmse": b, "ratio": a / b if b > 0 else float("nan")}

    result = {
        "segments": [{"from": ts[seg["start"]], "to": ts[seg["edge"]], **row(sq["jump"][j], count["jump"])}
                     for j, seg in enumerate(layout)],
        "k_step": {"timesteps": [ts[a] for a in k_path], "latent": row(sq["k_latent"], count["latent"]),
                   "pixel": row(sq["k_pixel"], count["pixel"])},
        "num_samples": len(prompts), "num_steps": num_steps, "guidance": guidance,
    }
    result["jump_ratio_max"] = max(r["ratio"] for r in result["segments"])
    med = {k: float(torch.tensor(v).median()) for k, v in per_sample.items()}
    result["k_step"]["latent_per_sample"] = {
        "shortcut_median": med["shortcut"], "naive_median": med["naive"],
        "median_ratio": med["shortcut"] / med["naive"] if med["naive"] > 0 else float("nan"),
        # a sample the shortcut sends elsewhere: further from the teacher than the naive sampler's median
        "shortcut_off": sum(e > med["naive"] for e in per_sample["shortcut"]), "shortcut": per_sample["shortcut"],
        "naive": per_sample["naive"]}
    result["images"] = {k: torch.cat(v) for k, v in images.items()}  # removed before JSON
    return result


def evaluate_shortcut(model: str, shortcut: str, prompts: str = "", count: int = 32, segments: int = 4,
                      num_steps: int = 50, guidance: float = 0.0, device: str = "", json_out: str = "",
                      grid_out: str = "", student_guidance: float = 1.0) -> dict:
    """Load `model` and the shortcut file, run `fidelity` on held-out prompts and fresh noises, print a
    table, and write JSON (and a grid: teacher 50-step / shortcut k-step / naive k-step rows)."""
    import torch

    from shortft import lora
    from shortft.backends import SDBackend
    from shortft.prompts import load_prompts

    defaults = model_defaults(model)
    guidance = guidance or defaults["guidance"]
    backend = SDBackend.load(model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lora.load_lora(backend.unet, shortcut, STUDENT)
    names = load_prompts(prompts or defaults["eval_prompts"])
    names = [names[i % len(names)] for i in range(count)]
    t0 = time.time()
    with torch.no_grad():
        res = fidelity(backend, shortcut_jump(backend, guidance=student_guidance), names, [EVAL_SEED + i for i in range(count)], num_steps,
                       segments, guidance)
    images = res.pop("images")
    res.update({"model": model, "shortcut": str(shortcut), "prompts": prompts or defaults["eval_prompts"],
                "seconds": time.time() - t0})
    print(format_table(res))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(res, indent=1))
    if grid_out:
        from shortft.images import save_grid

        n = min(8, count)
        rows = torch.cat([images["teacher"][:n], images["shortcut"][:n], images["naive"][:n]])
        save_grid(rows, grid_out, nrow=n, scale=2 if backend.image_size < 256 else 1)
    return res


def format_table(res: dict) -> str:
    """The fidelity figures as a markdown table."""
    lines = [f"fidelity vs the {res['num_steps']}-step CFG {res['guidance']} teacher, {res['num_samples']} samples",
             "| jump | shortcut RMSE | naive DDIM RMSE | ratio (target <= 0.3) |", "|---|---|---|---|"]
    for r in res["segments"]:
        lines.append(f"| {r['from']}->{r['to']} | {r['shortcut_rmse']:.4f} | {r['naive_rmse']:.4f} | {r['ratio']:.3f} |")
    k = res["k_step"]
    lines += ["", f"| {len(k['timesteps'])}-step sample ({', '.join(map(str, k['timesteps']))}) | shortcut RMSE | "
              "naive DDIM RMSE | ratio (target <= 0.5) |", "|---|---|---|---|"]
    for space in ("latent", "pixel"):
        r = k[space]
        lines.append(f"| {space} | {r['shortcut_rmse']:.4f} | {r['naive_rmse']:.4f} | {r['ratio']:.3f} |")
    m = k["latent_per_sample"]
    lines += ["", f"per-sample latent RMSE, median: shortcut {m['shortcut_median']:.4f}, naive {m['naive_median']:.4f} "
              f"(ratio {m['median_ratio']:.3f}); shortcut samples further off than the naive median: "
              f"{m['shortcut_off']} of {len(m['shortcut'])}"]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------------------
def add_distill(sub) -> None:
    """Register `shortft distill` (train a shortcut) and `shortft distill --eval` (measure one)."""
    p = sub.add_parser("distill", help="make a trajectory-preserving shortcut LoRA for a model (or --eval one)",
                       description=__doc__.splitlines()[0])
    from shortft.config import field_help

    helps = field_help(DistillConfig)
    for f in fields(DistillConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default,
                       metavar="V", help=helps.get(f.name))
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the work dir")
    p.add_argument("--eval", action="store_true", help="measure the fidelity of --shortcut instead of training")
    p.add_argument("--shortcut", default="", help="--eval: the shortcut LoRA file")
    p.add_argument("--count", type=int, default=32, help="--eval: prompts x noises measured")
    p.add_argument("--json", default="", help="--eval: write the figures here")
    p.add_argument("--grid", default="", help="--eval: write teacher / shortcut / naive sample rows here")
    p.set_defaults(func=run_distill)


def run_distill(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.eval:
        if not args.shortcut:
            raise ConfigError("--eval needs --shortcut FILE")
        evaluate_shortcut(args.model, args.shortcut, args.prompts, args.count, args.segments, args.num_steps,
                          args.guidance, args.device, args.json, args.grid, args.student_guidance)
        return 0
    cfg = DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)})
    distill(cfg, fresh=args.fresh)
    return 0


register = add_distill

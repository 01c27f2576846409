"""The teacher's trajectories: the only data distillation needs, sampled once and kept in the work dir.

The pool file is a safetensors file (`trajectories`: (N, S+1, C, h, w), `prompts`: (N,) prompt index per
row) whose metadata holds its key as JSON: the settings the trajectories depend on (model, prompts, pool
size, grid, guidance, seed). A rerun with the same key reuses the file; any other change rebuilds it.
Nothing in it is executable: a file that is not a readable safetensors pool is refused by name.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from shortft.errors import UserError

if TYPE_CHECKING:
    import torch

    from shortft.distill.config import DistillConfig

# torch is imported inside the functions: the CLI imports this package only to register `shortft distill`.


class BadPoolFile(UserError):
    """A pool file in the work dir that is not a safetensors pool."""


def teacher_trajectories(backend, timesteps: list, cond: dict, uncond: dict, noise: torch.Tensor,
                         guidance: float) -> torch.Tensor:
    """(N, C, h, w) noises -> (N, S+1, C, h, w): the CFG chain's latent at every grid time (index i is the
    input of step i, index S is the final sample)."""
    import torch

    from shortft.chain import END, Step, run_plan

    ends = timesteps[1:] + [END]
    x, out = noise, [noise]
    for t, t2 in zip(timesteps, ends):
        x = run_plan(backend, [Step(t, t2, (), "none", guidance)], x, cond, uncond)  # no grad: grad="none"
        out.append(x)
    return torch.stack(out, dim=1)


def build_pool(backend, timesteps: list, contexts: dict, uncond: dict, cfg: DistillConfig,
               guidance: float, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `cfg.pool` teacher trajectories from seeded noise: (trajectories, prompt index per row)."""
    import torch
    from tqdm.auto import tqdm

    from shortft.chain import batch_repeat, batch_rows
    from shortft.sample import seeded_noise

    rng = random.Random(f"pool-{cfg.seed}")
    n_prompts = len(next(iter(contexts.values())))
    which = torch.tensor([rng.randrange(n_prompts) for _ in range(cfg.pool)])
    trajs = []
    for i in tqdm(range(0, cfg.pool, batch), desc="teacher trajectories", dynamic_ncols=True):
        idx = which[i:i + batch]
        noise = seeded_noise(backend.latent_shape(len(idx)), [cfg.seed * 100_000 + i + r for r in range(len(idx))])
        trajs.append(teacher_trajectories(backend, timesteps, batch_rows(contexts, idx), batch_repeat(uncond, len(idx)),
                                          noise.to(backend.device), guidance).cpu())
    return torch.cat(trajs), which


def pool_key(cfg: DistillConfig, prompts: list[str], guidance: float, num_steps: int) -> dict:
    """What the pool depends on: a rerun with another lr, rank, ... reuses it."""
    return {"model": cfg.model, "prompts": prompts, "pool": cfg.pool, "num_steps": num_steps,
            "guidance": guidance, "seed": cfg.seed}


def save_pool(path: Path, key: dict, trajectories: torch.Tensor, prompts: torch.Tensor) -> Path:
    """Write the pool atomically with its key as metadata."""
    from safetensors.torch import save_file

    from shortft.files import atomic_path

    with atomic_path(path) as tmp:
        save_file({"trajectories": trajectories.contiguous(), "prompts": prompts.contiguous()}, tmp,
                  metadata={"key": json.dumps(key)})
    return path


def load_pool(path: Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored (trajectories, prompts) when `path` holds a pool with this key; None when there is none
    or it has another key; BadPoolFile when the file is not a safetensors pool."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            if json.loads((f.metadata() or {}).get("key", "null")) != key:
                return None
            return f.get_tensor("trajectories"), f.get_tensor("prompts")
    except (SafetensorError, ValueError, KeyError) as err:
        raise BadPoolFile(f"{path} is not a teacher pool written by `shortft distill` ({err}); "
                          "delete it to build the pool again") from None

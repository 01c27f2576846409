"""Sampling with trained LoRAs: the original chain (no shortcut) with each timestep's adapters, in
this engine or in a stock diffusers pipeline through `TimestepLoRASwitch`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shortft import lora
from shortft.chain import run_plan
from shortft.errors import MissingFileError


def seeded_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """(N, C, h, w) initial latents, row i drawn from torch.Generator().manual_seed(seeds[i]), exactly as a
    stock pipeline given a list of generators draws them."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(backend, plan, prompts: list[str], seeds: list[int], batch_size: int = 8) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for prompts[i] from seed seeds[i], sampled along `plan`."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        x = seeded_noise(backend.latent_shape(len(p)), s).to(backend.device)
        cond, uncond = backend.encode_prompts(p), backend.encode_prompts([""] * len(p))
        out.append(backend.decode(run_plan(backend, plan, x, cond, uncond)).cpu())
    return torch.cat(out)


def run_metadata_of(run_dir: str | Path) -> dict:
    """A finished run's lora/shortft.json (adapters, per-timestep schedule, config)."""
    meta_file = Path(run_dir) / "lora" / "shortft.json"
    if not meta_file.is_file():
        raise MissingFileError(f"{run_dir} is not a finished shortft run (no lora/shortft.json)")
    return json.loads(meta_file.read_text())


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild (backend, method, cfg) from a run folder, with its trained LoRAs loaded."""
    from shortft.backends import load_backend
    from shortft.config import TrainConfig, from_dict
    from shortft.methods import METHODS

    run_dir = Path(run_dir)
    meta = run_metadata_of(run_dir)
    cfg = from_dict(TrainConfig, meta["config"])
    backend = load_backend(cfg.model, device=device)
    backend.resolution = cfg.resolution  # sample at the resolution the run trained at
    for name in meta["adapters"]:
        lora.load_lora(backend.net, run_dir / "lora" / f"{name}.safetensors", name, fmt=backend.lora_format)
    method = METHODS[cfg.method](cfg)
    method.setup(backend)
    return backend, method, cfg


def sample_run(run_dir: str | Path, prompts: list[str], seeds: list[int], device: str | torch.device = "cpu",
               base: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] of a trained run: the original chain with each timestep's adapters
    (`base=True`: every adapter off, the model before training)."""
    from shortft.chain import sampling_plan

    backend, method, cfg = load_run(run_dir, device)
    plan = method.sample_plan()
    if base:
        plan = sampling_plan([s.t_from for s in plan.steps], lambda i: (), cfg.guidance)
    return generate(backend, plan, prompts, seeds)


class TimestepLoRASwitch:
    """`callback_on_step_end` for a stock diffusers pipeline of the run's family (StableDiffusionPipeline,
    StableDiffusion3Pipeline, ...) that switches LoRA adapters per step, so plain diffusers reproduces
    `shortft sample`.

        switch = TimestepLoRASwitch.from_run("runs/x", pipe)   # loads the LoRA files into the pipeline
        pipe(prompts, num_inference_steps=50, callback_on_step_end=switch)

    `schedule[i]` names the adapters active at sampling step i ([] = base model); `weights` gives each
    adapter's weight when active (1, and the run's shortcut_scale for a frozen shortcut). The callback runs
    after step i and sets the adapters of step i + 1; `from_run` sets those of step 0.
    """

    def __init__(self, schedule: list[list[str]], weights: dict[str, float]):
        self.schedule = [list(a) for a in schedule]
        self.weights = dict(weights)

    @classmethod
    def from_run(cls, run_dir: str | Path, pipe) -> TimestepLoRASwitch:
        from shortft.config import TrainConfig, from_dict
        from shortft.methods.base import shortcut_file

        run_dir = Path(run_dir)
        meta = run_metadata_of(run_dir)
        cfg = from_dict(TrainConfig, meta["config"])
        for name in meta["adapters"]:
            pipe.load_lora_weights(run_dir / "lora", weight_name=f"{name}.safetensors", adapter_name=name)
        weights = dict.fromkeys(meta["adapters"], 1.0)
        if meta.get("frozen"):  # shortcut-ft samples on top of the shortcut, at the run's shortcut scale
            file = lora.resolve_file(shortcut_file(cfg))
            for name in meta["frozen"]:
                pipe.load_lora_weights(file.parent, weight_name=file.name, adapter_name=name)
                weights[name] = cfg.shortcut_scale
        switch = cls(meta["schedule"], weights)
        switch.apply(pipe, 0)
        return switch

    def apply(self, pipe, index: int) -> None:
        """Activate the adapters of step `index` at their weights, every other adapter at 0 (exactly off)."""
        active = self.schedule[index]
        pipe.set_adapters(list(self.weights), [w if a in active else 0.0 for a, w in self.weights.items()])

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        if len(pipe.scheduler.timesteps) != len(self.schedule):
            raise ValueError(f"the pipeline samples {len(pipe.scheduler.timesteps)} steps but the run's schedule "
                             f"has {len(self.schedule)}: pass num_inference_steps={len(self.schedule)}")
        if step_index + 1 < len(self.schedule):
            self.apply(pipe, step_index + 1)
        return callback_kwargs


def run_metadata(method, cfg_dict: dict) -> dict:
    """What a run folder's lora/shortft.json records: adapters, per-timestep schedule, config."""
    plan = method.sample_plan()
    used = {a for s in plan.steps for a in s.adapters} - set(method.adapter_names())
    frozen = {name: method.cfg.shortcut for name in sorted(used)}  # only the shortcut is ever frozen and sampled;
    # it is recorded as the config names it ("" = the shipped world shortcut), so the folder stays portable
    return {"adapters": method.adapter_names(), "frozen": frozen, "timesteps": method.timesteps,
            "schedule": [list(s.adapters) for s in plan.steps],
            "guidance": method.cfg.guidance, "config": cfg_dict}

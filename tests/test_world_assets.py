"""The shipped embedded world: its model loads through the SD backend (and stock diffusers, with the
same images), its scorers load and mean something, its shortcut preserves trajectories, its assets
are small safetensors, and a 2-step `shortft train` on it writes a complete run folder."""

from __future__ import annotations

import json
import random

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from shortft.backends import SDBackend
from shortft.chain import Plan, Step, run_plan, sampling_plan
from shortft.cli import main
from shortft.config import build_config
from shortft.methods import METHODS
from shortft.methods.base import shortcut_file
from shortft.sample import generate
from shortft.world import ASSETS, WORLD_CLIP, WORLD_FLOW_MODEL, WORLD_FLOW_SHORTCUT, WORLD_MODEL, WORLD_SHORTCUT
from shortft.world.evaluator import prompt_fidelity
from shortft.world.scenes import caption, one_attribute_wrong, prompt_split, render, sample_scenes


def test_assets_are_small_safetensors():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert {WORLD_SHORTCUT, WORLD_FLOW_SHORTCUT} <= set(weights) and all(p.suffix == ".safetensors" for p in weights)
    flow = [p for p in weights if p == WORLD_FLOW_SHORTCUT or WORLD_FLOW_MODEL in p.parents]
    assert sum(p.stat().st_size for p in flow) <= 30e6  # the flow world adds at most 30 MB
    assert sum(p.stat().st_size for p in set(weights) - set(flow)) <= 30e6  # the eps world: at most 30 MB


def test_world_model_matches_stock_pipeline():
    backend = SDBackend.load("world")
    prompts = prompt_split("heldout")[:2]
    assert backend.image_size == 64 and backend.latent_shape(2) == (2, 4, 8, 8)
    ts = backend.timesteps(50)
    ours = generate(backend, sampling_plan(ts, lambda i: (), 5.0), prompts, [0, 1])
    assert ours.shape == (2, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
    pipe = StableDiffusionPipeline.from_pretrained(WORLD_MODEL, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompts, num_inference_steps=50, guidance_scale=5.0, output_type="pt",
                 generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert (ours - stock.clamp(0, 1)).abs().max() < 1e-3


def test_world_scorers_read_the_world():
    scenes = sample_scenes(48, "heldout", seed=5)
    images = render(scenes)
    right = [caption(s, i % 5) for i, s in enumerate(scenes)]
    assert prompt_fidelity(images, right)["mean"] == 1.0  # the evaluator reads real images perfectly
    rng = random.Random(0)
    wrong = [caption(one_attribute_wrong(s, rng), i % 5) for i, s in enumerate(scenes)]
    from shortft.rewards import RewardSettings, build_reward

    reward = build_reward("world_clip", RewardSettings(device="cpu"))
    assert WORLD_CLIP.is_dir()
    with torch.no_grad():
        prefer = (reward(images, right) > reward(images, wrong)).float().mean()
    assert prefer >= 0.8  # the preference model ranks the true caption over a one-attribute-wrong one


def test_shipped_shortcut_preserves_trajectories():
    """Each shortcut jump (741->501, 481->261, 241->1) lands nearer the 50-step CFG chain than a naive
    one-step DDIM jump of the base model from the same point."""
    backend = SDBackend.load("world")
    cfg = build_config("world")
    assert cfg.shortcut == "" and shortcut_file(cfg) == str(WORLD_SHORTCUT)  # "" names the shipped shortcut
    method = METHODS["shortft"](cfg)
    method.setup(backend)  # loads the shipped shortcut as a frozen adapter
    ts = backend.timesteps(50)
    prompts = prompt_split("heldout")[:4]
    cond, uncond = backend.encode_prompts(prompts), backend.encode_prompts([""] * 4)

    def chain(x, i, j):  # DDIM steps ts[i] -> ... -> ts[j]
        return run_plan(backend, Plan([Step(ts[k], ts[k + 1], (), "none", cfg.guidance) for k in range(i, j)]),
                        x, cond, uncond)

    x = torch.randn(backend.latent_shape(4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, at = chain(x, 0, 12), 12  # segment 1 of the chain: 981 -> ... -> 741
        for start, end in ((12, 24), (25, 36), (37, 49)):  # 741->501, 481->261, 241->1 as ShortFT jumps
            x = chain(x, at, start)
            teacher = chain(x, start, end)
            jump = run_plan(backend, Plan([Step(ts[start], ts[end], ("shortcut",), "none", cfg.shortcut_guidance)]), x, cond, uncond)
            naive = run_plan(backend, Plan([Step(ts[start], ts[end], (), "none", cfg.guidance)]), x, cond, uncond)
            assert (jump - teacher).pow(2).mean() < 0.5 * (naive - teacher).pow(2).mean(), (ts[start], ts[end])
            x, at = teacher, end


@pytest.mark.parametrize("model", ["world", "world-flow"])
def test_two_step_train_on_each_shipped_world(model, tmp_path):
    """A complete, portable run folder (the model recorded by name), and `shortft eval --run` on it."""
    run = tmp_path / "run"
    assert main(["train", "--model", model, "max_steps=2", "eval_count=2", f"run_dir={run}"]) == 0
    for name in ("config.yaml", "reward_curve.png", "before_after.png", "summary.json", "lora/shortft.json",
                 "lora/lora1.safetensors", "lora/lora4.safetensors"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    for when in ("before", "after"):
        assert set(summary[when]["fidelity"]) >= {"shape", "colour", "size", "position", "background"}
    assert summary["steps"] == 2
    assert f"model: {model}\n" in (run / "config.yaml").read_text()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na small blue square\n")
    assert main(["eval", "--run", str(run), "--prompts", str(prompts), "--metrics", "world_clip"]) == 0
    rows = [line.split(",") for line in (run / "eval" / "scores.csv").read_text().splitlines()]
    assert rows[0] == ["file", "prompt", "world_clip"] and len(rows) == 3
    assert all(abs(float(r[2])) < 100 for r in rows[1:])  # a CLIP logit per sampled image

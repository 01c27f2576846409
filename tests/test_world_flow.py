"""The shipped flow world (SD 3 format): it loads through the SD 3 backend and through a stock
StableDiffusion3Pipeline with the same images, its shortcut jumps land nearer the 28-step chain than the
base model's own one-step jump (its 2-step training run: tests/test_world_assets.py)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from shortft.backends import SD3Backend, load_backend
from shortft.chain import Plan, Step, run_plan, sampling_plan
from shortft.config import build_config
from shortft.methods import METHODS
from shortft.methods.base import shortcut_file
from shortft.methods.shortft import segment_bounds
from shortft.sample import generate
from shortft.world import WORLD_FLOW_MODEL, WORLD_FLOW_SHORTCUT
from shortft.world.scenes import prompt_split


def test_flow_world_matches_the_stock_sd3_pipeline():
    backend = load_backend("world-flow")
    assert isinstance(backend, SD3Backend) and backend.t5 is None and backend.image_size == 64
    prompts = prompt_split("heldout")[:2]
    ours = generate(backend, sampling_plan(backend.timesteps(28), lambda i: (), 5.0), prompts, [0, 1])
    # no T5: diffusers wants that said (text_encoder_3=None, tokenizer_3=None), as for any SD 3 folder without it
    pipe = StableDiffusion3Pipeline.from_pretrained(WORLD_FLOW_MODEL, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    # the T5 slot is one zero token (flow-model/shortft.json), as the model was trained; the pipeline's default 256
    stock = pipe(prompts, num_inference_steps=28, guidance_scale=5.0, output_type="pt", height=64, width=64,
                 max_sequence_length=1, generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert ours.shape == stock.shape == (2, 3, 64, 64) and ours.std() > 0.05
    assert (ours - stock.clamp(0, 1)).abs().max() < 1e-3


def test_flow_shortcut_preserves_trajectories():
    """Each of the shipped flow shortcut's jumps (ShortFT's segments 2-4 on the 28-step grid) lands nearer
    the CFG chain than a one-step flow jump of the base model from the same point."""
    backend = load_backend("world-flow")
    cfg = build_config("world-flow")
    assert shortcut_file(cfg) == str(WORLD_FLOW_SHORTCUT)
    method = METHODS["shortft"](cfg)
    method.setup(backend)
    ts = backend.timesteps(cfg.num_steps)
    b = segment_bounds(cfg.num_steps, cfg.segments)  # 28 steps, k = 4: [0, 7, 14, 21, 28]
    prompts = prompt_split("heldout")[:4]
    cond, uncond = backend.encode_prompts(prompts), backend.encode_prompts([""] * 4)

    def chain(x, i, j):
        return run_plan(backend, Plan([Step(ts[k], ts[k + 1], (), "none", cfg.guidance) for k in range(i, j)]),
                        x, cond, uncond)

    x = torch.randn(backend.latent_shape(4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, at = chain(x, 0, b[1]), b[1]
        for start, end in [(b[j - 1], b[j] - 1) for j in (2, 3, 4)]:  # ShortFT's jumps over segments 2..4
            x = chain(x, at, start)
            teacher = chain(x, start, end)
            jump = run_plan(backend, Plan([Step(ts[start], ts[end], ("shortcut",), "none", cfg.shortcut_guidance)]),
                            x, cond, uncond)
            naive = run_plan(backend, Plan([Step(ts[start], ts[end], (), "none", cfg.guidance)]), x, cond, uncond)
            assert (jump - teacher).pow(2).mean() < 0.7 * (naive - teacher).pow(2).mean(), (ts[start], ts[end])
            x, at = teacher, end

"""SDXL (the UNet family with two text encoders and time-id conditioning) on a tiny random-weight model:
parity with the stock StableDiffusionXLPipeline + DDIM, with and without CFG; every method trains its
adapters only; the LoRA files and the callback reproduce `shortft sample` in a stock pipeline; a 2-step
`shortft train` through the CLI; the backend is picked from model_index.json."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from conftest import PROMPTS, train_overrides
from shortft.backends import SDXLBackend, load_backend, model_family
from shortft.bench import chain_scaled
from shortft.chain import sampling_plan
from shortft.cli import main
from shortft.config import build_config
from shortft.methods import METHODS
from shortft.presets import default_preset
from shortft.sample import TimestepLoRASwitch, generate, load_run
from shortft.testing import make_tiny_lora, make_tiny_sdxl
from shortft.train import build_model, train


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sdxl")
    model = make_tiny_sdxl(root / "model")
    (root / "prompts.txt").write_text(PROMPTS)
    return {"model": str(model), "shortcut": str(make_tiny_lora(model, root / "shortcut.safetensors")),
            "prompts": str(root / "prompts.txt")}


def stock(folder: str) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)  # Euler never clips
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_engine_matches_the_stock_sdxl_pipeline(tiny_sdxl, guidance):
    b = load_backend(tiny_sdxl["model"])
    assert isinstance(b, SDXLBackend) and model_family(tiny_sdxl["model"]) == "sdxl"
    assert default_preset(tiny_sdxl["model"]) == "sdxl"
    prompts, seeds = ["a red circle", "a blue square on the left"], [3, 7]
    ours = generate(b, sampling_plan(b.timesteps(8), lambda i: (), guidance), prompts, seeds)
    theirs = stock(tiny_sdxl["model"])(prompts, num_inference_steps=8, guidance_scale=guidance, output_type="pt",
                                       generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert ours.shape == theirs.shape == (2, 3, 16, 16) and ours.std() > 1e-3
    assert (ours - theirs).abs().max() < 1e-4


def test_the_conditioning_is_the_pipelines(tiny_sdxl):
    b = load_backend(tiny_sdxl["model"])
    pipe = stock(tiny_sdxl["model"])
    cond = b.encode_prompts(["a red circle", ""])
    hidden, _, pooled, _ = pipe.encode_prompt(["a red circle"], do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["hidden"][:1], hidden)
    torch.testing.assert_close(cond["pooled"][:1], pooled)
    assert not cond["hidden"][1].any() and not cond["pooled"][1].any()  # force_zeros_for_empty_prompt
    assert cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2  # (original, crop, target)
    assert b.vae.dtype == torch.float32  # force_upcast: decoded in fp32 whatever the run's dtype


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_only_its_adapters_on_sdxl(tiny_sdxl, tmp_path, method):
    cfg = build_config("world", overrides=train_overrides(tiny_sdxl, tmp_path / "run", method=method,
                                                          **chain_scaled(10)))
    torch.manual_seed(cfg.seed)
    before = {n: p.detach().clone() for n, p in build_model(cfg, "cpu")[0].net.named_parameters()}
    run = train(cfg)
    for name, p in run.backend.net.named_parameters():
        trained = any(f".{a}." in name for a in run.method.adapter_names())
        assert torch.equal(p, before[name]) != trained, name


def test_loras_and_callback_reproduce_shortft_sample_in_a_stock_sdxl_pipeline(tiny_sdxl, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *[f"{k}={v}" for k, v in train_overrides(tiny_sdxl, run, method="shortft").items()]]) == 0
    meta = json.loads((run / "lora" / "shortft.json").read_text())
    assert meta["adapters"] == ["lora1", "lora2", "lora3", "lora4"] and len(meta["schedule"]) == 10
    backend, method, cfg = load_run(run)
    prompts, seeds = ["a red circle on the left", "a small green triangle"], [0, 1]
    ours = generate(backend, method.sample_plan(), prompts, seeds)
    pipe = stock(tiny_sdxl["model"])
    theirs = pipe(prompts, num_inference_steps=cfg.num_steps, guidance_scale=cfg.guidance, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in seeds],
                  callback_on_step_end=TimestepLoRASwitch.from_run(run, pipe)).images
    assert (ours - theirs).abs().max() < 1e-4


def test_rewards_get_1024px_images_differentiably():
    """A reward's preprocessing takes the decoded image at SDXL's size down to its own, gradient intact."""
    from shortft.rewards.common import OPENAI_MEAN, OPENAI_STD, clip_preprocess

    images = torch.rand(1, 3, 1024, 1024, requires_grad=True)
    pixels = clip_preprocess(images, 224, (224, 224), OPENAI_MEAN, OPENAI_STD)
    assert pixels.shape == (1, 3, 224, 224)
    pixels.square().mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

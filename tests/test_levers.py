"""The memory levers (VAE-decoder checkpointing, VAE slicing, checkpointing every in-graph call, reward
weights in half precision) leave the gradient as it is on a tiny model, and the resolution setting
changes the latents' size as the model's VAE says; the full-size architectures build through the same
code at toy widths and load through the backends."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import train_overrides
from shortft import lora
from shortft.bench.arch import ARCHS, build_arch
from shortft.config import build_config
from shortft.rewards.testing import make_tiny_clip
from shortft.train import build_model, build_reward_fn, make_rollout


def lora_gradients(tiny, prepare=None, **levers) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one ShortFT stage-1 rollout (batch 2, CFG) with the given levers; `prepare`
    sees the backend before the rollout."""
    cfg = build_config("world", overrides=train_overrides(tiny, "unused", method="shortft", guidance=3.0, **levers))
    torch.manual_seed(0)
    backend, method = build_model(cfg, "cpu")
    if prepare:
        prepare(backend)
    g = torch.Generator().manual_seed(1)
    for p in (p for n, p in backend.net.named_parameters() if ".lora_" in n):
        p.data = torch.randn(p.shape, generator=g) * 0.05
    lora.set_trainable(backend.net, method.adapter_names())
    rollout, rng = make_rollout(cfg, backend, ["a red circle", "a blue square"], build_reward_fn(cfg, "cpu"), 0)
    loss, _, _ = method.loss(rollout, method.plan(0.0, random.Random(0)))
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in backend.net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lever", [{"vae_checkpoint": True}, {"vae_slicing": True}, {"checkpoint_calls": True}])
def test_a_memory_lever_leaves_the_gradient_unchanged(tiny, lever):
    loss, grads = lora_gradients(tiny)
    loss_l, grads_l = lora_gradients(tiny, **lever)
    assert loss_l == pytest.approx(loss, rel=1e-6) and grads.keys() == grads_l.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(grads_l[name], g, rtol=1e-5, atol=1e-8)


def test_lora_branches_under_autocast_take_the_half_input_as_it_is_with_the_same_gradient(tiny):
    """With mixed precision `build_model` keeps the LoRA inputs in half precision (lora.keep_input_dtype): peft's
    cast to the fp32 LoRA weights and autocast's cast back are a round trip that only cost memory. The same loss,
    and the same gradients to bf16 rounding (with the casts, the branches' input gradients add up in fp32 first)."""
    def autocast(keep: bool):
        def prepare(backend):
            layers = lora.lora_layers(backend.net)
            assert layers and not any(layer.cast_input_dtype_enabled for layer in layers)  # build_model's doing
            for layer in layers:
                layer.cast_input_dtype_enabled = not keep
            backend.denoiser.forward = torch.autocast("cpu", dtype=torch.bfloat16)(backend.denoiser.forward)
        return prepare

    half = {"dtype": "bf16", "mixed_precision": "bf16"}
    loss, grads = lora_gradients(tiny, prepare=autocast(keep=False), **half)
    loss_k, grads_k = lora_gradients(tiny, prepare=autocast(keep=True), **half)
    assert loss_k == loss and grads.keys() == grads_k.keys() and len(grads) > 10
    flat, flat_k = (torch.cat([g[n].flatten().float() for n in grads]) for g in (grads, grads_k))
    assert torch.nn.functional.cosine_similarity(flat, flat_k, dim=0) > 0.999
    assert (flat_k - flat).norm() <= 0.02 * flat.norm()


def test_a_half_precision_reward_changes_the_gradient_only_at_that_precision(tiny, tmp_path):
    clip = make_tiny_clip(tmp_path / "clip", image_size=16, patch=8)
    common = {"reward": "world_clip", "reward_paths": f"world_clip={clip}"}
    loss, grads = lora_gradients(tiny, **common)
    loss_h, grads_h = lora_gradients(tiny, **common, reward_dtype="bf16")
    # bf16 keeps 8 significant bits through the CLIP tower: the loss moves by a few percent (2.7% measured here),
    # the gradient's direction hardly at all (cosine 0.9996 measured)
    assert loss_h == pytest.approx(loss, rel=5e-2) and loss_h != loss
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads.values()]),
                                                   torch.cat([grads_h[n].flatten() for n in grads]), dim=0)
    assert cosine > 0.99


def test_the_resolution_sets_the_latent_size(tiny):
    cfg = build_config("world", overrides=train_overrides(tiny, "unused", resolution=32))
    backend, _ = build_model(cfg, "cpu")
    assert backend.image_size == 32 and backend.latent_shape(2) == (2, 4, 16, 16)
    assert backend.decode(torch.randn(1, 4, 16, 16)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_full_size_architectures_build_and_run_through_the_backends_at_toy_width(arch, tmp_path):
    """The published layouts at 1/20 of their widths: the family is read from the folder, one step of the
    chain and a decode run at a tiny resolution."""
    from shortft.backends import load_backend
    from shortft.chain import Step, run_plan

    backend = load_backend(str(build_arch(arch, tmp_path / arch, width_divisor=20)))
    assert backend.family == {"sd15": "sd", "sdxl": "sdxl", "sd35m": "sd3"}[arch]
    assert backend.image_size == (512 if arch == "sd15" else 1024)  # the native resolution of the real model
    backend.resolution = 64
    ts = backend.timesteps(4)
    x = torch.randn(backend.latent_shape(1))
    cond, uncond = backend.encode_prompts(["a photo of a cat"]), backend.encode_prompts([""])
    with torch.no_grad():
        out = run_plan(backend, [Step(ts[0], ts[1], (), "none", 3.0)], x, cond, uncond)
        image = backend.decode(out)
    assert out.shape == x.shape and image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()

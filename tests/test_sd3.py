"""The flow-matching family (SD 3 / 3.5 format) on tiny random-weight models: parity with the stock
StableDiffusion3Pipeline (with and without T5), the flow jump, gradients against finite differences,
training every method, LoRA files a stock pipeline loads and the callback that reproduces `shortft sample`."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from conftest import train_overrides
from shortft import lora
from shortft.backends import SD3Backend, load_backend
from shortft.chain import END, X0, run_plan, sampling_plan
from shortft.config import build_config
from shortft.methods import METHODS
from shortft.sample import TimestepLoRASwitch, generate, load_run
from shortft.train import build_model, train


def stock(folder: str, t5: bool = True) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **({} if t5 else dict(text_encoder_3=None, tokenizer_3=None)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("t5", [True, False])
def test_engine_matches_the_stock_sd3_pipeline(tiny_sd3, t5):
    folder = tiny_sd3["model" if t5 else "model_no_t5"]
    b = load_backend(folder)
    assert isinstance(b, SD3Backend) and (b.t5 is not None) == t5
    prompts, seeds = ["a red circle", "a blue square on the left"], [3, 7]
    ours = generate(b, sampling_plan(b.timesteps(6), lambda i: (), 4.0), prompts, seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = stock(folder, t5)(prompts, num_inference_steps=6, guidance_scale=4.0, generator=gens, output_type="pt",
                               height=b.image_size, width=b.image_size).images
    assert ours.shape == theirs.shape == (2, 3, 16, 16) and ours.std() > 1e-3
    assert (ours - theirs).abs().max() < 1e-4


def test_the_flow_jump_is_the_euler_step_and_x0_is_exact(tiny_sd3):
    b = load_backend(tiny_sd3["model"])
    ts = b.timesteps(8)
    sched = FlowMatchEulerDiscreteScheduler.from_config(b.scheduler_config)
    sched.set_timesteps(8)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i, t in enumerate(ts):
        x0, eps = b.split(v, x, t)
        a, s = b.coefficients(ts[i + 1] if i + 1 < len(ts) else END)
        sched._step_index = i
        torch.testing.assert_close(a * x0 + s * eps, sched.step(v, sched.timesteps[i], x).prev_sample,
                                   atol=1e-5, rtol=1e-5)
    clean, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in ts:
        a, s = b.coefficients(t)
        x0, _ = b.split(noise - clean, a * clean + s * noise, t)  # the true velocity ε - x0
        torch.testing.assert_close(x0, clean, atol=1e-5, rtol=1e-5)
    assert b.coefficients(X0) == b.coefficients(END) == (1.0, 0.0) and ts[0] == 1000.0


def test_a_short_shortft_rollout_has_the_finite_difference_gradient(tiny_sd3):
    """Autograd through a stage-1 ShortFT plan (LoRA steps, the frozen shortcut's jumps with gradient through
    their input, CFG) equals central finite differences, in float64."""
    cfg = build_config("world", overrides=train_overrides(tiny_sd3, "unused", num_steps=8, method="shortft",
                                                          s1_grad_steps=2, guidance=3.0))
    backend = load_backend(cfg.model, dtype=torch.float64)
    method = METHODS["shortft"](cfg)
    method.setup(backend)
    g = torch.Generator().manual_seed(0)
    for p in (p for n, p in backend.net.named_parameters() if ".lora_" in n):
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1
    params = lora.set_trainable(backend.net, method.adapter_names())
    plan = method.plan(0.0, random.Random(0))
    # every step is in the graph (segment 1 whole), so finite differences see what autograd sees
    assert all(s.grad == "full" for s in plan.steps)
    assert [s.adapters for s in plan.steps][:3] == [("lora1",), ("lora1",), ("shortcut",)]
    cond, uncond = backend.encode_prompts(["a red circle"]), backend.encode_prompts([""])
    x_T = torch.randn(backend.latent_shape(1), generator=g, dtype=torch.float64)

    def objective():
        return run_plan(backend, plan, x_T, cond, uncond).square().mean()

    objective().backward()
    checked = 0
    for p in params[::7]:  # a spread of A and B matrices of every adapter
        i = int(torch.randint(p.numel(), (1,), generator=g))
        with torch.no_grad():
            old = p.view(-1)[i].item()
            p.view(-1)[i] = old + 1e-6
            up = objective().item()
            p.view(-1)[i] = old - 1e-6
            down = objective().item()
            p.view(-1)[i] = old
        assert p.grad.view(-1)[i].item() == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-10)  # FD rounding ~1e-16 / 1e-6
        checked += 1
    assert checked >= 4


def test_shortft_on_a_flow_model_trains_its_loras_and_a_stock_pipeline_reproduces_sample(tiny_sd3, tmp_path):
    cfg = build_config("world", overrides=train_overrides(tiny_sd3, tmp_path / "run", max_steps=4, num_steps=8))
    torch.manual_seed(cfg.seed)
    before = {n: p.detach().clone() for n, p in build_model(cfg, "cpu")[0].net.named_parameters()}
    run = train(cfg)
    now = dict(run.backend.net.named_parameters())
    last = len(run.backend.net.transformer_blocks) - 1  # context_pre_only: its context queries reach no output
    assert not any(n.startswith(f"transformer_blocks.{last}.attn.add_q_proj.lora_") for n in now)  # so no LoRA there
    for name, p in now.items():
        trained = any(f".{a}." in name for a in run.method.adapter_names())
        assert torch.equal(p, before[name]) != trained, name  # trainable changed, frozen (base, shortcut) did not
    backend, method, cfg = load_run(run.dir)
    prompts, seeds = ["a red circle on the left", "a small green triangle"], [0, 1]
    ours = generate(backend, method.sample_plan(), prompts, seeds)
    pipe = stock(tiny_sd3["model"])
    switch = TimestepLoRASwitch.from_run(run.dir, pipe)
    theirs = pipe(prompts, num_inference_steps=cfg.num_steps, guidance_scale=cfg.guidance, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in seeds], callback_on_step_end=switch,
                  height=16, width=16).images
    assert (ours - theirs).abs().max() < 1e-4
    base = generate(backend, sampling_plan(method.timesteps, lambda i: (), cfg.guidance), prompts, seeds)
    assert (ours - base).abs().max() > 1e-4  # the LoRAs matter


def test_shortcut_ft_samples_on_the_shortcut_at_its_scale_in_a_stock_pipeline(tiny_sd3, tmp_path):
    cfg = build_config("world", overrides=train_overrides(tiny_sd3, tmp_path / "run", method="shortcut-ft",
                                                          shortcut_scale=0.5, shortcut_guidance=2.0, segments=3))
    run = train(cfg)
    backend, method, cfg = load_run(run.dir)
    ours = generate(backend, method.sample_plan(), ["a red circle"], [0])
    pipe = stock(tiny_sd3["model"])
    theirs = pipe(["a red circle"], num_inference_steps=3, guidance_scale=2.0, output_type="pt", height=16, width=16,
                  generator=[torch.Generator().manual_seed(0)],
                  callback_on_step_end=TimestepLoRASwitch.from_run(run.dir, pipe)).images
    assert (ours - theirs).abs().max() < 1e-4

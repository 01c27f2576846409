"""The chain engine: the DDIM update, parity with the stock diffusers pipeline, gradient modes."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from shortft import lora
from shortft.backends import SDBackend
from shortft.chain import END, X0, Step, run_plan, sampling_plan
from shortft.sample import generate
from shortft.testing import make_tiny_model


def _jump(backend, out, x, t, t_to):
    x0, eps = backend.split(out, x, t)
    a, b = backend.coefficients(t_to)
    return a * x0 + b * eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_jump_to_the_next_timestep_is_the_ddim_step(tmp_path, prediction_type):
    b = SDBackend.load(str(make_tiny_model(tmp_path / "m", prediction_type=prediction_type)))
    sched = DDIMScheduler.from_config(b.scheduler_config)
    sched.set_timesteps(10)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ts = [int(t) for t in sched.timesteps]
    for i, t in enumerate(ts):
        expected = sched.step(out, t, x).prev_sample
        t_to = ts[i + 1] if i + 1 < len(ts) else END
        torch.testing.assert_close(_jump(b, out, x, t, t_to), expected, atol=1e-5, rtol=1e-5)


def test_x0_is_exact_on_a_sample_built_from_known_x0_and_noise(backend):
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (981, 501, 1):
        a, b = backend.coefficients(t)
        torch.testing.assert_close(_jump(backend, eps, a * x0 + b * eps, t, X0), x0, atol=1e-4, rtol=1e-4)


def test_sd15_timesteps_and_final_alpha(backend):
    ts = backend.timesteps(50)
    assert ts[:3] == [981, 961, 941] and ts[-1] == 1 and len(ts) == 50
    assert backend.alpha(END) == pytest.approx(float(backend.alphas_cumprod[0]))  # set_alpha_to_one=False
    assert backend.alpha(None) == 1.0


def _stock_pipeline(b: SDBackend) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.net,
                                   scheduler=DDIMScheduler.from_config(b.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_engine_matches_stock_pipeline(tmp_path, prediction_type):
    b = SDBackend.load(str(make_tiny_model(tmp_path / "m", prediction_type=prediction_type)))
    prompts, seeds = ["a red circle", "a blue square on the left"], [3, 7]
    plan = sampling_plan(b.timesteps(12), lambda i: (), guidance=5.0)
    ours = generate(b, plan, prompts, seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    stock = _stock_pipeline(b)(prompts, num_inference_steps=12, guidance_scale=5.0, generator=gens,
                               output_type="pt").images
    assert ours.shape == stock.shape == (2, 3, 16, 16)
    assert (ours - stock).abs().max() < 1e-4
    assert ours.std() > 1e-3  # not a degenerate image


def _lora_backend(tiny):
    b = SDBackend.load(tiny["model"])
    for name in ("a", "b"):
        lora.add_lora(b.net, name, 4)
        for p in lora.adapter_parameters(b.net, name):
            p.data.normal_(0, 0.2)
    lora.set_trainable(b.net, ["a", "b"])
    return b


def _grads(b, steps, x):
    cond = b.encode_prompts(["a red circle"])
    x = x.clone().requires_grad_(True)
    out = run_plan(b, steps, x, cond)
    out.square().sum().backward()
    g = {n: lora.adapter_parameters(b.net, n)[0].grad for n in ("a", "b")}
    return out.detach(), x.grad, g


def test_grad_modes_route_gradients(tiny):
    b = _lora_backend(tiny)
    x = torch.randn(1, 4, 8, 8)
    # none: no gradient reaches the weights, but x_t' still depends linearly on x_t
    _, gx, g = _grads(b, [Step(501, 481, ("a",), "none")], x)
    assert g["a"] is None
    ratio = (b.alpha(481) / b.alpha(501)) ** 0.5
    assert torch.allclose(gx, 2 * _grads(b, [Step(501, 481, ("a",), "none")], x)[0] * ratio, atol=1e-5)
    # full: weights of the active adapter only; gradient through the UNet input
    _, gx_full, g = _grads(b, [Step(501, 481, ("a",), "full")], x)
    assert g["a"] is not None and g["a"].abs().sum() > 0 and g["b"] is None
    assert not torch.allclose(gx_full, gx, atol=1e-6)
    # detach_input (DRTune): weights get gradient, the input only gets the linear term
    b.net.zero_grad(set_to_none=True)
    out, gx_det, g = _grads(b, [Step(501, 481, ("a",), "detach_input")], x)
    assert g["a"] is not None and g["a"].abs().sum() > 0
    assert torch.allclose(gx_det, 2 * out * ratio, atol=1e-5)


def test_input_grad_scales_only_the_gradient_through_the_model_input(tiny):
    """input_grad s: the value of a full step, the weights' gradient unchanged, and the input's gradient
    the linear term plus s times the path through the model: detach_input's at 0, full's at 1."""
    b = _lora_backend(tiny)
    x = torch.randn(1, 4, 8, 8)

    def run(**kw):
        b.net.zero_grad(set_to_none=True)
        out, gx, g = _grads(b, [Step(501, 481, ("a",), **kw)], x)
        return out, gx, g["a"].clone()

    out_d, gx_d, g_d = run(grad="detach_input")
    out_f, gx_f, g_f = run(grad="full")
    assert not torch.allclose(gx_d, gx_f, atol=1e-4)  # the path through the model input matters here
    for s in (0.0, 0.3, 1.0):
        out_s, gx_s, g_s = run(grad="full", input_grad=s)
        assert torch.equal(out_s, out_f)
        torch.testing.assert_close(g_s, g_f)
        torch.testing.assert_close(gx_s, (1 - s) * gx_d + s * gx_f, atol=1e-6, rtol=1e-5)
    for bad in (dict(grad="none", input_grad=0.5), dict(grad="detach_input", input_grad=0.0),
                dict(grad="full", input_grad=1.5)):
        with pytest.raises(ValueError, match="input_grad"):
            Step(501, 481, ("a",), **bad)


def test_checkpoint_equals_full_with_switching_adapters(tiny):
    """Recomputation in backward must re-activate each step's own adapters."""
    b = _lora_backend(tiny)
    x = torch.randn(1, 4, 8, 8)
    plan = [Step(501, 261, ("a",), "full"), Step(261, 1, ("a", "b"), "full"), Step(1, END, ("b",), "full")]
    out_f, gx_f, g_f = _grads(b, plan, x)
    g_f = {k: v.clone() for k, v in g_f.items()}
    b.net.zero_grad(set_to_none=True)
    ckpt = [Step(s.t_from, s.t_to, s.adapters, "checkpoint") for s in plan]
    out_c, gx_c, g_c = _grads(b, ckpt, x)
    torch.testing.assert_close(out_c, out_f)
    torch.testing.assert_close(gx_c, gx_f, atol=1e-6, rtol=1e-5)
    for k in g_f:
        torch.testing.assert_close(g_c[k], g_f[k], atol=1e-6, rtol=1e-5)


def test_stacked_adapters_add_up(tiny):
    b = _lora_backend(tiny)
    x, t = torch.randn(1, 4, 8, 8), 501
    cond = b.encode_prompts(["x"])
    with torch.no_grad():
        base, ea, eb, eab = (b.model_output(x, t, cond, a) for a in [(), ("a",), ("b",), ("a", "b")])
    assert not torch.allclose(ea, base) and not torch.allclose(eab, ea)
    # the active set is exactly what was asked for, and switching never makes anything trainable
    lora.activate(b.net, ("b",))
    assert lora.active(b.net) == ["b"]
    lora.set_trainable(b.net, ["a"])
    lora.activate(b.net, ("a", "b"))
    assert not any(p.requires_grad for p in lora.adapter_parameters(b.net, "b"))


def test_each_call_runs_exactly_the_adapters_its_step_names(tiny):
    """Over a ShortFT-shaped plan (repeated, stacked, shortcut and base steps), the adapters active inside
    every UNet call are the step's, also after something else switched them behind the engine's back."""
    b = _lora_backend(tiny)
    seen = []
    hook = b.net.register_forward_pre_hook(lambda module, args: seen.append(tuple(lora.active(module))))
    plan = [Step(981, 761, ("a",), "none", 3.0), Step(761, 741, ("a",), "full", 3.0), Step(741, 501, ("b",), "full"),
            Step(501, 481, ("a", "b"), "checkpoint", 3.0), Step(481, 261, (), "none"), Step(261, END, ("a", "b"), "full")]
    x = torch.randn(1, 4, 8, 8)
    cond, uncond = b.encode_prompts(["a red circle"]), b.encode_prompts([""])
    run_plan(b, plan, x, cond, uncond).square().sum().backward()  # checkpoint recomputes its call in backward
    hook.remove()
    assert seen == [s.adapters for s in plan] + [("a", "b")]
    for layer in lora.lora_layers(b.net)[1:]:  # someone else leaves the layers in another state ...
        layer._active_adapter = ["b"]
    lora.lora_layers(b.net)[0]._active_adapter = ["a"]
    lora.activate(b.net, ("b",))  # ... and the engine's switch still sets every layer
    assert {tuple(layer.active_adapters) for layer in lora.lora_layers(b.net)} == {("b",)}

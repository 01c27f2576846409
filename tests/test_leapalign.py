"""LeapAlign: its plan (the no-grad chain, then two leaps), the reward of the real image with the gradient of
the leap path, the discount of the nested term, the consistency weight, and training on both families."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from conftest import train_overrides
from shortft import lora
from shortft.backends import load_backend
from shortft.chain import END, Plan, run_plan
from shortft.config import TrainConfig, build_config
from shortft.errors import ConfigError
from shortft.methods import METHODS, Rollout
from shortft.methods.leapalign import consistency_weight
from shortft.rewards.symmetry import symmetry_reward
from shortft.train import build_model, train
from test_methods import SD15_50, method


def test_plan_is_the_no_grad_chain_then_two_leaps_drawn_once():
    m = method("leapalign")
    chain = m.sample_plan().steps
    pairs = []
    for seed in range(300):
        plan = m.plan(0.0, random.Random(seed))
        k, j = plan.info["leap_k"], plan.info["leap_j"]
        assert 0 <= k < j <= 49
        assert plan.steps[:50] == chain and {s.grad for s in chain} == {"none"}
        assert len(plan.steps) == 52 and plan.graph_calls == 2
        first, second = plan.steps[50:]
        assert (first.t_from, first.t_to, first.grad, first.input_grad) == (SD15_50[k], SD15_50[j], "full", 1.0)
        assert (second.t_from, second.t_to, second.grad, second.input_grad) == (SD15_50[j], END, "full", 0.3)
        assert first.adapters == second.adapters == ("lora",) and first.guidance == second.guidance == 5.0
        assert m.plan(0.0, random.Random(seed)).info == plan.info  # one draw per rollout, from its rng
        pairs.append((k, j))
    ks, js = [k for k, _ in pairs], [j for _, j in pairs]
    assert min(ks) == 0 and max(js) == 49 and len(set(pairs)) > 200  # any pair of the 50 steps
    assert 14 < sum(ks) / 300 < 19 and 31 < sum(js) / 300 < 36  # a uniform pair: E[k] = 49/3, E[j] = 98/3
    late = [method("leapalign", leap_range=0.5).plan(0.0, random.Random(s)).info for s in range(100)]
    assert min(i["leap_k"] for i in late) == 25  # the ablation's [0, 1/2]: the chain's last 25 steps


@pytest.mark.parametrize("bad", [dict(leap_range=0.0), dict(leap_range=1.5), dict(leap_range=0.01),
                                 dict(leap_discount=-0.1), dict(leap_discount=1.2), dict(leap_tau=0.0)])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="leap_"):
        METHODS["leapalign"].check(TrainConfig(method="leapalign", **bad))


def test_the_consistency_weight_on_constructed_latents():
    x = torch.randn(3, 4, 2, 2)
    signs = torch.tensor([1.0, -1.0]).repeat(8).view(1, 4, 2, 2)  # |.| is the same everywhere
    leap_j = x + torch.tensor([0.3, 0.5, 0.0]).view(3, 1, 1, 1) * signs
    leap_0 = x + torch.tensor([0.05, 0.25, 0.01]).view(3, 1, 1, 1) * signs
    w = consistency_weight(leap_j.requires_grad_(), x, leap_0.requires_grad_(), x, tau=0.1)
    # 1 / (max(d_j, 0.1) + max(d_0, 0.1)): d_0 = 0.05 and 0.01 are floored, d = 0 on the real path itself
    torch.testing.assert_close(w, torch.tensor([1 / 0.4, 1 / 0.75, 1 / 0.2], dtype=torch.float64))
    assert not w.requires_grad
    assert consistency_weight(x, x, x, x, tau=0.5).tolist() == [1.0, 1.0, 1.0]


def _setup(tiny, dtype=torch.float32, **kw):
    """The tiny model of a family with LoRA weights on the gradient path, a rollout of two prompts, the method."""
    cfg = TrainConfig(method="leapalign", model=tiny["model"], num_steps=8, lora_rank=4, lora_alpha=4.0,
                      guidance=3.0, **kw)
    b = load_backend(tiny["model"], dtype=dtype)
    m = METHODS["leapalign"](cfg)
    m.setup(b)
    g = torch.Generator().manual_seed(0)
    for p in lora.adapter_parameters(b.net, "lora"):
        p.data = torch.randn(p.shape, generator=g, dtype=dtype) * 0.05
    params = lora.set_trainable(b.net, ["lora"])
    prompts = ["a red circle", "a blue square"]
    ro = Rollout(b, prompts, b.encode_prompts(prompts), b.encode_prompts(["", ""]),
                 torch.randn(b.latent_shape(2), generator=g, dtype=dtype), symmetry_reward, g)
    return m, ro, params


def test_the_reward_is_the_real_images_and_the_loss_weighs_it(tiny_any):
    m, ro, params = _setup(tiny_any, leap_tau=1e-4)  # a small floor: the tiny model's leaps land close
    plan = Plan(m.plan(0.0, random.Random(3)).steps, {"leap_k": 2, "leap_j": 5})
    loss, rewards, extra = m.loss(ro, plan)
    loss.backward()
    b, args = ro.backend, (ro.cond, ro.uncond)
    with torch.no_grad():
        x_k = run_plan(b, m.sample_plan().steps[:2], ro.x_T, *args)
        x_j = run_plan(b, m.sample_plan().steps[2:5], x_k, *args)
        x_0 = run_plan(b, m.sample_plan().steps[5:], x_j, *args)
        assert torch.equal(x_0, run_plan(b, m.sample_plan(), ro.x_T, *args))
        leap_j = run_plan(b, plan.steps[-2:-1], x_k, *args)
        leap_0 = run_plan(b, plan.steps[-1:], x_j, *args)
        real, leaped = ro.reward(b.decode(x_0), ro.prompts), ro.reward(b.decode(leap_0), ro.prompts)
    assert torch.equal(rewards, real) and not torch.allclose(real, leaped, atol=1e-6)  # the real image's reward
    w = consistency_weight(leap_j, x_j, leap_0, x_0, 1e-4)
    assert w.max() < 1e3 and w[0] != w[1]  # far from the floor's 1 / (2 τ) = 5000: the distances decide
    torch.testing.assert_close(loss.detach(), -(w.float() * real).mean())
    assert extra["leap_weight"] == pytest.approx(float(w.mean()))
    assert sum(p.grad is not None and p.grad.abs().sum() > 0 for p in params) > len(params) // 2
    assert not [n for n, p in b.net.named_parameters() if ".lora_" not in n and p.grad is not None]  # LoRA only


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_the_discount_scales_the_nested_term(tiny, tiny_sd3, family):
    """On a float64 model: discount 0 is the gradient with the second leap's model input detached, 1 the full
    one through both leaps, and any α the mix (1 - α) cut + α full: only the nested term is scaled."""
    m, ro, params = _setup(tiny if family == "sd" else tiny_sd3, torch.float64)
    plan = m.plan(0.0, random.Random(1))

    def gradient(**second) -> torch.Tensor:
        steps = plan.steps[:-1] + [dataclasses.replace(plan.steps[-1], **second)]
        for p in params:
            p.grad = None
        m.loss(ro, Plan(steps, plan.info))[0].backward()
        return torch.cat([p.grad.flatten() for p in params])

    cut, whole = gradient(grad="detach_input", input_grad=1.0), gradient(input_grad=1.0)
    assert (cut - whole).norm() > 1e-2 * whole.norm()  # the nested term is there to scale
    assert torch.equal(gradient(input_grad=0.0), cut)
    for alpha in (0.3, 0.7):  # the reward runs in float32: agreement to its precision, 10^4 below the term
        assert (gradient(input_grad=alpha) - ((1 - alpha) * cut + alpha * whole)).norm() < 1e-6 * whole.norm()


def test_two_training_steps_move_the_lora_only(tiny_any, tmp_path):
    """`shortft train --method leapalign` for 2 steps: every LoRA parameter moved, every other weight did not;
    each iteration made the chain's calls plus the two leaps."""
    cfg = build_config("world", overrides=train_overrides(tiny_any, tmp_path / "run", method="leapalign"))
    torch.manual_seed(cfg.seed)
    before = {n: p.detach().clone() for n, p in build_model(cfg, "cpu")[0].net.named_parameters()}
    run = train(cfg)
    now = dict(run.backend.net.named_parameters())
    assert now.keys() == before.keys() and any(".lora." in n for n in now)
    for name, p in now.items():
        assert torch.equal(p, before[name]) != (".lora." in name), name
    history = json.loads((run.dir / "history.json").read_text())
    assert [(h["unet_calls"], h["graph_calls"]) for h in history] == [(12, 2), (24, 2)]  # 10 steps + 2 leaps

"""Plans of every method: which steps run, with which weights, and where the gradient flows."""

from __future__ import annotations

import random

import pytest
import torch

from shortft import lora
from shortft.chain import END, X0
from shortft.config import TrainConfig
from shortft.methods import METHODS, Rollout
from shortft.methods.shortft import SHORTCUT, segment_bounds

SD15_50 = list(range(981, 0, -20))  # 50-step DDIM, leading spacing, steps_offset 1


def method(name, **kw):
    m = METHODS[name](TrainConfig(method=name, **kw))
    m.use_timesteps(SD15_50)
    return m


def test_segments_derived_from_schedule():
    assert segment_bounds(50, 4) == [0, 12, 25, 37, 50]
    m = method("shortft")
    lora_ts = [SD15_50[m.bounds[j] - 1] for j in range(1, 5)]
    assert lora_ts == [761, 501, 261, 1]  # the paper's LoRA timesteps


def test_shortft_stage1_structure():
    m = method("shortft", s1_grad_steps=2)
    plan = m.plan(0.0, random.Random(0))
    steps = plan.steps
    assert len(steps) == 18 and plan.info["stage"] == 1
    assert [s.t_from for s in steps[:12]] == list(range(981, 760, -20))
    assert all(s.adapters == ("lora1",) for s in steps[:12])
    tail = [(s.t_from, s.t_to, s.adapters) for s in steps[12:]]
    assert tail == [(741, 501, (SHORTCUT,)), (501, 481, ("lora1", "lora2")),
                    (481, 261, (SHORTCUT,)), (261, 241, ("lora1", "lora2", "lora3")),
                    (241, 1, (SHORTCUT,)), (1, END, ("lora1", "lora2", "lora3", "lora4"))]
    assert [s.grad for s in steps] == ["none"] * 10 + ["full"] * 8
    assert all(s.guidance == 1.0 for s in steps if s.adapters == (SHORTCUT,))  # conditional-only shortcut
    assert plan.graph_calls == 8


@pytest.mark.parametrize("s1", [1, 2, 5])
def test_shortft_truncation_length(s1):
    plan = method("shortft", s1_grad_steps=s1).plan(0.0, random.Random(0))
    assert plan.graph_calls == s1 + 6
    assert [s.grad for s in plan.steps[:12]] == ["none"] * (12 - s1) + ["full"] * s1


def test_shortft_progressive_stages():
    m = method("shortft")
    for stage, progress in [(1, 0.0), (2, 0.3), (3, 0.5), (4, 0.99)]:
        plan = m.plan(progress, random.Random(0))
        assert plan.info["stage"] == stage
        assert m.trainable(progress) == [f"lora{i}" for i in range(stage, 5)]
        if stage > 1:
            assert plan.graph_calls == 1 + 2 * (4 - stage)
            first = next(s for s in plan.steps if s.grad != "none")
            assert first.adapters == tuple(f"lora{i}" for i in range(1, stage + 1))
            assert first.t_from == [761, 501, 261, 1][stage - 1]
            # segments 1..stage run the original chain: no shortcut before the graph starts
            assert SHORTCUT not in [a for s in plan.steps if s.t_from >= first.t_from for a in s.adapters]
    assert method("shortft", progressive=False).plan(0.99, random.Random(0)).info["stage"] == 1


def test_shortft_inference_weights():
    m = method("shortft")
    plan = m.sample_plan()
    by_t = {s.t_from: s.adapters for s in plan.steps}
    assert len(plan.steps) == 50 and all(s.grad == "none" for s in plan.steps)
    assert SHORTCUT not in {a for s in plan.steps for a in s.adapters}  # no shortcuts at inference
    assert by_t[981] == by_t[761] == ("lora1",)
    assert by_t[741] == () and by_t[521] == ()  # inner steps of segment 2: base by default
    assert by_t[501] == ("lora1", "lora2") and by_t[1] == ("lora1", "lora2", "lora3", "lora4")
    assert method("shortft", inner_weights="prev").sample_plan().steps[12].adapters == ("lora1",)
    assert method("shortft", inner_weights="stack").sample_plan().steps[12].adapters == ("lora1", "lora2")
    flat = method("shortft", tlora=False)
    assert {s.adapters for s in flat.sample_plan().steps} == {("lora1",)}
    assert flat.adapter_names() == ["lora1"]
    assert {s.adapters for s in flat.plan(0.0, random.Random(0)).steps} == {("lora1",), (SHORTCUT,)}


def test_draft_k_and_lv():
    plan = method("draft", draft_k=3).plan(0.0, random.Random(0))
    assert [s.grad for s in plan.steps] == ["none"] * 47 + ["full"] * 3
    assert plan.steps[-1].t_to == END
    lv = method("draft-lv").plan(0.0, random.Random(0))
    assert lv.graph_calls == 1 and lv.steps[-1].grad == "full"


def test_alignprop_cut_once_per_rollout():
    m = method("alignprop")
    cuts = []
    for seed in range(200):
        plan = m.plan(0.0, random.Random(seed))
        cut = plan.info["cut"]
        assert [s.grad for s in plan.steps] == ["none"] * cut + ["checkpoint"] * (50 - cut)
        cuts.append(cut)
    assert 40 <= sum(cuts) / len(cuts) <= 44 and min(cuts) >= 25  # gaussian(42, 5)
    assert method("alignprop", alignprop_cut="fixed").plan(0.0, random.Random(0)).info["cut"] == 49


def test_drtune_plan():
    m = method("drtune", drtune_k=5, drtune_m=10)
    for seed in range(50):
        plan = m.plan(0.0, random.Random(seed))
        stop = plan.info["early_stop"]
        assert 40 <= stop <= 49 and len(plan.steps) == stop + 1
        assert plan.steps[-1].t_to is X0  # reward on x̂0
        trained = [i for i, s in enumerate(plan.steps) if s.grad != "none"]
        assert all(plan.steps[i].grad == "detach_input" for i in trained) and len(trained) == 5
        gaps = {b - a for a, b in zip(trained, trained[1:])}
        assert len(gaps) == 1  # equally spaced


def test_refl_plan():
    for seed in range(30):
        plan = method("refl", refl_window=10).plan(0.0, random.Random(seed))
        assert plan.graph_calls == 1 and plan.steps[-1].grad == "full" and plan.steps[-1].t_to is X0
        assert 40 <= len(plan.steps) - 1 <= 49


def test_full_plan():
    plan = method("full").plan(0.0, random.Random(0))
    assert plan.graph_calls == 50 and {s.grad for s in plan.steps} == {"checkpoint"}


def _rollout_grads(tiny, name, progress=0.0, **kw):
    """One rollout + backward on the tiny model; which adapters received gradient."""
    from shortft.backends import load_backend
    from shortft.rewards.symmetry import symmetry_reward

    cfg = TrainConfig(method=name, model=tiny["model"], num_steps=10, lora_rank=4, lora_alpha=4.0,
                      **{"shortcut": tiny["shortcut"], **kw})
    b = load_backend(tiny["model"])
    m = METHODS[name](cfg)
    m.setup(b)
    for n in m.adapter_names():  # non-zero B so every adapter is on the gradient path
        for p in lora.adapter_parameters(b.net, n):
            p.data.normal_(0, 0.05)
    lora.set_trainable(b.net, m.trainable(progress))
    prompts = ["a red circle", "a blue square"]
    g = torch.Generator().manual_seed(0)
    ro = Rollout(b, prompts, b.encode_prompts(prompts), b.encode_prompts(["", ""]),
                 torch.randn(b.latent_shape(2), generator=g), symmetry_reward, g)
    loss, rewards, _ = m.loss(ro, m.plan(progress, random.Random(0)))
    loss.backward()
    got = {n: any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.adapter_parameters(b.net, n))
           for n in lora.adapter_names(b.net)}
    base_grads = [p for n, p in b.net.named_parameters() if ".lora_" not in n and p.grad is not None]
    assert not base_grads and rewards.shape == (2,)
    return got


@pytest.mark.parametrize("name", ["draft", "draft-lv", "alignprop", "drtune", "refl", "full", "leapalign"])
def test_single_lora_methods_send_gradient_to_lora(tiny_any, name):
    """On both families (the tiny SD 1.5- and SD 3-format models): only the method's LoRA gets gradient."""
    kw = {"drtune_k": 2, "drtune_m": 3, "refl_window": 3} if name in ("drtune", "refl") else {}
    assert _rollout_grads(tiny_any, name, **kw) == {"lora": True}


def test_shortft_gradients_by_stage(tiny_any):
    s1 = _rollout_grads(tiny_any, "shortft")
    assert s1 == {SHORTCUT: False, "lora1": True, "lora2": True, "lora3": True, "lora4": True}
    s3 = _rollout_grads(tiny_any, "shortft", progress=0.6)
    assert s3 == {SHORTCUT: False, "lora1": False, "lora2": False, "lora3": True, "lora4": True}


def test_shortcut_ft_trains_its_lora_on_top_of_the_frozen_shortcut(tiny_any):
    assert _rollout_grads(tiny_any, "shortcut-ft", segments=2) == {SHORTCUT: False, "lora": True}


def test_shortft_segments_on_a_flow_grid():
    """SD 3's default 28-step grid in 4 segments: 7 steps each; LoRA times at the segments' last steps."""
    sd3_28 = [1000.0 * (1 - i / 28) for i in range(28)]  # any decreasing grid: plans only index into it
    m = METHODS["shortft"](TrainConfig(method="shortft", num_steps=28))
    m.use_timesteps(sd3_28)
    plan = m.plan(0.0, random.Random(0))
    assert m.bounds == [0, 7, 14, 21, 28] and len(plan.steps) == 7 + 3 * 2
    jumps = [(s.t_from, s.t_to) for s in plan.steps if s.adapters == (SHORTCUT,)]
    assert jumps == [(sd3_28[7], sd3_28[13]), (sd3_28[14], sd3_28[20]), (sd3_28[21], sd3_28[27])]


def test_shortft_without_a_shortcut_jumps_with_the_base_models_own_step(tiny):
    """shortcut="none": the same plan, each jump the base model's one step at the chain's CFG (the naive
    jump), with gradient through its input; no shortcut adapter is loaded."""
    m = method("shortft", shortcut="none", guidance=5.0)
    jumps = [s for s in m.plan(0.0, random.Random(0)).steps if s.t_to not in (END,) and s.t_from - s.t_to > 20]
    assert [(s.t_from, s.t_to, s.adapters, s.guidance, s.grad) for s in jumps] == [
        (741, 501, (), 5.0, "full"), (481, 261, (), 5.0, "full"), (241, 1, (), 5.0, "full")]
    assert _rollout_grads(tiny, "shortft", shortcut="none") == {"lora1": True, "lora2": True, "lora3": True,
                                                                 "lora4": True}

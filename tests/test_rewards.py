"""Registry, weight-free rewards (symmetry, JPEG compressibility) and input errors."""

from __future__ import annotations

import pytest
import torch

from shortft.rewards import (
    REWARDS,
    RewardSettings,
    WeightedSum,
    build_regularised_reward,
    build_reward,
    check_inputs,
    parse_reward_spec,
    validate_reward_spec,
)
from shortft.rewards.jpeg import jpeg_size_kb, jpeg_size_surrogate, procedural_images, spearman
from shortft.rewards.symmetry import asymmetry

BUILTIN = {"hpsv2", "hpsv2.1", "pickscore", "world_clip", "aesthetic", "symmetry", "compressibility",
           "incompressibility"}


def test_every_builtin_is_registered():
    validate_reward_spec("symmetry")  # imports the built-in modules
    assert BUILTIN <= set(REWARDS)
    with pytest.raises(ValueError, match="unknown reward 'hps'"):
        validate_reward_spec("hps=1")


def test_jpeg_surrogate_ranks_like_real_jpeg_size():
    """Spearman >= 0.9 between the differentiable estimate and PIL's q95 size on 240 varied images."""
    x = procedural_images(240, 64, seed=0)
    real, est = jpeg_size_kb(x), jpeg_size_surrogate(x)
    rho = spearman(est, real)
    print(f"\nJPEG q95 surrogate vs real size, 240 images 64x64: Spearman {rho:.3f}")
    assert rho >= 0.9
    assert 0.5 < float(est.mean() / real.mean()) < 2  # reads in kB, roughly


def test_compressibility_gradient_and_sign():
    x = procedural_images(4, 32, seed=1).requires_grad_(True)
    comp = build_reward("compressibility")(x, ["p"] * 4)
    inc = build_reward("incompressibility")(x, ["p"] * 4)
    torch.testing.assert_close(comp, -inc)
    comp.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    flat, noise = torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert build_reward("compressibility")(flat, ["p"]) > build_reward("compressibility")(noise, ["p"])


def test_symmetry_metric():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sym = (x + x.flip(-1)) / 2
    assert asymmetry(sym).abs().max() < 1e-6
    assert (asymmetry(x) > 0.5).all()
    torch.testing.assert_close(build_reward("symmetry")(x, ["a", "b"]), -asymmetry(x))


def test_weighted_sum_builds_each_component_once(monkeypatch):
    calls = []

    def factory(settings):
        calls.append(1)
        return lambda images, prompts: images.mean(dim=(1, 2, 3))

    monkeypatch.setitem(REWARDS, "counting", factory)
    r = build_reward("counting=2,symmetry=0.5,counting=1", RewardSettings())
    assert isinstance(r, WeightedSum) and len(calls) == 1
    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(r(x, ["a"] * 3), 3 * x.mean(dim=(1, 2, 3)) - 0.5 * asymmetry(x))
    assert parse_reward_spec("pickscore=10,hpsv2=2,aesthetic=0.05") == [
        ("pickscore", 10.0), ("hpsv2", 2.0), ("aesthetic", 0.05)]


def test_regulariser_adds_the_mix_and_zero_is_identity(monkeypatch):
    monkeypatch.setitem(REWARDS, "hpsv2", lambda s: lambda im, p: im.mean(dim=(1, 2, 3)))
    monkeypatch.setitem(REWARDS, "pickscore", lambda s: lambda im, p: im.amax(dim=(1, 2, 3)))
    x = torch.rand(2, 3, 8, 8)
    main = build_reward("symmetry")
    assert build_regularised_reward(main, 0.0) is main
    reg = build_regularised_reward("symmetry", 0.1)
    expect = -asymmetry(x) + 0.1 * (x.mean(dim=(1, 2, 3)) + 10 * x.amax(dim=(1, 2, 3)))
    torch.testing.assert_close(reg(x, ["a", "b"]), expect)


def test_plugin_reward():
    r = build_reward("shortft.rewards.symmetry:symmetry_reward")
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(r(x, ["a"]), -asymmetry(x))
    with pytest.raises(ValueError, match="has no attribute"):
        build_reward("shortft.rewards.symmetry:nope")


@pytest.mark.parametrize("images,prompts,match", [
    (torch.rand(2, 3, 8, 8) * 2, ["a", "b"], r"lie in \[0, 1\]"),
    (torch.rand(2, 3, 8, 8) - 0.5, ["a", "b"], r"lie in \[0, 1\]"),
    (torch.rand(2, 8, 8), ["a", "b"], "shape"),
    (torch.rand(2, 1, 8, 8), ["a", "b"], "shape"),
    (torch.rand(2, 3, 8, 8), ["a"], "2 images but 1 prompts"),
])
def test_bad_inputs_raise(images, prompts, match):
    with pytest.raises(ValueError, match=match):
        check_inputs(images, prompts)
    for name in ("symmetry", "compressibility"):
        with pytest.raises(ValueError, match=match):
            build_reward(name)(images, prompts)


def test_nan_images_raise():
    x = torch.rand(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_inputs(x, ["a"])


def test_unreachable_hub_names_what_to_download(monkeypatch, tmp_path):
    from shortft import hub
    from shortft.rewards import RewardWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    hub.hub_reachable.cache_clear()
    try:
        with pytest.raises(RewardWeightsError, match=r"HPS_v2_compressed.pt.*--reward-paths hpsv2="):
            build_reward("hpsv2")
        with pytest.raises(RewardWeightsError, match=r"PickScore_v1.*--reward-paths pickscore="):
            build_reward("pickscore")
    finally:
        hub.hub_reachable.cache_clear()


def test_ascending_compressibility_shrinks_the_real_jpeg():
    """The surrogate is a training signal for the real metric: 40 Adam steps on the pixels (through a
    sigmoid) ascend `compressibility` and the real q95 files shrink; `incompressibility` grows them."""
    x0 = procedural_images(10, 64, seed=5).clamp(0.01, 0.99)
    real0 = jpeg_size_kb(x0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 80 tiny steps: thread start-up would dominate
    try:
        _ascend_jpeg(x0, real0)
    finally:
        torch.set_num_threads(threads)


def _ascend_jpeg(x0, real0):
    for name, sign in (("compressibility", -1), ("incompressibility", 1)):
        reward = build_reward(name)
        logit = torch.logit(x0).clone().requires_grad_(True)
        opt = torch.optim.Adam([logit], lr=0.003)
        for _ in range(40):
            loss = -reward(torch.sigmoid(logit), ["p"] * 10).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        real = jpeg_size_kb(torch.sigmoid(logit).detach())
        assert sign * (real.mean() - real0.mean()) > 0.01 * real0.mean(), (name, real.mean(), real0.mean())
        assert (sign * (real - real0) > 0).float().mean() >= 0.8


def test_bench_one_reports_cost():
    from shortft.rewards.bench import bench_one, format_table

    row = bench_one("compressibility", batch=1, size=64, repeats=1, device="cpu")
    assert row["weights"] == "none needed" and row["fwd_bwd_s"] > 0 and row["peak_rss_GB"] > 0
    assert "| compressibility | none needed |" in format_table([row])

"""`shortft bench` on the tiny model with tiny budgets: every method trains a step or two, every table column
and figure is produced, the equal-budget accounting is right, and the overhead baseline computes the same
chain as the engine. The workers are called in-process here (the CLI runs each in a fresh subprocess)."""

from __future__ import annotations

import argparse
import random

import pytest
import torch

from shortft.bench import ModelSpec, chain_scaled, compare, efficiency

NUM_STEPS = 6  # a short chain: every method still has all its parts (ShortFT: 4 segments)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the bench workers use: on a shared 2-core machine two threads stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def common(tiny):
    return {"model": tiny["model"], "shortcut": tiny["shortcut"], "prompts": tiny["prompts"],
            "eval_prompts": tiny["prompts"], "batch_size": 1, "reward": "symmetry", "num_steps": NUM_STEPS,
            "lora_rank": 2, "lora_alpha": 2.0, **chain_scaled(NUM_STEPS)}


@pytest.fixture(scope="module")
def compare_results(common, tmp_path_factory):
    """Every variant at an equal UNet-call budget, one at a tiny time budget, and the base row."""
    root = tmp_path_factory.mktemp("bench")
    budget = NUM_STEPS + 1  # one or two iterations of every method
    runs = [{"variant": b, "reward": "-", "seed": 0, "kind": "-", "budget": 0} for b in ("base", "base-shortcut")]
    runs += [{"variant": v, "reward": "symmetry", "seed": 0, "kind": "calls", "budget": budget,
              "run_dir": str(root / f"{v}-calls")} for v in compare.VARIANTS]
    runs += [{"variant": "shortft", "reward": "symmetry", "seed": 0, "kind": "time", "budget": 0.01,
              "run_dir": str(root / "shortft-time")}]
    results = compare.worker_group({"common": common, "runs": runs, "rewards": ["symmetry"], "eval_n": 1,
                                    "threads": 1, "preset": "world"})
    return results, budget, root


def test_every_method_trains_within_one_iteration_of_the_call_budget(compare_results):
    results, budget, _ = compare_results
    trained = [r for r in results if r["kind"] == "calls"]
    assert {r["variant"] for r in trained} == set(compare.VARIANTS)
    for r in trained:
        h = r["history"]
        assert 1 <= len(h) <= 3, r["variant"]
        last_iter = h[-1]["unet_calls"] - (h[-2]["unet_calls"] if len(h) > 1 else 0)
        # the run stops at the first step that starts at or over the budget
        assert h[-1]["unet_calls"] >= budget, r["variant"]
        assert h[-1]["unet_calls"] - last_iter < budget, r["variant"]


def test_time_budget_stops_after_the_step_that_crosses_it(compare_results):
    results, _, _ = compare_results
    (r,) = [r for r in results if r["kind"] == "time"]
    seconds = [h["seconds"] for h in r["history"]]
    assert sum(seconds) >= 0.01 and sum(seconds) - seconds[-1] < 0.01
    assert len(seconds) == 1


def test_held_out_metrics_of_every_run(compare_results):
    results, _, _ = compare_results
    for r in results:
        m = r["metrics"]
        assert set(m) == {"reward:symmetry", "asymmetry", "jpeg_kb"}
        assert m["reward:symmetry"] == pytest.approx(-m["asymmetry"])
        assert m["jpeg_kb"] > 0
    base, base_sc = ([r["metrics"] for r in results if r["variant"] == b] for b in ("base", "base-shortcut"))
    assert base[0]["asymmetry"] != base_sc[0]["asymmetry"]  # the shortcut row samples another chain


def test_report_has_every_column_and_figure(compare_results, tiny, tmp_path):
    results, budget, root = compare_results
    s = dict(compare.PRESETS["quick"], variants=list(compare.VARIANTS), seeds=1, time_budget=0.01,
             call_budget=budget, budgets=["calls", "time"], rewards=["symmetry"], eval_n=1)
    figs = compare.plots(results, ["symmetry"], s, tmp_path / "figures")
    assert len(figs) == 2 and all(p.is_file() and p.stat().st_size > 1000 for p in figs.values())
    spec = ModelSpec(tiny["model"], tiny["shortcut"], tiny["prompts"], tiny["prompts"], "tiny")
    args = argparse.Namespace(threads=1, workdir=str(root))
    text = compare.report(results, ["symmetry"], {"world_clip": "not registered"}, s, spec, {}, args,
                          "shortft bench compare --test", figs, tmp_path, 1.0)
    for column in ("held-out symmetry ↑", "asymmetry ↓", "JPEG kB", "steps", "s/it", "UNet calls",
                   "graph calls/it", "train s", "seeds"):
        assert column in text
    for heading in ("Table 1 shape", "Table 3 shape", "Table 2 shape", "## Figures", "## What comes out"):
        assert heading in text
    assert "`world_clip` (not registered)" in text  # missing rewards are named
    assert "base (no fine-tuning)" in text
    assert "| shortcut model, its few-step chain |" in text and "| base, 50-step chain |" in text
    for v in compare.VARIANTS:
        assert f"| {v} |" in text
    assert "shortft vs draft-lv: higher is" in text


def test_plan_interleaves_variants_and_rotates_their_order(tmp_path):
    assert [r["variant"] for r in compare.plan_runs(["shortcut-ft"], ["r1"], 1, ["time"], 4.0, 100, [], tmp_path)[0]] \
        == ["base", "base-shortcut", "shortcut-ft"]  # shortcut-ft's own starting point is scored too
    groups = compare.plan_runs(["a", "b", "c"], ["r1", "r2"], 2, ["time", "calls"], 4.0, 100, [0.5], tmp_path)
    assert len(groups) == 2 and groups[0][0]["variant"] == "base"
    first = [r["variant"] for r in groups[0][1:4]]
    second = [r["variant"] for r in groups[1][:3]]
    assert first == ["a", "b", "c"] and second == ["b", "c", "a"]
    curve = [r for r in groups[1] if r["kind"] == "time" and r["budget"] == 2.0]
    assert {r["reward"] for r in curve} == {"r1"} and len(curve) == 3  # the curve only for the first reward
    assert len({r["run_dir"] for g in groups for r in g if "run_dir" in r}) == sum(len(g) for g in groups) - 1


def test_settings_reject_unknown_variants_and_budgets():
    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers())
    args = parser.parse_args(["compare", "--quick", "--variants", "shortft,nope"])
    with pytest.raises(ValueError, match="nope"):
        compare.settings(args)
    args = parser.parse_args(["compare", "--budgets", "time,flops"])
    with pytest.raises(ValueError, match="flops"):
        compare.settings(args)


def test_raw_chain_computes_the_same_chain_as_the_engine(common):
    """The overhead baseline must make the same calls with the same result, or the comparison is void."""
    from shortft.chain import run_plan

    for name in ("shortft", "full", "drtune"):
        ctx = efficiency.build_context({**common, "method": name, "guidance": 3.0})
        for p in ctx["params"]:  # non-zero LoRAs, so adapter switching matters
            p.data.normal_(0, 0.05)
        ro, rng = efficiency.rollout(ctx, 0)
        steps = ctx["method"].plan(0.0, random.Random(0)).steps
        with torch.no_grad():
            a = run_plan(ctx["backend"], steps, ro.x_T, ro.cond, ro.uncond)
            b = efficiency.raw_chain(ctx["backend"], steps, ro.x_T, ro.cond, ro.uncond)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_efficiency_row_and_report(common, tiny):
    spec = {"overrides": {**common, "method": "shortft"}, "preset": "world", "progress": 0.0, "threads": 1,
            "warmup": 1, "iters": 1, "overhead_reps": 1}
    row = efficiency.worker_method(spec)
    # 6 steps in 4 segments: S1 = 1 step, then [jump, step], [step], [jump, step]; all in the graph
    assert row["unet_calls"] == 6 and row["graph_calls"] == 6
    assert row["peak"]["rss_mb"] >= row["loaded"]["rss_mb"] > 0
    assert row["seconds_median"] > 0 and row["engine_s"] > 0 and row["raw_s"] > 0
    ratio = {"median": {"short_raw": 1.0, "full_raw": 4.0, "short_engine": 1.05, "full_engine": 4.2},
             "short_calls": 18, "short_graph": 8, "full_calls": 50, "full_graph": 50}
    grads = {"full@10": [1.0, 2.0], "shortft@10": [0.5], "draft-lv@10": [0.1]}
    args = argparse.Namespace(threads=1, steps=NUM_STEPS, batch=1, reward="symmetry", warmup=1, iters=1, reps=1,
                              grad_rollouts=2)
    spec_m = ModelSpec(tiny["model"], tiny["shortcut"], tiny["prompts"], tiny["prompts"], "tiny")
    text = efficiency.report(spec_m, args, {"shortft (stage 1)": row}, ratio, grads, [10], "shortft bench efficiency")
    for column in ("UNet calls / it", "in graph", "s / it", "peak RSS MB", "grad norm median", "overhead",
                   "ShortFT / full", "full backprop"):
        assert column in text
    assert "| raw UNet calls | 1.000 | 4.000 | 0.250 |" in text

"""`shortft bench` on the tiny model with tiny budgets: every method trains a step or two, every table column
and figure is produced, the equal-budget accounting is right, an interrupted comparison continues to the same
table, and the hand-written baseline computes the same iteration as the engine. The workers are called
in-process here (the CLI runs each in a fresh subprocess)."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

from shortft import lora
from shortft.bench import ModelSpec, chain_scaled, compare, compare_report, efficiency, efficiency_report, prepare_model
from shortft.bench import overhead as overhead_bench
from shortft.bench.engine import build_context, train_iteration
from shortft.bench.hand import hand_iteration
from shortft.bench.plots import plots
from shortft.config import TrainConfig
from shortft.errors import ConfigError
from shortft.methods import METHODS

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
    """Every variant at an equal UNet-call budget, shortft at a tiny time budget, and the base rows."""
    root = tmp_path_factory.mktemp("bench")
    budget = NUM_STEPS + 1  # one or two iterations of every method
    (planned,) = compare.plan_runs(list(compare.VARIANTS), ["symmetry"], 1, ["calls", "time"], 0.01, budget, [], root)
    runs = [r for r in planned if r["kind"] != "time" or r["variant"] == "shortft"]
    results = compare.worker_group({"root": str(root), "common": common, "runs": runs, "rewards": ["symmetry"],
                                    "eval_n": 1, "threads": 1, "preset": "world"})
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
    results, _, root = compare_results
    for r in results:
        m = r["metrics"]
        assert set(m) == {"reward:symmetry", "asymmetry", "jpeg_kb"}
        assert m["reward:symmetry"] == pytest.approx(-m["asymmetry"])
        assert m["jpeg_kb"] > 0
        assert json.loads(compare.result_file(root, r).read_text()) == r  # written as soon as it finished
    base, base_sc = ([r["metrics"] for r in results if r["variant"] == b] for b in ("base", "base-shortcut"))
    assert base[0]["asymmetry"] != base_sc[0]["asymmetry"]  # the shortcut row samples another chain


def test_report_has_every_column_and_figure(compare_results, tiny, tmp_path):
    results, budget, root = compare_results
    s = dict(compare.PRESETS["quick"], variants=list(compare.VARIANTS), seeds=1, time_budget=0.01,
             call_budget=budget, budgets=["calls", "time"], rewards=["symmetry"], eval_n=1)
    figs = plots(results, ["symmetry"], s, tmp_path / "figures")
    assert len(figs) == 2 and all(p.is_file() and p.stat().st_size > 1000 for p in figs.values())
    spec = ModelSpec(tiny["model"], tiny["shortcut"], tiny["prompts"], tiny["prompts"], "tiny")
    args = argparse.Namespace(threads=1, workdir=str(root))
    text = compare_report.report(results, ["symmetry"], {"world_clip": "not registered"}, s, spec, {"num_steps": NUM_STEPS}, args,
                                 "shortft bench compare --test", figs, tmp_path)
    for column in ("held-out symmetry ↑", "asymmetry ↓", "JPEG kB", "steps", "s/it", "UNet calls",
                   "graph calls/it", "train s", "seeds"):
        assert column in text
    for heading in ("Table 1 shape", "Table 3 shape", "Table 2 shape", "## Figures", "## What comes out"):
        assert heading in text
    assert "`world_clip` (not registered)" in text  # missing rewards are named
    base = next(r for r in results if r["variant"] == "base")["metrics"]
    assert f"| base (no fine-tuning) | {base['reward:symmetry']:.3f} | {base['asymmetry']:.3f} |" in text
    assert "| shortcut model, its few-step chain |" in text and f"| base, {NUM_STEPS}-step chain |" in text
    for v in compare.VARIANTS:
        assert f"| {v} |" in text
    assert "shortft vs draft-lv: higher is" in text
    minutes = sum(r["wall_s"] for r in results) / 60
    assert f"the runs took {minutes:.1f} minutes" in text


def table_without_timings(results: list[dict], variants: list[str], budget: int) -> list[list[str]]:
    """The Table 1 cells of `variants` at a call budget, without the columns that time the runs."""
    base = next(r for r in results if r["variant"] == "base")
    lines = compare_report.table(results, variants, "symmetry", "calls", budget, ["symmetry"], False, [("base", base)])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    keep = [i for i, c in enumerate(rows[0]) if c not in ("s/it", "train s")]
    return [[row[i] for i in keep] for row in rows]


def test_interrupted_comparison_continues_to_the_same_table(compare_results, common, tmp_path, monkeypatch):
    """Killed after two runs, the same command continues with the third only, and gives the table of an
    uninterrupted comparison (the fixture's runs, made in one process in another order)."""
    reference, budget, _ = compare_results
    root, variants = tmp_path / "cmp", ["shortft", "draft-k"]
    s = dict(compare.PRESETS["quick"], variants=variants, seeds=1, budgets=["calls"], call_budget=budget, eval_n=1)
    in_process = lambda worker, spec, workdir: compare.worker_group(spec)  # noqa: E731
    started, real = [], compare.inference_chain

    def chain(run, *args, stop_after=None):
        if len(started) == stop_after:
            raise KeyboardInterrupt  # the machine went away
        started.append(run["key"])
        return real(run, *args)

    monkeypatch.setattr(compare, "inference_chain", lambda run, *a: chain(run, *a, stop_after=2))
    with pytest.raises(KeyboardInterrupt):
        compare.run_comparison(root, s, common, "world", ["symmetry"], 1, runner=in_process)
    assert started == ["base", f"shortft-symmetry-s0-calls{budget}"]
    finished = {p.name: p.read_text() for p in (root / "results").iterdir()}
    assert sorted(finished) == sorted(f"{k}.json" for k in started)
    left_over = root / "runs" / f"draft-k-symmetry-s0-calls{budget}" / "checkpoints" / "step-0000001"
    left_over.mkdir(parents=True)  # what a run killed mid-way leaves

    started.clear()
    monkeypatch.setattr(compare, "inference_chain", chain)
    results = compare.run_comparison(root, s, common, "world", ["symmetry"], 1, runner=in_process)
    assert started == [f"draft-k-symmetry-s0-calls{budget}"] and not left_over.exists()
    assert {name: (root / "results" / name).read_text() for name in finished} == finished  # not redone
    assert [r["key"] for r in results] == ["base", *(f"{v}-symmetry-s0-calls{budget}" for v in variants)]
    assert table_without_timings(results, variants, budget) == table_without_timings(reference, variants, budget)

    started.clear()  # the same command once more: nothing runs, the same results
    assert compare.run_comparison(root, s, common, "world", ["symmetry"], 1, runner=in_process) == results
    assert started == []
    with pytest.raises(ConfigError, match=r"differs in common\.lr, settings\.call_budget"):
        compare.run_comparison(root, {**s, "call_budget": budget + 1}, {**common, "lr": 1.0}, "world", ["symmetry"],
                               1, runner=in_process)


def test_plan_interleaves_variants_and_rotates_their_order(tmp_path):
    assert [r["variant"] for r in compare.plan_runs(["shortcut-ft"], ["r1"], 1, ["time"], 4.0, 100, [], tmp_path)[0]] \
        == ["base", "base-shortcut", "shortcut-ft"]  # shortcut-ft's own starting point is scored too
    groups = compare.plan_runs(["a", "b", "c"], ["r1", "r2"], 2, ["time", "calls"], 4.0, 100, [0.5], tmp_path)
    assert len(groups) == 4 and groups[0][0]["variant"] == "base"  # one group per (seed, reward)
    assert [{r["reward"] for r in g if r["variant"] != "base"} for g in groups] == [{"r1"}, {"r2"}] * 2
    first = [r["variant"] for r in groups[0][1:4]]
    second = [r["variant"] for r in groups[2][:3]]
    assert first == ["a", "b", "c"] and second == ["b", "c", "a"]
    timed = [r for g in groups for r in g if r["kind"] == "time"]
    assert {tuple(r["snapshots"]) for r in timed} == {(0.5,)} and len(timed) == 12  # every time run: its curve
    assert all(r["snapshots"] == [] for g in groups for r in g if r["kind"] == "calls")
    point, = compare.snapshot_runs(timed[0])
    assert point["key"] == timed[0]["key"] + "@0.5" and point["budget"] == 2.0 and point["snapshot"] == "0.5"
    assert len({r["run_dir"] for g in groups for r in g if "run_dir" in r}) == sum(len(g) for g in groups) - 1
    assert len({r["key"] for g in groups for r in g}) == sum(len(g) for g in groups)  # one result file each


def test_settings_reject_unknown_variants_and_budgets():
    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers())
    args = parser.parse_args(["compare", "--quick", "--variants", "shortft,nope"])
    with pytest.raises(ConfigError, match="nope"):
        compare.settings(args)
    args = parser.parse_args(["compare", "--budgets", "time,flops"])
    with pytest.raises(ConfigError, match="flops"):
        compare.settings(args)


def randomise_loras(ctx: dict) -> None:
    """Non-zero LoRAs (the same on every model built from the same config), so adapter switching matters."""
    g, trained = torch.Generator().manual_seed(0), {id(p) for p in ctx["params"]}
    for _, p in ctx["backend"].net.named_parameters():
        if id(p) in trained:
            p.data = torch.randn(p.shape, generator=g) * 0.05


def lora_state(ctx: dict, what: str) -> dict[str, torch.Tensor]:
    """The trained adapters' parameters (what="data") or gradients (what="grad") by name."""
    trained = {id(p) for p in ctx["params"]}
    return {n: getattr(p, what) for n, p in ctx["backend"].net.named_parameters() if id(p) in trained}


@pytest.mark.parametrize("method,progress,layers", [("shortft", 0.0, "attn_ff"), ("shortft", 0.55, "attn_ff"),
                                                    ("full", 0.0, "attn"), ("drtune", 0.0, "attn_ff"),
                                                    ("draft-lv", 0.0, "attn_ff"), ("leapalign", 0.0, "attn_ff")])
def test_hand_iteration_computes_the_engine_iteration(common, method, progress, layers, monkeypatch):
    """The overhead baseline must compute the same loss, gradients and update, or the comparison is void."""
    over = {**common, "method": method, "guidance": 3.0, "batch_size": 2, "lora_layers": layers}
    engine, hand = build_context(over), build_context(over, prepare=False)
    for ctx in (engine, hand):
        randomise_loras(ctx)
    lora.set_trainable(hand["backend"].net, hand["method"].trainable(progress))
    seen = {}  # the engine's gradients, read when train.optimizer_step clears them after its AdamW step
    zero_grad = torch.optim.AdamW.zero_grad

    def keep_gradients(opt, set_to_none=True):
        seen.update({n: None if p.grad is None else p.grad.clone() for n, p in engine["backend"].net.named_parameters()
                     if id(p) in {id(q) for q in engine["params"]}})
        zero_grad(opt, set_to_none=set_to_none)

    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", keep_gradients)
    e = train_iteration(engine, 0, progress)
    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", zero_grad)
    h = hand_iteration(hand, 0, progress, zero_grad=False)
    assert h["loss"] == pytest.approx(e["loss"], rel=1e-5) and h["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4)
    grads_e, grads_h = seen, lora_state(hand, "grad")
    assert [n for n, g in grads_e.items() if g is not None] == [n for n, g in grads_h.items() if g is not None]
    assert sum(g is not None for g in grads_e.values()) > 0
    for name, g in grads_e.items():
        if g is not None:
            torch.testing.assert_close(grads_h[name], g, rtol=1e-4, atol=1e-7)
    # the first AdamW update is lr·g/(|g| + eps): where |g| is near eps it amplifies float noise, hence atol lr/20
    torch.testing.assert_close(lora_state(hand, "data"), lora_state(engine, "data"), rtol=1e-4, atol=1e-4)
    if layers == "attn":  # the layout asked for: attention projections only
        assert all(any(f".{t}." in n for t in lora.ATTENTION) for n in grads_e) and not any("ff.net" in n for n in grads_e)


def test_efficiency_row_and_report(common, tiny, tmp_path):
    spec = {"overrides": {**common, "method": "shortft"}, "preset": "world", "progress": 0.0, "threads": 1,
            "warmup": 1, "iters": 1, "overhead_reps": 1}
    row = efficiency.worker_method(spec)
    # 6 steps in 4 segments: S1 = 1 step, then [jump, step], [step], [jump, step]; all in the graph
    assert row["unet_calls"] == 6 and row["graph_calls"] == 6 and row["stage"] == 1
    assert len(row["iterations"]) == 2 and row["peak"]["rss_mb"] >= row["loaded"]["rss_mb"]
    ratio = {"median": {"short_raw": 1.0, "full_raw": 4.0, "short_engine": 1.05, "full_engine": 4.2},
             "short_calls": 18, "short_graph": 8, "full_calls": 50, "full_graph": 50}
    grads = {"full@10": [1.0, 2.0], "shortft@10": [0.5], "draft-lv@10": [0.1]}
    args = argparse.Namespace(threads=1, steps=NUM_STEPS, batch=1, reward="symmetry", warmup=1, iters=1, reps=1,
                              grad_rollouts=2)
    spec_m = ModelSpec(tiny["model"], tiny["shortcut"], tiny["prompts"], tiny["prompts"], "tiny")
    out = tmp_path / "efficiency.md"
    results = {"rows": {"shortft (stage 1)": row}, "ratio": ratio, "grads": grads, "lengths": [10]}
    text = efficiency_report.write_report(out, spec_m, args, results, "shortft bench efficiency", full=True)
    assert out.read_text() == text
    for column in ("UNet calls / it", "in graph", "s / it", "peak RSS MB", "grad norm median", "overhead",
                   "ShortFT / full", "full backprop"):
        assert column in text
    assert "| raw UNet calls | 1.000 | 4.000 | 0.250 |" in text
    assert "| engine overhead | +5.0% | +5.0% | |" in text and "| 10 | 1.5 [1, 2] | 0.5 [0.5, 0.5] |" in text
    assert "| shortft (stage 1) | 6 | 6 |" in text and f"{NUM_STEPS} DDIM steps" in text
    # a rerun of some parts keeps the header (its command wrote the rest) and names its own command in its sections
    grads["full@10"] = [3.0]
    part = efficiency_report.write_report(out, spec_m, args, {"grads": grads, "lengths": [10]}, "shortft bench x --only gradlen",
                                          full=False)
    assert part.split("\n## ")[0] == text.split("\n## ")[0] and "| 10 | 3 [3, 3] |" in part
    gradlen = part.split(f"## {efficiency_report.GRADS}\n\n")[1]
    assert gradlen.startswith("Measured by `shortft bench x --only gradlen` on ")
    assert part.count("Measured by") == text.count("Measured by") + 1


def test_report_names_the_chain_update_of_the_model_family(tiny, tiny_sd3):
    args = argparse.Namespace(steps=28, batch=1, reward="symmetry")
    for model, update in ((tiny["model"], "28 DDIM steps"), (tiny_sd3["model"], "28 flow (Euler) steps")):
        spec = prepare_model(model, tiny["root"], shortcut="x.safetensors")
        assert update in efficiency_report.setup_text(spec, args)


def fake_paired(engine_s: list[float], hand_s: list[float], loss: float) -> dict:
    return {"engine": {"seconds": engine_s, "cpu_seconds": [x / 2 for x in engine_s], "loss": [loss] * len(engine_s)},
            "hand": {"seconds": hand_s, "cpu_seconds": [x / 2 for x in hand_s], "loss": [loss + 1e-6] * len(hand_s)}}


def test_overhead_rounds_pair_time_and_measure_memory_per_side(tmp_path):
    calls = []

    def runner(worker, spec, workdir, reuse=False):
        assert reuse  # an interrupted overhead run continues from its workdir
        calls.append((worker, spec["tag"], spec["overrides"]["method"], spec["progress"]))
        if worker == "overhead_paired":
            # first iterations (9.0, 5.0) are left out; the machine slows down over the process, both sides alike
            return fake_paired([9.0, 1.1, 2.2, 4.4], [5.0, 1.0, 2.0, 4.0], -1.0)
        return {"seconds": [1.0], "cpu_seconds": [1.0], "loss": [-1.0],
                "rss_mb": 30.0 if spec["side"] == "engine" else 20.0, "tensor_mb": 21.0 if spec["side"] == "engine" else 20.0}

    rows = [("shortft (stage 2)", "shortft", {}, 0.3), ("full (checkpointed)", "full", {}, 0.0)]
    results = overhead_bench.run_overhead({"reward": "symmetry"}, rows, "world", 2, 3, 1, tmp_path, runner=runner)
    assert [c[1] for c in calls] == [
        "overhead-shortft_stage_2-paired-r0", "overhead-shortft_stage_2-engine-r0", "overhead-shortft_stage_2-hand-r0",
        "overhead-full_checkpointed-paired-r0", "overhead-full_checkpointed-engine-r0", "overhead-full_checkpointed-hand-r0",
        "overhead-shortft_stage_2-paired-r1", "overhead-shortft_stage_2-hand-r1", "overhead-shortft_stage_2-engine-r1",
        "overhead-full_checkpointed-paired-r1", "overhead-full_checkpointed-hand-r1", "overhead-full_checkpointed-engine-r1"]
    assert {c[0] for c in calls if "paired" in c[1]} == {"overhead_paired"}
    assert {c[0] for c in calls if "paired" not in c[1]} == {"overhead_side"}
    assert calls[0][2:] == ("shortft", 0.3)
    table = overhead_bench.summarise_overhead(results)
    row = table["full (checkpointed)"]
    # every back-to-back pair is 10% slower through the engine, although the iterations' times spread 4x
    assert row["time"] == pytest.approx(0.1) and row["cpu"] == pytest.approx(0.1)
    assert row["engine"] == {"s": pytest.approx(2.2), "cpu_s": pytest.approx(1.1), "rss_mb": 30.0, "tensor_mb": 21.0}
    assert row["hand"] == {"s": 2.0, "cpu_s": 1.0, "rss_mb": 20.0, "tensor_mb": 20.0}
    assert row["rss"] == pytest.approx(0.5) and row["tensor"] == pytest.approx(0.05)
    assert row["loss_diff"] == pytest.approx(1e-6, rel=1e-3) and "cuda" not in row
    args = argparse.Namespace(threads=1, steps=50, batch=2, reward="symmetry", rounds=2, iters=3)
    spec = ModelSpec("m", "s", "p", "p", "medium", config={"guidance": 7.5, "lora_layers": "attn"})
    lines = efficiency_report.overhead_section(results, spec, args, "shortft bench efficiency --only overhead")
    assert "| full (checkpointed) | 2.200 | 2.000 | +10.0% | 1.100 | 1.000 | +10.0% | 30.0 | 20.0 | +50.0% | " \
        "21.0 | 20.0 | +5.0% | 1.0e-06 |" in lines
    assert "live-tensor overhead | loss diff |" in lines[4] and lines[5].count("|") == lines[4].count("|")
    assert "'lora_layers': 'attn'" in lines[0] and "--only overhead" in lines[0]


def test_overhead_workers_sides_agree(common):
    """Both sides in one paired worker and each in its own: the same losses, and what each measured."""
    spec = {"overrides": {**common, "method": "draft-lv", "guidance": 3.0}, "preset": "world",
            "progress": 0.0, "iters": 2, "threads": 1}
    engine = overhead_bench.worker_side({**spec, "side": "engine"})
    hand = overhead_bench.worker_side({**spec, "side": "hand"})
    assert engine["loss"] == pytest.approx(hand["loss"], rel=1e-5) and engine["loss"][0] != engine["loss"][1]
    assert len(engine["seconds"]) == len(hand["seconds"]) == len(engine["cpu_seconds"]) == 2 and set(engine) == set(hand)
    assert 0 < engine["cpu_seconds"][1] and 0 < hand["cpu_seconds"][1]
    # the same tensors live at the peak of an iteration on both sides: the engine holds nothing extra
    assert engine["tensor_mb"] > 0.1 and engine["tensor_mb"] == pytest.approx(hand["tensor_mb"], rel=0.01)
    paired = overhead_bench.worker_paired(spec)
    assert paired["engine"]["loss"] == pytest.approx(engine["loss"], rel=1e-5)
    assert paired["hand"]["loss"] == pytest.approx(hand["loss"], rel=1e-5)
    assert len(paired["engine"]["seconds"]) == len(paired["hand"]["cpu_seconds"]) == 2


def test_only_some_parts_replace_their_sections(tmp_path):
    old = "# Efficiency\n\nWritten by x.\n\n## Per method\n\nold rows\n\n## Engine against the same iteration " \
          "written by hand\n\nplaceholder\n\n## Extra\n\nkept\n"
    text = efficiency_report.merge(old, {efficiency_report.OVERHEAD: ["new table"], "New part": ["appended"]})
    assert text == old.replace("placeholder\n", "new table\n") + "## New part\n\nappended\n\n"
    parser = argparse.ArgumentParser()
    efficiency.add_parser(parser.add_subparsers())
    args = parser.parse_args(["efficiency", "--only", "overhead", "--rows", "drtune,refl"])
    parts, rows = efficiency.selection(args)
    assert parts == ["overhead"] and [r[0] for r in rows] == ["drtune", "refl"]
    # the engine-vs-hand table also runs ShortFT's stage 1 with all of segment 1 in the graph (issue 18's shape)
    rows = efficiency.selection(parser.parse_args(["efficiency", "--only", "overhead"]))[1]
    assert rows[-1] == efficiency.OVERHEAD_ROWS[0]
    label, name, over, progress = rows[-1]
    m = METHODS[name](TrainConfig(method=name, num_steps=50, **over))
    m.use_timesteps(list(range(981, 0, -20)))  # 50 DDIM steps
    plan = m.plan(progress, random.Random(0))
    assert len(plan.steps) == plan.graph_calls == 18  # the shape: every call of stage 1 in the graph
    assert all(r[1] in efficiency.HAND_METHODS for r in rows)  # every method has its hand-written iteration
    with pytest.raises(ConfigError, match="flops"):
        efficiency.selection(parser.parse_args(["efficiency", "--only", "rows,flops"]))
    lever = "shortft (stage 1) + vae_checkpoint"  # the memory levers are rows of the real-size table only
    assert [r[0] for r in efficiency.selection(parser.parse_args(["efficiency", "--arch", "sd15", "--rows", lever]))[1]] == [lever]
    with pytest.raises(ConfigError, match="vae_checkpoint"):
        efficiency.selection(parser.parse_args(["efficiency", "--rows", lever]))
    with pytest.raises(ConfigError, match="measure-rows"):
        efficiency.selection(parser.parse_args(["efficiency", "--arch", "sd15", "--rows", "refl", "--measure-rows", "drtune"]))


def test_real_size_table_shows_measured_columns_the_native_estimate_and_what_fits():
    """Measured seconds and memory added per resolution, the fake-tensor estimate at the native resolution
    (TFLOP, weights, peak), the fits column (peak + the CUDA context against 24 / 48 / 80 GB) and the ratios."""
    from shortft.bench.realsize import arch_section

    def run(secs, mb):
        return {"seconds_median": secs, "unet_calls": 18, "graph_calls": 8,
                "loaded": {"rss_mb": 1000.0}, "peak": {"rss_mb": 1000.0 + mb}}

    def est(tflop, peak_gb):
        return {"tflop": tflop, "weights_bytes": 2.5e9, "peak_bytes": peak_gb * 1e9, "unet_calls": 18, "graph_calls": 8}

    res = {"arch": "sd15", "resolutions": [64, 96], "native": 512, "half": "fp16", "weights_gb": 2.0,
           "rows": {"shortft (stage 1)": {"64": run(70.0, 400.0), "96": run(80.0, 500.0)},
                    "full (checkpointed)": {"64": run(350.0, 400.0), "96": run(400.0, 1000.0)}},
           "estimates": {"shortft (stage 1)": est(51.0, 23.5), "full (checkpointed)": est(102.0, 47.2),
                         "draft (K=1)": est(102.0, 11.75)}}
    text = "\n".join(arch_section(res, "cmd", "today", "here"))
    assert "| shortft (stage 1) | 18 | 8 | 70.0 | 400 | 80.0 | 500 | 51.0 | 2.5 | 23.5 | no / yes / yes |" in text
    assert "| full (checkpointed) | 18 | 8 | 350.0 | 400 | 400.0 | 1000 | 102.0 | 2.5 | 47.2 | no / no / yes |" in text
    assert ("64 px: time 0.20x, memory added 1.00x; 96 px: time 0.20x, memory added 0.50x; "
            "512 px (estimated): FLOPs 0.50x, peak 0.50x.") in text
    assert "At 512 px (estimated), ShortFT stage 1 against DRaFT-1: FLOPs 0.50x, peak 2.00x." in text


def test_worker_result_is_reused_only_for_the_identical_spec(tmp_path):
    """An interrupted real-size table continues: a result already in the work folder from the same spec is
    returned without running the worker again; a changed spec runs it (here: a worker that does not exist)."""
    from shortft.bench import run_worker

    spec = {"tag": "a", "iters": 1}
    (tmp_path / "nope-a.spec.json").write_text(json.dumps(spec))
    (tmp_path / "nope-a.json").write_text(json.dumps({"seconds_median": 1.5}))
    assert run_worker("nope", spec, tmp_path, reuse=True) == {"seconds_median": 1.5}
    with pytest.raises(RuntimeError, match="nope-a"):
        run_worker("nope", {**spec, "iters": 2}, tmp_path, reuse=True)
    assert not (tmp_path / "nope-a.json").exists()  # the stale result is not left behind for the new spec

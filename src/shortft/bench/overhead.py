"""Framework overhead of a whole training iteration: shortft's engine (`engine.train_iteration`) against
the same iteration written by hand (`hand.hand_iteration`), for every method row of the efficiency table.

Every measurement is a fresh process (the `overhead_side` worker) that builds one side of one row,
resets its peak-RSS mark, runs `iters` iterations and reports each one's seconds and loss and the memory
they added: peak RSS minus RSS before the first (on a GPU also CUDA max_memory_allocated minus what was
allocated before). Rounds interleave the processes (every row, engine and hand in an order that
alternates per round), so drifting machine load hits both sides alike. Per row: the medians over rounds
of each process's median seconds and of its memory, and the ratios engine / hand - 1. Both sides run in
fp32 without autocast, so they compute the same thing on a GPU too (the losses are compared).
"""

from __future__ import annotations

import gc

from shortft.bench import median, run_worker, set_threads, slug
from shortft.bench.engine import build_context, memory_mark, memory_peak, train_iteration
from shortft.bench.hand import hand_iteration

FP32 = {"dtype": "fp32", "mixed_precision": "no"}  # both sides: fp32 weights and maths


def worker_side(spec: dict) -> dict:
    """One side ("engine" or "hand") of one row in this (fresh) process: `iters` full iterations."""
    from shortft import lora

    set_threads(spec["threads"])
    engine = spec["side"] == "engine"
    ctx = build_context({**spec["overrides"], **FP32}, spec["preset"], prepare=engine)
    if not engine:
        lora.set_trainable(ctx["backend"].net, ctx["method"].trainable(spec["progress"]))
    iteration = train_iteration if engine else hand_iteration
    gc.collect()
    before = memory_mark(ctx["device"])
    its = [iteration(ctx, i, spec["progress"]) for i in range(spec["iters"])]
    peak = memory_peak(ctx["device"])
    return {"seconds": [x["seconds"] for x in its], "cpu_seconds": [x["cpu_seconds"] for x in its],
            "loss": [x["loss"] for x in its],
            **{key: peak[key] - before[key] for key in before}}


def run_overhead(base: dict, rows: list[tuple], preset: str | None, rounds: int, iters: int, threads: int,
                 workdir, runner=run_worker) -> dict:
    """{row label: {"engine": [a worker result per round], "hand": [...]}} for `rows` of
    (label, method, config overrides, progress)."""
    out = {label: {"engine": [], "hand": []} for label, *_ in rows}
    for r in range(rounds):
        for label, method, over, progress in rows:
            for side in ("engine", "hand") if r % 2 == 0 else ("hand", "engine"):
                print(f"bench efficiency: overhead round {r + 1}/{rounds}, {label}, {side} ...", flush=True)
                out[label][side].append(runner("overhead_side", {
                    "tag": f"overhead-{slug(label)}-{side}-r{r}", "overrides": {**base, **over, "method": method},
                    "preset": preset, "progress": progress, "iters": iters, "threads": threads,
                    "side": side}, workdir))
    return out


def ratio(a: float, b: float) -> float:
    """a / b - 1; nan where b is not positive (memory added can be nil)."""
    return a / b - 1 if b > 0 else float("nan")


def steady(values: list[float]) -> list[float]:
    """A process's iterations after its first (the first pays one-off costs: the allocator's growth, lazy
    initialisation; a training run amortises them over thousands of steps); all of them if there is one."""
    return values[1:] if len(values) > 1 else values


def side_medians(runs: list[dict]) -> dict:
    """Median over rounds of one side's median seconds per steady iteration (wall clock, and CPU time of the
    process: immune to the process being descheduled on a shared machine) and of the memory it added (MB,
    over every iteration, the first included)."""
    out = {"s": median([median(steady(r["seconds"])) for r in runs]),
           "cpu_s": median([median(steady(r["cpu_seconds"])) for r in runs]),
           "rss_mb": median([r["rss_mb"] for r in runs])}
    if "cuda_mb" in runs[0]:
        out["cuda_mb"] = median([r["cuda_mb"] for r in runs])
    return out


def summarise_overhead(results: dict) -> dict:
    """Per row: both sides' medians, the overheads engine / hand - 1 (time, RSS, CUDA memory), and the
    largest relative difference between the two sides' losses over the same iterations."""
    table = {}
    for label, sides in results.items():
        engine, hand = side_medians(sides["engine"]), side_medians(sides["hand"])
        losses = [(e, h) for a, b in zip(sides["engine"], sides["hand"]) for e, h in zip(a["loss"], b["loss"])]
        row = {"engine": engine, "hand": hand, "time": ratio(engine["s"], hand["s"]),
               "cpu": ratio(engine["cpu_s"], hand["cpu_s"]), "rss": ratio(engine["rss_mb"], hand["rss_mb"]),
               "loss_diff": max(abs(e - h) / max(abs(h), 1e-12) for e, h in losses)}
        if "cuda_mb" in engine:
            row["cuda"] = ratio(engine["cuda_mb"], hand["cuda_mb"])
        table[label] = row
    return table

"""Framework overhead of a whole training iteration: shortft's engine (`engine.train_iteration`) against
the same iteration written by hand (`hand.hand_iteration`), for every method row of the efficiency table.

Time is measured paired, in one process (the `overhead_paired` worker): both sides are built there and
their iterations alternate (engine then hand, then hand then engine, ...), so the two see the same
machine, allocator and CPU state, and the overhead is the median over iterations of the ratio of each
engine iteration to the hand iteration beside it. Separate processes per side differ from each other by
several per cent on a shared machine (CPU placement, memory layout), which swamped a 3% target.
Memory needs a process per side: the `overhead_side` worker builds one side, resets its peak-RSS mark,
runs `iters` iterations and reports the memory they added (peak RSS minus RSS before the first; on a GPU
also CUDA max_memory_allocated minus what was allocated before); their figures vary by 2-10% between
processes, so each round runs them again (engine first or hand first, alternating) besides the paired
process, and the table takes medians over rounds. RSS also holds what the allocator keeps of freed memory,
which differs between processes of either side; so each side worker then runs one more iteration under
`fake.Counter` and reports the peak bytes of live tensors it made (deterministic: the same in every round;
what `cuda.max_memory_allocated` measures on a GPU).
Both sides run in fp32 without autocast, so they compute the same thing on a GPU too (the losses are
compared).
"""

from __future__ import annotations

import gc

from shortft.bench import median, run_worker, set_threads, slug
from shortft.bench.engine import build_context, memory_mark, memory_peak, train_iteration
from shortft.bench.fake import Counter
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
    with Counter() as count:  # after the timed iterations: the Counter slows every op
        iteration(ctx, spec["iters"], spec["progress"])
    return {"seconds": [x["seconds"] for x in its], "cpu_seconds": [x["cpu_seconds"] for x in its],
            "loss": [x["loss"] for x in its], "tensor_mb": count.peak / 2**20,
            **{key: peak[key] - before[key] for key in before}}


def worker_paired(spec: dict) -> dict:
    """Both sides of one row in this (fresh) process, their iterations alternating: per side, `iters`
    iterations' seconds, CPU seconds and losses (index i of both sides ran back to back)."""
    from shortft import lora

    set_threads(spec["threads"])
    ctxs = {side: build_context({**spec["overrides"], **FP32}, spec["preset"], prepare=side == "engine")
            for side in ("engine", "hand")}
    lora.set_trainable(ctxs["hand"]["backend"].net, ctxs["hand"]["method"].trainable(spec["progress"]))
    out = {side: {"seconds": [], "cpu_seconds": [], "loss": []} for side in ctxs}
    for i in range(spec["iters"]):
        for side in ("engine", "hand") if i % 2 == 0 else ("hand", "engine"):
            gc.collect()  # what the other side left is freed before this one runs
            x = (train_iteration if side == "engine" else hand_iteration)(ctxs[side], i, spec["progress"])
            for key in out[side]:
                out[side][key].append(x[key])
    return out


def run_overhead(base: dict, rows: list[tuple], preset: str | None, rounds: int, iters: int, threads: int,
                 workdir, runner=run_worker) -> dict:
    """{row label: {"paired": [a paired worker's result per round], "engine": [memory worker results],
    "hand": [...]}} for `rows` of (label, method, config overrides, progress). Results already in `workdir`
    from the identical spec are reused: an interrupted run continues; a new measurement needs a new workdir."""
    out = {label: {"paired": [], "engine": [], "hand": []} for label, *_ in rows}
    for r in range(rounds):
        for label, method, over, progress in rows:
            spec = {"overrides": {**base, **over, "method": method}, "preset": preset, "progress": progress,
                    "iters": iters, "threads": threads}
            print(f"bench efficiency: overhead round {r + 1}/{rounds}, {label}, paired time ...", flush=True)
            out[label]["paired"].append(runner("overhead_paired", {
                **spec, "tag": f"overhead-{slug(label)}-paired-r{r}"}, workdir, reuse=True))
            for side in ("engine", "hand") if r % 2 == 0 else ("hand", "engine"):
                print(f"bench efficiency: overhead round {r + 1}/{rounds}, {label}, {side} memory ...", flush=True)
                out[label][side].append(runner("overhead_side", {
                    **spec, "tag": f"overhead-{slug(label)}-{side}-r{r}", "side": side}, workdir, reuse=True))
    return out


def ratio(a: float, b: float) -> float:
    """a / b - 1; nan where b is not positive (memory added can be nil)."""
    return a / b - 1 if b > 0 else float("nan")


def steady(values: list[float]) -> list[float]:
    """A process's iterations after its first (the first pays one-off costs: the allocator's growth, lazy
    initialisation; a training run amortises them over thousands of steps); all of them if there is one."""
    return values[1:] if len(values) > 1 else values


def paired_times(runs: list[dict], key: str) -> dict:
    """Over the paired processes of one row (steady iterations of each): each side's median seconds and the
    median ratio engine / hand - 1 of iterations that ran back to back."""
    e = [x for r in runs for x in steady(r["engine"][key])]
    h = [x for r in runs for x in steady(r["hand"][key])]
    return {"engine": median(e), "hand": median(h), "overhead": median([a / b for a, b in zip(e, h)]) - 1}


def summarise_overhead(results: dict) -> dict:
    """Per row: time (wall and CPU) from the paired processes, memory from the per-side processes (MB, median
    over them), the overheads engine / hand - 1, and the largest relative difference between the two
    sides' losses over the same iterations (every process)."""
    table = {}
    for label, sides in results.items():
        wall, cpu = paired_times(sides["paired"], "seconds"), paired_times(sides["paired"], "cpu_seconds")
        engine = {"s": wall["engine"], "cpu_s": cpu["engine"], "rss_mb": median([r["rss_mb"] for r in sides["engine"]])}
        hand = {"s": wall["hand"], "cpu_s": cpu["hand"], "rss_mb": median([r["rss_mb"] for r in sides["hand"]])}
        for key in ("tensor_mb", "cuda_mb"):
            if key in sides["engine"][0]:
                engine[key] = median([r[key] for r in sides["engine"]])
                hand[key] = median([r[key] for r in sides["hand"]])
        pairs = [(p["engine"]["loss"], p["hand"]["loss"]) for p in sides["paired"]]
        pairs += [(a["loss"], b["loss"]) for a, b in zip(sides["engine"], sides["hand"])]
        losses = [(e, h) for a, b in pairs for e, h in zip(a, b)]
        row = {"engine": engine, "hand": hand, "time": wall["overhead"], "cpu": cpu["overhead"],
               "rss": ratio(engine["rss_mb"], hand["rss_mb"]),
               "loss_diff": max(abs(e - h) / max(abs(h), 1e-12) for e, h in losses)}
        for key in ("tensor", "cuda"):
            if f"{key}_mb" in engine:
                row[key] = ratio(engine[f"{key}_mb"], hand[f"{key}_mb"])
        table[label] = row
    return table

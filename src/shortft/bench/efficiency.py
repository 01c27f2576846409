"""`shortft bench efficiency`: what one training iteration of each method costs on the same model and batch.

Four parts (`--only` picks some; the report's other sections are then kept as they are):
  rows      per method, in a fresh process each: UNet calls per iteration and how many are in the
            autograd graph, seconds per iteration (median after a warm-up), peak memory (RSS on CPU,
            CUDA max_memory_allocated on a GPU), gradient-norm statistics (the norm before clipping), and
            the chain alone through the engine (`run_plan`) against the same UNet calls made by hand;
  ratio     ShortFT's stage-1 chain (18 UNet calls at 50 steps) against the 50-step checkpointed full
            chain, engine and by hand, interleaved in one process;
  gradlen   the gradient norm of full backprop as the chain grows (10, 20, 50 steps) next to ShortFT's;
  overhead  one whole training iteration through the engine against the same iteration written by hand
            (shortft.bench.hand): time paired in one process (the sides' iterations alternate), memory
            in a process per side (shortft.bench.overhead).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from shortft import files
from shortft.bench import chain_scaled, command_line, median, prepare_model, run_worker, set_threads, slug, sync
from shortft.bench.engine import build_context, memory_mark, memory_peak, train_iteration
from shortft.bench.hand import raw_chain
from shortft.errors import ConfigError

# method rows of the table: (label, method, config overrides, training progress that picks the stage)
ROWS = [
    ("shortft (stage 1)", "shortft", {}, 0.0),
    ("shortft (stage 2)", "shortft", {}, 0.3),
    ("shortft (stage 3)", "shortft", {}, 0.55),
    ("shortft (stage 4)", "shortft", {}, 0.8),
    ("shortft w/o progressive", "shortft", {"progressive": False}, 0.0),
    ("shortft w/o T-LoRA (stage 1)", "shortft", {"tlora": False}, 0.0),
    ("draft-lv", "draft-lv", {}, 0.0),
    ("draft (K=1)", "draft", {}, 0.0),
    ("drtune", "drtune", {}, 0.0),
    ("alignprop", "alignprop", {}, 0.0),
    ("refl", "refl", {}, 0.0),
    ("full (checkpointed)", "full", {}, 0.0),
    ("shortcut-ft", "shortcut-ft", {}, 0.0),
    ("leapalign", "leapalign", {}, 0.0),
]
# Rows of the real-size table (--arch) only: the memory levers on ShortFT's stage 1 (what fits a smaller card, at
# what cost), and full backprop without checkpointing (DRaFT-K with K = every step of the chain: "all")
ARCH_ROWS = [
    ("shortft (stage 1) + vae_checkpoint", "shortft", {"vae_checkpoint": True}, 0.0),
    ("shortft (stage 1) + vae_checkpoint + checkpoint_calls", "shortft",
     {"vae_checkpoint": True, "checkpoint_calls": True}, 0.0),
    ("full (no checkpointing)", "draft", {"draft_k": "all"}, 0.0),
]
# Rows of the engine-vs-hand table (overhead) only: ShortFT's stage 1 with all of segment 1 in the graph (an
# s1_grad_steps above the segment's length; 18 calls on 50 steps, the shape issue 18 was measured on)
OVERHEAD_ROWS = [("shortft (stage 1, all of segment 1 in the graph)", "shortft", {"s1_grad_steps": 1000}, 0.0)]
HAND_METHODS = ("shortft", "draft-lv", "draft", "drtune", "alignprop", "refl", "full", "shortcut-ft", "leapalign")  # bench.hand's
PARTS = ("rows", "ratio", "gradlen", "overhead")


def time_chain(ctx: dict, steps, raw: bool, it: int = 0) -> float:
    """Seconds of one chain forward + backward of a scalar of x0 (no VAE, no reward: UNet calls only)."""
    from shortft.chain import run_plan
    from shortft.train import make_rollout

    backend = ctx["backend"]
    ro, _ = make_rollout(ctx["cfg"], backend, ctx["prompts"], ctx["reward"], it)
    sync(ctx["device"])
    t0 = time.perf_counter()
    x0 = (raw_chain if raw else run_plan)(backend, steps, ro.x_T, ro.cond, ro.uncond)
    x0.float().square().mean().backward()
    sync(ctx["device"])
    dt = time.perf_counter() - t0
    ctx["opt"].zero_grad(set_to_none=True)
    for p in backend.net.parameters():
        p.grad = None
    return dt


# --- workers (each runs in its own process) ----------------------------------------------------------------
def worker_method(spec: dict) -> dict:
    """One table row: `warmup` + `iters` training iterations of one method at a fixed progress."""
    from shortft import lora
    from shortft.train import make_rollout

    set_threads(spec["threads"])
    ctx = build_context(spec["overrides"], spec["preset"])
    loaded = memory_mark(ctx["device"])
    its = [train_iteration(ctx, i, spec["progress"]) for i in range(spec["warmup"] + spec["iters"])]
    peak = memory_peak(ctx["device"])
    timed = its[spec["warmup"]:]
    # framework overhead of this method's plan: engine vs hand-made calls, interleaved
    lora.set_trainable(ctx["backend"].net, ctx["method"].trainable(spec["progress"]))
    _, rng = make_rollout(ctx["cfg"], ctx["backend"], ctx["prompts"], ctx["reward"], 0)
    steps = ctx["method"].plan(spec["progress"], rng).steps
    engine, raw = [], []
    for r in range(spec["overhead_reps"]):  # 0: no chain timings (the real-size table)
        engine.append(time_chain(ctx, steps, raw=False, it=r))
        raw.append(time_chain(ctx, steps, raw=True, it=r))
    norms = [i["grad_norm"] for i in its]
    return {"iterations": its, "loaded": loaded, "peak": peak,
            "seconds_median": median([i["seconds"] for i in timed]),
            "unet_calls": timed[-1]["unet_calls"], "graph_calls": timed[-1]["graph_calls"],
            "stage": timed[-1]["stage"],
            "grad_norm": {"median": median(norms), "min": min(norms), "max": max(norms),
                          "mean": sum(norms) / len(norms)},
            "engine_s": median(engine), "raw_s": median(raw), "engine_all": engine, "raw_all": raw}


def worker_ratio(spec: dict) -> dict:
    """ShortFT's stage-1 chain against the checkpointed full chain, engine and raw, in one process."""
    from shortft import lora
    from shortft.methods import METHODS

    set_threads(spec["threads"])
    ctx = build_context({**spec["overrides"], "method": "shortft"}, spec["preset"])
    full = METHODS["full"](ctx["cfg"])
    full.setup(ctx["backend"])
    lora.set_trainable(ctx["backend"].net, ctx["method"].adapter_names() + full.adapter_names())
    short_steps = ctx["method"].plan(0.0, random.Random(0)).steps
    full_steps = full.plan(0.0, random.Random(0)).steps
    times = {k: [] for k in ("short_raw", "full_raw", "short_engine", "full_engine")}
    time_chain(ctx, short_steps, raw=True)  # warm-up
    time_chain(ctx, full_steps, raw=True)
    for r in range(spec["reps"]):
        times["short_raw"].append(time_chain(ctx, short_steps, raw=True, it=r))
        times["full_raw"].append(time_chain(ctx, full_steps, raw=True, it=r))
        times["short_engine"].append(time_chain(ctx, short_steps, raw=False, it=r))
        times["full_engine"].append(time_chain(ctx, full_steps, raw=False, it=r))
    med = {k: median(v) for k, v in times.items()}
    return {"times": times, "median": med,
            "short_calls": len(short_steps), "short_graph": sum(s.grad != "none" for s in short_steps),
            "full_calls": len(full_steps), "full_graph": sum(s.grad != "none" for s in full_steps)}


def worker_gradlen(spec: dict) -> dict:
    """Gradient norm at initialisation (before clipping) of full backprop and ShortFT (stage 1) and
    DRaFT-LV as the chain grows, over the same rollouts."""
    import torch

    from shortft import lora
    from shortft.train import make_rollout

    set_threads(spec["threads"])
    out = {}
    for n in spec["lengths"]:
        for name in spec["methods"]:
            ctx = build_context({**spec["overrides"], "method": name, "num_steps": n, **chain_scaled(n)},
                                spec["preset"])
            norms = []
            for r in range(spec["rollouts"]):
                lora.set_trainable(ctx["backend"].net, ctx["method"].trainable(0.0))
                ro, rng = make_rollout(ctx["cfg"], ctx["backend"], ctx["prompts"], ctx["reward"], r)
                loss, _, _ = ctx["method"].loss(ro, ctx["method"].plan(0.0, rng))
                loss.backward()
                live = [p for p in ctx["params"] if p.grad is not None]
                norms.append(float(torch.nn.utils.clip_grad_norm_(live, float("inf"))))
                ctx["opt"].zero_grad(set_to_none=True)
            out[f"{name}@{n}"] = norms
            del ctx
    return out


# --- the command ---------------------------------------------------------------------------------------------
def add_parser(bsub) -> None:
    p = bsub.add_parser("efficiency", help="per-method cost of one iteration -> docs/efficiency.md",
                        description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="world | tiny | small | medium | a diffusers folder "
                   "(default: world if its assets exist, else small)")
    p.add_argument("--shortcut", default="", help="shortcut LoRA file (for a diffusers folder)")
    p.add_argument("--only", default="", help=f"comma-separated parts to run, from {', '.join(PARTS)} "
                   "(default: all); the report's other sections are kept")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the original chain")
    p.add_argument("--batch", type=int, default=2, help="prompts per rollout")
    p.add_argument("--iters", type=int, default=4, help="timed iterations per process (rows: after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="rows: untimed iterations first")
    p.add_argument("--rounds", type=int, default=3, help="overhead: rounds of a fresh paired-time process per row")
    p.add_argument("--reps", type=int, default=5, help="repetitions of the chain-vs-raw timings")
    p.add_argument("--lengths", default="10,20,50", help="chain lengths for the gradient-norm growth table")
    p.add_argument("--grad-rollouts", type=int, default=4, help="rollouts per gradient-norm measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (0 = torch's default)")
    p.add_argument("--reward", default="symmetry", help="reward used for the iterations (cheap by default)")
    p.add_argument("--rows", default="", help="comma-separated row labels to run (default: all)")
    p.add_argument("--arch", default="", help="run the real-size table instead, on this full-size architecture "
                   "with random weights: sd15 | sdxl | sd35m (shortft.bench.realsize)")
    p.add_argument("--resolutions", default="128,256", help="--arch: image sizes (px) to measure on this machine; "
                   "\"\" = none (then only the native-resolution estimate, --estimate)")
    p.add_argument("--measure-rows", default="", help="--arch: the rows measured at --resolutions (default: every "
                   "row of --rows; the others are only estimated)")
    p.add_argument("--estimate", action=argparse.BooleanOptionalAction, default=True,
                   help="--arch: also estimate the native resolution on fake tensors (shortft.bench.fake; minutes "
                   "of CPU per row)")
    p.add_argument("--arch-divisor", type=int, default=1, help="--arch: divide every width by this (a quick "
                   "check of the command at toy size; the report is then not the real architecture's)")
    p.add_argument("--out", default="docs/efficiency.md", help="markdown report to write")
    p.add_argument("--workdir", default="runs/bench/efficiency", help="worker specs, logs and raw JSON")
    p.set_defaults(func=run)


def default_model() -> str:
    from shortft.world import WORLD_MODEL, WORLD_SHORTCUT

    return "world" if (WORLD_MODEL / "unet").is_dir() and WORLD_SHORTCUT.is_file() else "small"


def selection(args) -> tuple[list[str], list[tuple]]:
    """The parts and method rows the command line asks for; ConfigError naming unknown ones."""
    parts = args.only.split(",") if args.only else list(PARTS)
    rows = ROWS + (ARCH_ROWS if args.arch else OVERHEAD_ROWS)
    labels = args.rows.split(",") if args.rows else [r[0] for r in rows]
    for kind, asked, known in (("part", parts, PARTS), ("row", labels, [r[0] for r in rows])):
        bad = [x for x in asked if x not in known]
        if bad:
            raise ConfigError(f"unknown {kind}(s) {bad}; choose from {', '.join(known)}")
    bad = [x for x in args.measure_rows.split(",") if x not in labels] if args.measure_rows else []
    if bad:
        raise ConfigError(f"--measure-rows {bad} are not rows of this table; choose from {', '.join(labels)}")
    return parts, [r for r in rows if r[0] in labels]


def run(args) -> int:
    from shortft.bench.efficiency_report import write_arch_report, write_report
    from shortft.bench.overhead import run_overhead

    parts, rows = selection(args)
    workdir = Path(args.workdir)
    if args.arch:
        from shortft.bench.realsize import run_arch

        results = run_arch(args, rows, workdir)
        files.write_json(workdir / f"arch-{args.arch}.json", results)
        write_arch_report(Path(args.out), results, command_line("efficiency"), args.arch_divisor)
        print(f"wrote {args.out}")
        return 0
    spec = prepare_model(args.model or default_model(), workdir, args.shortcut)
    full_report = parts == list(PARTS)
    from shortft.backends import model_family, resolve_model

    hand = model_family(resolve_model(spec.model)) == "sd"  # bench.hand writes the SD 1.5 family's chain only
    if not hand and {"ratio", "overhead"} & set(parts):
        print("bench efficiency: ratio and overhead need the hand-written chain (SD 1.5 family only): skipped")
        parts = [p for p in parts if p not in ("ratio", "overhead")]
    base = dict(model=spec.model, shortcut=spec.shortcut, prompts=spec.prompts, eval_prompts=spec.eval_prompts,
                reward=args.reward, num_steps=args.steps, batch_size=args.batch, **chain_scaled(args.steps),
                **spec.config)
    common = {"preset": spec.preset, "threads": args.threads}
    results = {}
    if "rows" in parts:
        results["rows"] = {}
        for label, method, over, progress in [r for r in rows if r not in OVERHEAD_ROWS]:
            print(f"bench efficiency: {label} ...", flush=True)
            results["rows"][label] = run_worker("efficiency_method", {
                "tag": slug(label), "overrides": {**base, **over, "method": method}, "progress": progress,
                "warmup": args.warmup, "iters": args.iters, "overhead_reps": max(2, args.reps // 2) if hand else 0, **common}, workdir)
    if "ratio" in parts:
        print("bench efficiency: shortft vs full chain ...", flush=True)
        results["ratio"] = run_worker("efficiency_ratio", {"tag": "ratio", "overrides": base, "reps": args.reps,
                                                           **common}, workdir)
    if "gradlen" in parts:
        print("bench efficiency: gradient norm vs chain length ...", flush=True)
        results["lengths"] = [int(n) for n in args.lengths.split(",") if n.strip()]
        results["grads"] = run_worker("efficiency_gradlen", {
            "tag": "gradlen", "overrides": base, "lengths": results["lengths"],
            "methods": ["full", "shortft", "draft-lv"], "rollouts": args.grad_rollouts, **common}, workdir)
    if "overhead" in parts:  # the rows bench.hand writes by hand
        hand_rows = [r for r in rows if r[1] in HAND_METHODS]
        results["overhead"] = run_overhead(base, hand_rows, spec.preset, args.rounds, args.iters, args.threads, workdir)
    files.write_json(workdir / "results.json", results)
    write_report(Path(args.out), spec, args, results, command_line("efficiency"), full=full_report)
    print(f"wrote {args.out}")
    return 0

"""`shortft bench efficiency`: what one training iteration of each method costs on the same model and batch.

Per method, in a fresh process each: UNet calls per iteration and how many are in the autograd graph,
seconds per iteration (median after a warm-up), peak memory (RSS on CPU, CUDA max_memory_allocated on a
GPU) and gradient-norm statistics (the norm before clipping). In one process, interleaved so that
machine noise hits both sides alike:
  * the framework overhead: the chain engine (`run_plan`, adapter switching through the Denoiser) against
    the same UNet calls made by hand (`raw_chain`), forward and backward;
  * ShortFT's stage-1 chain (18 UNet calls at 50 steps) against the 50-step checkpointed full chain;
  * the gradient norm of full backprop as the chain grows (10, 20, 50 steps) next to ShortFT's.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from shortft.bench import ModelSpec, chain_scaled, machine, median, now, prepare_model, run_worker, set_threads

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
]


# --- shared setup --------------------------------------------------------------------------------------------
def build_context(overrides: dict, preset: str | None = "world") -> dict:
    """Backend, method, reward, optimizer for a config, exactly as `train` builds them."""
    import torch

    from shortft import lora
    from shortft.config import build_config
    from shortft.prompts import load_prompts
    from shortft.train import build_accelerator, build_model, build_reward_fn

    cfg = build_config(preset, overrides=overrides)
    acc = build_accelerator(cfg)  # resolves dtype / mixed precision as training does
    device = acc.device
    torch.manual_seed(cfg.seed)
    backend, method = build_model(cfg, device)
    reward = build_reward_fn(cfg, device)
    params = lora.set_trainable(backend.unet, method.adapter_names())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    backend.denoiser, opt = acc.prepare(backend.denoiser, opt)
    return dict(cfg=cfg, acc=acc, device=device, backend=backend, method=method, reward=reward, params=params,
                opt=opt, prompts=load_prompts(cfg.prompts))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def rollout(ctx: dict, it: int):
    """The Rollout of iteration `it` (same random draws as train's step `it`)."""
    import torch

    from shortft.methods import Rollout
    from shortft.train import step_rng

    cfg, backend = ctx["cfg"], ctx["backend"]
    rng, gen = step_rng(cfg, it, 0, 0)
    batch = [rng.choice(ctx["prompts"]) for _ in range(cfg.batch_size)]
    x_T = torch.randn(backend.latent_shape(cfg.batch_size), generator=gen).to(backend.device)
    cond, uncond = backend.encode_prompts(batch), backend.encode_prompts([""] * cfg.batch_size)
    return Rollout(backend, batch, cond, uncond, x_T, ctx["reward"], gen), rng


def train_iteration(ctx: dict, it: int, progress: float, step: bool = True) -> dict:
    """One iteration of the training loop (plan, chain, decode, reward, backward, clip, AdamW step)."""

    from shortft import lora

    cfg, method, backend = ctx["cfg"], ctx["method"], ctx["backend"]
    sync(ctx["device"])
    t0 = time.perf_counter()
    lora.set_trainable(backend.unet, method.trainable(progress))
    ro, rng = rollout(ctx, it)
    plan = method.plan(progress, rng)
    loss, rewards, extra = method.loss(ro, plan)
    ctx["acc"].backward(loss)
    live = [p for p in ctx["params"] if p.requires_grad]
    grad_norm = float(ctx["acc"].clip_grad_norm_(live, cfg.max_grad_norm))
    if step:
        ctx["opt"].step()
    ctx["opt"].zero_grad(set_to_none=True)
    sync(ctx["device"])
    return {"seconds": time.perf_counter() - t0, "grad_norm": grad_norm, "reward": float(rewards.mean()),
            "unet_calls": extra.get("unet_calls", len(plan.steps)),
            "graph_calls": extra.get("graph_calls", plan.graph_calls), "stage": plan.info.get("stage", 0)}


def raw_chain(backend, steps, x, cond, uncond):
    """The same UNet calls as `run_plan(steps)` made by hand: the UNet module called directly, adapters
    switched only when they change, DDIM coefficients precomputed. The baseline for framework overhead."""
    import torch
    import torch.utils.checkpoint

    from shortft import lora

    unet, current = backend.unet, None
    coef = [(backend.alpha(s.t_from), backend.alpha(s.t_to)) for s in steps]
    both = torch.cat([uncond, cond])
    for s, (a, a2) in zip(steps, coef):
        if s.adapters != current:
            lora.activate(unet, s.adapters)
            current = s.adapters
        inp = x.detach() if s.grad == "detach_input" else x
        ctx = cond
        if s.guidance > 1:
            inp, ctx = torch.cat([inp, inp]), both
        t = torch.tensor(s.t_from)
        if s.grad == "none":
            with torch.no_grad():
                eps = unet(inp, t, encoder_hidden_states=ctx).sample
        elif s.grad == "checkpoint":
            eps = torch.utils.checkpoint.checkpoint(lambda i, c, t=t: unet(i, t, encoder_hidden_states=c).sample,
                                                    inp, ctx, use_reentrant=False)
        else:
            eps = unet(inp, t, encoder_hidden_states=ctx).sample
        if s.guidance > 1:
            eu, ec = eps.chunk(2)
            eps = eu + s.guidance * (ec - eu)
        # x_t' = √ᾱ' (x - √(1-ᾱ) ε)/√ᾱ + √(1-ᾱ') ε, folded into two scalars
        c1 = (a2 / a) ** 0.5
        x = c1 * x + ((1 - a2) ** 0.5 - c1 * (1 - a) ** 0.5) * eps
    return x


def time_chain(ctx: dict, steps, raw: bool, it: int = 0) -> float:
    """Seconds of one chain forward + backward of a scalar of x0 (no VAE, no reward: UNet calls only)."""
    from shortft.chain import run_plan

    backend = ctx["backend"]
    ro, _ = rollout(ctx, it)
    sync(ctx["device"])
    t0 = time.perf_counter()
    x0 = (raw_chain if raw else run_plan)(backend, steps, ro.x_T, ro.cond, ro.uncond)
    x0.float().square().mean().backward()
    sync(ctx["device"])
    dt = time.perf_counter() - t0
    ctx["opt"].zero_grad(set_to_none=True)
    for p in backend.unet.parameters():
        p.grad = None
    return dt


def peak_memory(device) -> dict:
    """Peak RSS of this process (MB) and, on a GPU, CUDA max_memory_allocated (MB)."""
    import torch

    out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# --- workers (each runs in its own process) ----------------------------------------------------------------
def worker_method(spec: dict) -> dict:
    """One table row: `warmup` + `iters` training iterations of one method at a fixed progress."""
    import torch

    from shortft import lora

    set_threads(spec["threads"])
    ctx = build_context(spec["overrides"], spec["preset"])
    loaded = peak_memory(ctx["device"])
    if ctx["device"].type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    its = [train_iteration(ctx, i, spec["progress"]) for i in range(spec["warmup"] + spec["iters"])]
    peak = peak_memory(ctx["device"])
    timed = its[spec["warmup"]:]
    # framework overhead of this method's plan: engine vs hand-made calls, interleaved
    lora.set_trainable(ctx["backend"].unet, ctx["method"].trainable(spec["progress"]))
    ro, rng = rollout(ctx, 0)
    steps = ctx["method"].plan(spec["progress"], rng).steps
    engine, raw = [], []
    for r in range(spec["overhead_reps"]):
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
    lora.set_trainable(ctx["backend"].unet, ctx["method"].adapter_names() + full.adapter_names())
    import random

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
    from shortft.methods import METHODS

    set_threads(spec["threads"])
    out = {}
    for n in spec["lengths"]:
        for name in spec["methods"]:
            ctx = build_context({**spec["overrides"], "method": name, "num_steps": n, **chain_scaled(n)},
                                spec["preset"])
            norms = []
            for r in range(spec["rollouts"]):
                lora.set_trainable(ctx["backend"].unet, ctx["method"].trainable(0.0))
                ro, rng = rollout(ctx, r)
                loss, _, _ = ctx["method"].loss(ro, ctx["method"].plan(0.0, rng))
                loss.backward()
                live = [p for p in ctx["params"] if p.grad is not None]
                norms.append(float(torch.nn.utils.clip_grad_norm_(live, float("inf"))))
                ctx["opt"].zero_grad(set_to_none=True)
            out[f"{name}@{n}"] = norms
            del ctx
    assert METHODS  # the names above are METHODS keys, validated by build_config
    return out


# --- the command ---------------------------------------------------------------------------------------------
def add_parser(bsub) -> None:
    p = bsub.add_parser("efficiency", help="per-method cost of one iteration -> docs/efficiency.md",
                        description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="world | tiny | small | a diffusers folder "
                   "(default: world if its assets exist, else small)")
    p.add_argument("--shortcut", default="", help="shortcut LoRA file (for a diffusers folder)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the original chain")
    p.add_argument("--batch", type=int, default=2, help="prompts per rollout")
    p.add_argument("--iters", type=int, default=4, help="timed iterations per method (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--reps", type=int, default=5, help="repetitions of the chain-vs-raw timings")
    p.add_argument("--lengths", default="10,20,50", help="chain lengths for the gradient-norm growth table")
    p.add_argument("--grad-rollouts", type=int, default=4, help="rollouts per gradient-norm measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (0 = torch's default)")
    p.add_argument("--reward", default="symmetry", help="reward used for the iterations (cheap by default)")
    p.add_argument("--rows", default="", help="comma-separated row labels to run (default: all)")
    p.add_argument("--out", default="docs/efficiency.md", help="markdown report to write")
    p.add_argument("--workdir", default="runs/bench/efficiency", help="worker specs, logs and raw JSON")
    p.set_defaults(func=run)


def default_model() -> str:
    from shortft.world import WORLD_MODEL, WORLD_SHORTCUT

    return "world" if (WORLD_MODEL / "unet").is_dir() and WORLD_SHORTCUT.is_file() else "small"


def run(args) -> int:
    import shlex
    import sys

    workdir = Path(args.workdir)
    model_name = args.model or default_model()
    spec = prepare_model(model_name, workdir, args.shortcut)
    base = dict(model=spec.model, shortcut=spec.shortcut, prompts=spec.prompts, eval_prompts=spec.eval_prompts,
                reward=args.reward, num_steps=args.steps, batch_size=args.batch, **chain_scaled(args.steps))
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows.split(",")]
    results = {}
    for label, method, over, progress in rows:
        print(f"bench efficiency: {label} ...", flush=True)
        results[label] = run_worker("efficiency_method", {
            "tag": label.replace(" ", "_").replace("(", "").replace(")", "").replace("/", ""),
            "overrides": {**base, **over, "method": method}, "preset": spec.preset, "progress": progress, "threads": args.threads,
            "warmup": args.warmup, "iters": args.iters, "overhead_reps": max(2, args.reps // 2)}, workdir)
    print("bench efficiency: shortft vs full chain ...", flush=True)
    ratio = run_worker("efficiency_ratio", {"tag": "ratio", "overrides": base, "preset": spec.preset, "threads": args.threads,
                                            "reps": args.reps}, workdir)
    print("bench efficiency: gradient norm vs chain length ...", flush=True)
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    grads = run_worker("efficiency_gradlen", {"tag": "gradlen", "overrides": base, "preset": spec.preset, "threads": args.threads,
                                              "lengths": lengths, "methods": ["full", "shortft", "draft-lv"],
                                              "rollouts": args.grad_rollouts}, workdir)
    command = "shortft bench efficiency " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if sys.argv[1:2] == [
        "bench"] else "shortft bench efficiency"
    text = report(spec, args, results, ratio, grads, lengths, command.strip())
    (workdir / "results.json").write_text(json.dumps({"rows": results, "ratio": ratio, "grads": grads}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


def fmt(x: float, nd: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


def sig(x: float) -> str:
    """Three significant digits: gradient norms span orders of magnitude."""
    return "n/a" if x != x else f"{x:.3g}"


def report(spec: ModelSpec, args, results: dict, ratio: dict, grads: dict, lengths: list[int], command: str) -> str:
    """The markdown of docs/efficiency.md."""
    gpu = any("cuda_mb" in r["peak"] for r in results.values())
    lines = ["# Efficiency: one training iteration per method", "",
             f"Written by `{command}` on {now()}.", "",
             f"Machine: {machine()}. Torch threads per worker: {args.threads or 'default'}.", "",
             f"Model: {spec.label}; {args.steps} DDIM steps, batch {args.batch}, reward `{args.reward}`, the "
             "default config otherwise (same for every method). Each row ran in its own process: "
             f"{args.warmup} warm-up iteration(s), then the median of {args.iters}. Seconds per iteration "
             "include the whole training iteration (plan, chain, VAE decode, reward, backward, clipping, AdamW).",
             "", "Peak memory is the process's peak RSS after the iterations; 'over load' subtracts the peak "
             "right after the model was loaded (what the iterations themselves added)." +
             (" CUDA columns are torch.cuda.max_memory_allocated." if gpu else ""), "",
             "The chain columns time the chain alone (UNet calls and DDIM updates, forward + backward of a "
             "scalar of x0, no VAE or reward): `engine` through `run_plan`, `raw` the same calls made by hand "
             "(`raw_chain`); overhead = engine / raw - 1 (median of interleaved repetitions).", "",
             "| method | UNet calls / it | in graph | s / it | peak RSS MB | over load MB |"
             + (" CUDA peak MB |" if gpu else "") + " grad norm median [min, max] | chain engine s | chain raw s"
             " | overhead |",
             "|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|---|---|---|"]
    for label, r in results.items():
        g = r["grad_norm"]
        over = r["engine_s"] / r["raw_s"] - 1 if r["raw_s"] > 0 else float("nan")
        lines.append(
            f"| {label} | {r['unet_calls']} | {r['graph_calls']} | {fmt(r['seconds_median'], 2)} | "
            f"{r['peak']['rss_mb']:.0f} | {r['peak']['rss_mb'] - r['loaded']['rss_mb']:.0f} | "
            + (f"{r['peak'].get('cuda_mb', float('nan')):.0f} | " if gpu else "")
            + f"{sig(g['median'])} [{sig(g['min'])}, {sig(g['max'])}] | {fmt(r['engine_s'], 2)} | "
            f"{fmt(r['raw_s'], 2)} | {over * 100:+.1f}% |")
    m = ratio["median"]
    r_raw, r_eng = m["short_raw"] / m["full_raw"], m["short_engine"] / m["full_engine"]
    o_short, o_full = m["short_engine"] / m["short_raw"] - 1, m["full_engine"] / m["full_raw"] - 1
    overs = [r["engine_s"] / r["raw_s"] - 1 for r in results.values() if r["raw_s"] > 0]
    lines = lines[:4] + [
        "## Against issue 2's targets", "",
        f"- ShortFT's raw stage-1 chain ({ratio['short_calls']} calls) costs **{r_raw:.2f}x** the raw "
        f"checkpointed full chain ({ratio['full_calls']} calls; target: about 0.25); through the engine **{r_eng:.2f}x**.",
        f"- Framework overhead (engine vs the same UNet calls by hand): **{o_short * 100:+.1f}%** on ShortFT's "
        f"chain and **{o_full * 100:+.1f}%** on the full chain in the interleaved comparison (target: under "
        f"10%); per method below: median {median(overs) * 100:+.1f}%, range {min(overs) * 100:+.1f}% to "
        f"{max(overs) * 100:+.1f}%" + (" (fewer repetitions, each row in its own process: noisier)." if overs
                                       else "."), ""] + lines[4:]
    lines += ["", "## ShortFT's stage-1 chain vs the full checkpointed chain (same process, interleaved)", "",
              f"ShortFT stage 1: {ratio['short_calls']} UNet calls, {ratio['short_graph']} in the graph; full: "
              f"{ratio['full_calls']} calls, all checkpointed. Median of {args.reps} repetitions, forward + "
              "backward of the chain only.", "",
              "| | ShortFT s | full s | ShortFT / full |", "|---|---|---|---|",
              f"| raw UNet calls | {fmt(m['short_raw'])} | {fmt(m['full_raw'])} | {r_raw:.3f} |",
              f"| chain engine | {fmt(m['short_engine'])} | {fmt(m['full_engine'])} | {r_eng:.3f} |",
              f"| engine overhead | {o_short * 100:+.1f}% | {o_full * 100:+.1f}% | |", ""]
    lines += ["## Gradient norm as the chain grows (at initialisation, before clipping)", "",
              f"Norm of the gradient of the loss (-mean reward) w.r.t. the trainable LoRA parameters, "
              f"{args.grad_rollouts} rollouts each (same prompts and noise across methods): median [min, max].",
              "", "| chain length | " + " | ".join(["full backprop", "shortft (stage 1)", "draft-lv"]) + " |",
              "|---|---|---|---|"]
    for n in lengths:
        cells = []
        for name in ("full", "shortft", "draft-lv"):
            v = grads.get(f"{name}@{n}", [])
            cells.append(f"{sig(median(v))} [{sig(min(v))}, {sig(max(v))}]" if v else "n/a")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)

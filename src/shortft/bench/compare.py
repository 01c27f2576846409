"""`shortft bench compare`: every method x reward x seed at an equal budget, scored on held-out prompts.

Two budget kinds, run separately: the same wall-clock seconds of training (`time_budget`) and the same
number of UNet calls in rollouts (`unet_call_budget`). Every run uses the same config (learning rate,
rank, batch, guidance, ...) apart from the method; nothing is tuned per method. After training, the final
LoRAs sample the held-out prompts with fixed seeds along the inference chain (the original 50 steps) and
the images are scored with every available reward, the world evaluator's prompt fidelity, the symmetry
metric and the JPEG size. The base model (no fine-tuning) is scored the same way.

Runs are interleaved (variant innermost, its order rotated per seed) inside one worker process per seed,
so drifting machine load hits every method alike and one process's warm-up is paid once.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from shortft.bench import ModelSpec, chain_scaled, machine, median, now, prepare_model, run_worker, set_threads

# name -> (method, config overrides). Table 1 rows, then Table 3's ablations, then Table 2's variant.
VARIANTS: dict[str, tuple[str, dict]] = {
    "shortft": ("shortft", {}),
    "draft-lv": ("draft-lv", {}),
    "drtune": ("drtune", {}),
    "alignprop": ("alignprop", {}),
    "draft-k": ("draft", {}),  # K = the config's draft_k (default 1)
    "refl": ("refl", {}),
    "full": ("full", {}),
    "shortft-no-tlora": ("shortft", {"tlora": False}),
    "shortft-no-progressive": ("shortft", {"progressive": False}),
    "shortcut-ft": ("shortcut-ft", {}),
}
TABLE1 = ["shortft", "draft-lv", "drtune", "alignprop", "draft-k", "refl", "full"]
ABLATIONS = ["shortft", "shortft-no-tlora", "shortft-no-progressive"]
TABLE2 = ["shortft", "shortcut-ft"]
WANTED_REWARDS = ("world_clip", "symmetry", "compressibility")  # issue 6's three rewards

# Presets. Budgets are per run. `curve` adds runs at these fractions of the time budget (first reward only)
# for the held-out-reward-vs-wall-clock plot; the base model is its point at 0 s. Sizes are set by what fits
# on 2 idle CPU cores: a run costs its budget plus ~9 s of fixed work (model loads, train's own before/after
# evaluation, saving, the held-out evaluation of 8 images), about 12 s for a 3-s run. So --quick keeps every
# row of Tables 1-3 and 3 seeds on one reward and one budget kind (32 runs with the untuned-shortcut row); --full runs all three rewards and
# both budget kinds (181 runs). These budgets give each method only a few optimiser steps: they test the
# harness and the accounting; a comparison worth reading needs a larger --time-budget (see docs/RESULTS.md).
PRESETS = {
    "quick": dict(variants=list(VARIANTS), rewards=list(WANTED_REWARDS), max_rewards=1, seeds=3, budgets=["time"],
                  time_budget=3.0, call_budget=120, curve=[], eval_n=8, batch_size=2),
    "full": dict(variants=list(VARIANTS), rewards=list(WANTED_REWARDS), max_rewards=None, seeds=3, budgets=["time", "calls"],
                 time_budget=6.0, call_budget=200, curve=[], eval_n=8, batch_size=2),
}


# --- evaluation ----------------------------------------------------------------------------------------------
def score_images(images, prompts: list[str], rewards: dict, world: bool) -> dict:
    """Every held-out metric of one set of images (means over images)."""
    import torch

    from shortft.rewards.jpeg import jpeg_size_kb
    from shortft.rewards.symmetry import asymmetry

    out = {}
    with torch.no_grad():
        for name, fn in rewards.items():
            out[f"reward:{name}"] = float(fn(images, prompts).float().mean())
    out["asymmetry"] = float(asymmetry(images).mean())
    out["jpeg_kb"] = float(jpeg_size_kb(images).float().mean())  # the real PIL file size, quality 95
    if world:
        from shortft.world.evaluator import prompt_fidelity

        out["fidelity"] = float(prompt_fidelity(images, prompts)["mean"])
    return out


def build_rewards(names: list[str]) -> tuple[dict, dict]:
    """Reward functions for evaluation; names that fail to build are returned with their error."""
    from shortft.rewards import RewardSettings, build_reward

    built, missing = {}, {}
    for name in names:
        try:
            built[name] = build_reward(name, RewardSettings(device="cpu"))
        except Exception as err:  # an asset not landed yet, an unregistered name: report, do not stop
            missing[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return built, missing


def available_rewards(names: list[str]) -> tuple[list[str], dict]:
    """The wanted rewards that are registered and build here, and why the others are missing."""
    built, missing = build_rewards(names)
    return [n for n in names if n in built], missing


# --- the worker: one seed's runs, interleaved --------------------------------------------------------------
def run_config(common: dict, run: dict) -> dict:
    """Config overrides of one run: the shared settings, the variant's method, the budget."""
    method, over = VARIANTS[run["variant"]]
    budget = {"time_budget": float(run["budget"])} if run["kind"] == "time" else {"unet_call_budget": int(run["budget"])}
    return {**common, **over, "method": method, "reward": run["reward"], "seed": run["seed"], **budget,
            "run_dir": run["run_dir"], "max_steps": 10**6, "eval_count": 1, "checkpoint_every": 10**6,
            "grid_every": 0}


def worker_group(spec: dict) -> list[dict]:
    """Train and evaluate `spec['runs']` in order in this process; the base model row when variant=base."""
    import torch

    from shortft.backends import SDBackend
    from shortft.chain import sampling_plan
    from shortft.config import build_config
    from shortft.methods import METHODS
    from shortft.prompts import load_prompts
    from shortft.sample import generate, load_run
    from shortft.train import train

    set_threads(spec["threads"])
    torch.manual_seed(0)
    common, world, preset = spec["common"], spec["common"]["model"] == "world", spec["preset"]
    rewards, _ = build_rewards(spec["rewards"])
    prompts = load_prompts(common["eval_prompts"])[: spec["eval_n"]]
    seeds = list(range(1000, 1000 + len(prompts)))  # fixed evaluation noise, distinct from training draws
    warm(common, preset)
    results = []
    for run in spec["runs"]:
        t0 = time.perf_counter()
        if run["variant"] == "base":
            cfg = build_config(preset, overrides={**common, "method": "draft"})
            backend = SDBackend.load(cfg.model)
            plan = sampling_plan(backend.timesteps(cfg.num_steps), lambda i: (), cfg.guidance)
            history = []
        elif run["variant"] == "base-shortcut":  # shortcut-ft before its first step: its fresh LoRA is zero,
            cfg = build_config(preset, overrides={**common, "method": "shortcut-ft"})  # so this samples the
            # untuned shortcut model on its own few-step chain
            backend = SDBackend.load(cfg.model)
            method = METHODS[cfg.method](cfg)
            method.setup(backend)
            plan = method.sample_plan()
            history = []
        else:
            run_dir = train(build_config(preset, overrides=run_config(common, run))).dir
            backend, method, cfg = load_run(run_dir)
            plan = method.sample_plan()
            history = json.loads((run_dir / "history.json").read_text())
        images = generate(backend, plan, prompts, seeds)
        results.append({**run, "metrics": score_images(images, prompts, rewards, world), "history": history,
                        "wall_s": time.perf_counter() - t0})
        print(f"bench compare: {run['variant']} {run['reward']} seed {run['seed']} {run['kind']}={run['budget']}: "
              f"{len(history)} steps, {results[-1]['metrics']}", flush=True)
        del backend
    return results


def warm(common: dict, preset: str | None) -> None:
    """Pay one-off costs (kernel selection, lazy imports) before the first timed run."""
    import torch

    from shortft.backends import SDBackend
    from shortft.config import build_config

    cfg = build_config(preset, overrides={**common, "method": "draft"})
    backend = SDBackend.load(cfg.model)
    x = torch.randn(backend.latent_shape(1), requires_grad=True)
    cond = backend.encode_prompts(["warm-up"])
    for _ in range(2):
        backend.decode(backend.model_eps(x, 500, cond)).mean().backward()


# --- planning and the command ----------------------------------------------------------------------------
def plan_runs(variants: list[str], rewards: list[str], seeds: int, budgets: list[str], time_budget: float,
              call_budget: int, curve: list[float], root: Path) -> list[list[dict]]:
    """One list of runs per seed (worker process); the first list also holds the base-model rows."""
    groups = []
    for seed in range(seeds):
        order = variants[seed % len(variants):] + variants[: seed % len(variants)]  # rotate the position
        runs = []
        for reward in rewards:
            todo = [(k, time_budget if k == "time" else call_budget) for k in budgets]
            if reward == rewards[0]:
                todo += [("time", round(time_budget * f, 3)) for f in curve]
            for kind, budget in todo:
                for v in order:
                    runs.append({"variant": v, "reward": reward, "seed": seed, "kind": kind, "budget": budget,
                                 "run_dir": str(root / "runs" / f"{v}-{reward}-s{seed}-{kind}{budget}")})
        groups.append(runs)
    bases = ["base"] + (["base-shortcut"] if "shortcut-ft" in variants else [])
    groups[0] = [{"variant": b, "reward": "-", "seed": 0, "kind": "-", "budget": 0} for b in bases] + groups[0]
    return groups


def add_parser(bsub) -> None:
    p = bsub.add_parser("compare", help="methods x rewards x seeds at equal budgets -> docs/RESULTS.md",
                        description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="every variant, the first reward, 3 seeds, a 3-s time budget (32 runs, 6.3 min measured on 2 idle CPU cores)")
    g.add_argument("--full", dest="preset", action="store_const", const="full",
                   help="every variant and reward, 3 seeds, 6 s and 200 UNet calls (181 runs, 52.3 min measured on 2 idle CPU cores)")
    p.add_argument("--model", default="world", help="world | tiny | small | a diffusers folder")
    p.add_argument("--shortcut", default="", help="shortcut LoRA file (default: the model's own)")
    p.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--rewards", default=None, help="comma-separated reward names (default: the issue's three; "
                   "--quick keeps the first that is available)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training per run")
    p.add_argument("--call-budget", type=int, default=None, help="UNet calls of training per run")
    p.add_argument("--budgets", default=None, help="which budget kinds: time,calls")
    p.add_argument("--curve", default=None, help="extra fractions of the time budget for the curve, e.g. 0.5")
    p.add_argument("--eval-n", type=int, default=None, help="held-out prompts (one fixed seed each)")
    p.add_argument("--batch", type=int, default=None, help="prompts per rollout (every method)")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="config overrides applied to every method alike, e.g. lr=1e-3")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = torch's default, every "
                   "core); 1 avoids oversubscription stalls on a shared machine")
    p.add_argument("--out", default="docs/RESULTS.md", help="markdown report (figures go beside it)")
    p.add_argument("--workdir", default="runs/bench/compare", help="run folders, logs, raw JSON")
    p.set_defaults(func=run, preset=None)


def settings(args) -> dict:
    """Preset (default quick) with command-line values on top."""
    s = dict(PRESETS[args.preset or "quick"])
    for key, conv in (("variants", lambda v: v.split(",")), ("rewards", lambda v: v.split(",")),
                      ("seeds", int), ("time_budget", float), ("call_budget", int),
                      ("budgets", lambda v: v.split(",")), ("curve", lambda v: [float(x) for x in v.split(",") if x]),
                      ("eval_n", int), ("batch", int)):
        value = getattr(args, key)
        if value is not None:
            s["batch_size" if key == "batch" else key] = conv(value)
            if key == "rewards":
                s["max_rewards"] = None  # named on the command line: all of them
    bad = [v for v in s["variants"] if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    bad = [b for b in s["budgets"] if b not in ("time", "calls")]
    if bad:
        raise ValueError(f"unknown budget kind(s) {bad}; choose from time, calls")
    return s


def run(args) -> int:
    from shortft.config import TrainConfig, build_config, parse_overrides

    t_start = time.time()
    s = settings(args)
    root = Path(args.workdir)
    spec = prepare_model(args.model, root, args.shortcut)
    rewards, missing = available_rewards(s["rewards"])
    if not rewards:
        raise ValueError(f"none of the rewards {s['rewards']} is available: {missing}")
    skipped = rewards[s["max_rewards"]:] if s.get("max_rewards") else []
    rewards = [r for r in rewards if r not in skipped]
    extra = parse_overrides(TrainConfig, args.set)
    common = {"model": spec.model, "shortcut": spec.shortcut, "prompts": spec.prompts,
              "eval_prompts": spec.eval_prompts, "batch_size": s["batch_size"], "reward": rewards[0],
              **chain_scaled(extra.get("num_steps", 50)), **extra}
    build_config(spec.preset, overrides={**common, "method": "shortft"})  # fail early on a bad --set
    groups = plan_runs(s["variants"], rewards, s["seeds"], s["budgets"], s["time_budget"], s["call_budget"],
                       s["curve"], root)
    print(f"bench compare: {sum(len(g) for g in groups)} runs in {len(groups)} worker(s); rewards {rewards}"
          + (f"; missing {sorted(missing)}" if missing else ""), flush=True)
    results = []
    for i, runs in enumerate(groups):
        results += run_worker("compare_group", {"tag": f"seed{i}", "common": common, "runs": runs,
                                                "rewards": rewards, "eval_n": s["eval_n"], "preset": spec.preset,
                                                "threads": args.threads}, root / "workers")
    (root / "results.json").write_text(json.dumps({"settings": s, "common": common, "results": results}))
    command = "shortft bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] \
        else "shortft bench compare"
    out = Path(args.out)
    figs = plots(results, rewards, s, out.parent / "figures", out.stem)
    out.write_text(report(results, rewards, missing, s, spec, common, args, command, figs, out.parent,
                          time.time() - t_start, skipped))
    print(f"wrote {out} ({(time.time() - t_start) / 60:.1f} min)")
    return 0


# --- aggregation ---------------------------------------------------------------------------------------------
def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, sd


def summarise(results: list[dict], variant: str, reward: str, kind: str, budget: float) -> dict:
    """Mean +- std over seeds of every metric, plus efficiency columns, for one table cell group."""
    rs = [r for r in results if r["variant"] == variant and r["reward"] == reward and r["kind"] == kind
          and r["budget"] == budget]
    out = {"n": len(rs)}
    if not rs:
        return out
    for key in rs[0]["metrics"]:
        out[key] = mean_std([r["metrics"][key] for r in rs])
    hs = [r["history"] for r in rs if r["history"]]
    out["steps"] = mean_std([len(h) for h in hs])
    out["train_s"] = mean_std([sum(x["seconds"] for x in h) for h in hs])
    out["calls"] = mean_std([h[-1]["unet_calls"] for h in hs])
    out["s_it"] = median([median([x["seconds"] for x in h]) for h in hs])
    out["graph"] = median([sum(x["graph_calls"] for x in h) / len(h) for h in hs])
    return out


def pm(ms: tuple[float, float], nd: int = 3) -> str:
    m, sd = ms
    return "n/a" if m != m else f"{m:.{nd}f} ± {sd:.{nd}f}"


def budget_text(s: dict) -> str:
    """The budget kinds this report ran, in words."""
    parts = {"time": f"{s['time_budget']} s of training (time)", "calls": f"{s['call_budget']} UNet calls in rollouts "
             "(calls)"}
    text = " and ".join(parts[k] for k in s["budgets"])
    return text + (", run separately" if len(s["budgets"]) > 1 else "")


# --- figures -------------------------------------------------------------------------------------------------
def plots(results: list[dict], rewards: list[str], s: dict, folder: Path, stem: str = "RESULTS") -> dict:
    """PNG figures: held-out reward vs wall-clock budget per method (first reward); training reward vs
    cumulative training seconds per method (every reward, time budget). File names start with the report's
    stem, so reports written side by side keep their own figures. Returns {title: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figs = {}
    start = {r["variant"]: r for r in results if r["variant"] in ("base", "base-shortcut")}
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(VARIANTS)}
    r0 = rewards[0]
    budgets = sorted({r["budget"] for r in results if r["kind"] == "time" and r["reward"] == r0})
    if budgets:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for v in s["variants"]:
            xs, ms, sds = [], [], []
            base = start.get("base-shortcut" if v == "shortcut-ft" else "base")  # shortcut-ft's own chain
            if base:
                xs.append(0.0)
                ms.append(base["metrics"][f"reward:{r0}"])
                sds.append(0.0)
            for b in budgets:
                m, sd = mean_std([r["metrics"][f"reward:{r0}"] for r in results if r["variant"] == v
                                  and r["reward"] == r0 and r["kind"] == "time" and r["budget"] == b])
                if m == m:
                    xs.append(b)
                    ms.append(m)
                    sds.append(sd)
            ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=v, color=colours[v],
                        linestyle="--" if v in ("shortft-no-tlora", "shortft-no-progressive", "shortcut-ft") else "-")
        ax.set_xlabel("training wall-clock budget (s)")
        ax.set_ylabel(f"held-out {r0} (mean ± std over seeds)")
        ax.set_title(f"held-out {r0} vs wall-clock")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = folder / f"{stem}_heldout_{r0}_vs_time.png"
        fig.savefig(path)
        plt.close(fig)
        figs[f"held-out {r0} vs training wall-clock (budget 0 = the untuned model; for shortcut-ft the shortcut model on its own chain)"] = path
    for reward in rewards:
        runs = [r for r in results if r["reward"] == reward and r["kind"] == "time" and r["history"]
                and r["budget"] == s["time_budget"]]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        seen = set()
        for r in runs:
            t, acc = [], 0.0
            for h in r["history"]:
                acc += h["seconds"]
                t.append(acc)
            ys = [h["reward"] for h in r["history"]]
            w = max(1, len(ys) // 5)
            ys = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            ax.plot(t, ys, color=colours[r["variant"]], alpha=0.8, lw=1,
                    label=None if r["variant"] in seen else r["variant"])
            seen.add(r["variant"])
        ax.set_xlabel("cumulative training seconds")
        ax.set_ylabel(f"training {reward} (running mean)")
        ax.set_title(f"training {reward} vs wall-clock (each seed a line)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = folder / f"{stem}_train_{reward}_vs_time.png"
        fig.savefig(path)
        plt.close(fig)
        figs[f"training {reward} vs wall-clock"] = path
    return figs


# --- the report ----------------------------------------------------------------------------------------------
def verdicts(results: list[dict], rewards: list[str], s: dict) -> list[str]:
    """Plain statements read off the tables: the winner of each comparison, and whether its margin exceeds
    the seed spread (difference of means vs the larger of the two stds)."""
    lines = []

    def cmp(a: str, b: str, reward: str, kind: str, budget) -> str | None:
        sa, sb = summarise(results, a, reward, kind, budget), summarise(results, b, reward, kind, budget)
        key = f"reward:{reward}"
        if key not in sa or key not in sb:
            return None
        (ma, da), (mb, db) = sa[key], sb[key]
        d = ma - mb
        if d == 0:
            return f"neither ({pm(sa[key])} both)"
        win, lose = (a, b) if d > 0 else (b, a)
        sw, sl = (sa, sb) if d > 0 else (sb, sa)
        clear = abs(d) > max(da, db)
        return (f"{win} by {abs(d):.3g} ({pm(sw[key])} vs {lose} {pm(sl[key])})"
                + ("" if clear else "; within the seed spread (difference <= the larger std)"))

    for kind in s["budgets"]:
        budget = s["time_budget"] if kind == "time" else s["call_budget"]
        unit = "s" if kind == "time" else "UNet calls"
        for reward in rewards:
            rows = [(v, summarise(results, v, reward, kind, budget)) for v in s["variants"]]
            rows = [(v, x) for v, x in rows if f"reward:{reward}" in x]
            if not rows:
                continue
            best = max(rows, key=lambda vx: vx[1][f"reward:{reward}"][0])
            lines.append(f"- **{reward}, {budget} {unit}**: best held-out reward: **{best[0]}** "
                         f"({pm(best[1][f'reward:{reward}'])}).")
            for other in ("draft-lv", "drtune", "full", "shortft-no-tlora", "shortft-no-progressive", "shortcut-ft"):
                if "shortft" in s["variants"] and other in s["variants"]:
                    c = cmp("shortft", other, reward, kind, budget)
                    if c:
                        lines.append(f"  - shortft vs {other}: higher is {c}.")
    return lines


def table(results: list[dict], variants: list[str], reward: str, kind: str, budget, rewards: list[str],
          world: bool, bases: list[tuple[str, dict | None]] = ()) -> list[str]:
    head = ["method", f"held-out {reward} ↑"] + [f"{r} ↑" for r in rewards if r != reward] + \
           (["fidelity ↑"] if world else []) + ["asymmetry ↓", "JPEG kB", "steps", "s/it", "UNet calls",
                                                "graph calls/it", "train s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, base in bases:
        if base is None:
            continue
        m = base["metrics"]
        cells = [label, f"{m[f'reward:{reward}']:.3f}"] + \
                [f"{m[f'reward:{r}']:.3f}" for r in rewards if r != reward] + \
                ([f"{m['fidelity']:.3f}"] if world else []) + \
                [f"{m['asymmetry']:.3f}", f"{m['jpeg_kb']:.2f}", "0", "", "0", "", "0", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for v in variants:
        x = summarise(results, v, reward, kind, budget)
        if not x.get("n"):
            continue
        cells = [v, pm(x[f"reward:{reward}"])] + [pm(x[f"reward:{r}"]) for r in rewards if r != reward] + \
                ([pm(x["fidelity"])] if world else []) + \
                [pm(x["asymmetry"]), pm(x["jpeg_kb"], 2), f"{x['steps'][0]:.1f}", f"{x['s_it']:.2f}",
                 f"{x['calls'][0]:.0f}", f"{x['graph']:.1f}", f"{x['train_s'][0]:.1f}", str(x["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(results, rewards, missing, s, spec: ModelSpec, common, args, command, figs, out_dir: Path,
           seconds: float, skipped: list[str] = ()) -> str:
    world = spec.model == "world"
    base = next((r for r in results if r["variant"] == "base"), None)
    base_sc = next((r for r in results if r["variant"] == "base-shortcut"), None)
    lines = ["# Results: ShortFT and its baselines at equal compute on the embedded world"
             if world else f"# Results: ShortFT and its baselines at equal compute ({spec.label})", "",
             f"Written by `{command}` on {now()} in {seconds / 60:.1f} minutes.", "",
             f"Machine: {machine()}; torch threads per worker: {args.threads or 'default'}.", "",
             f"Model: {spec.label}; shortcut `{spec.shortcut}`; training prompts `{spec.prompts}`, "
             f"held-out prompts `{spec.eval_prompts}` (first {s['eval_n']}, one fixed seed each).", "",
             f"Rewards: {', '.join(f'`{r}`' for r in rewards)}."
             + (" Missing: " + "; ".join(f"`{k}` ({v})" for k, v in missing.items()) + "." if missing else "")
             + (f" Available but left out by this preset (run `--full` or `--rewards`): "
                f"{', '.join(f'`{r}`' for r in skipped)}." if skipped else ""), "",
             f"Budgets per run: {budget_text(s)}; {s['seeds']} seeds; batch {s['batch_size']}. Every method runs "
             "the same config (learning rate, LoRA rank, guidance, ...): the project defaults plus "
             f"`{common}`; nothing is tuned per method. A run stops at the first step that starts at or over "
             "its budget, so it overshoots by less than one iteration. A CFG call (batched conditional + "
             "unconditional) counts as one UNet call; ShortFT's shortcut jumps are conditional-only.", "",
             "Columns: held-out rewards are the mean over the held-out images, then mean ± std over seeds; "
             "fidelity is the world evaluator's mean attribute accuracy; asymmetry is "
             "`shortft.rewards.symmetry.asymmetry` (lower = more symmetric); JPEG kB at quality 95 (lower = "
             "more compressible); steps, s/it (median), UNet calls, graph calls per iteration and training "
             "seconds come from the runs' histories.", ""]
    if not world:
        lines += [f"**Not the embedded world.** This run used `{spec.label}`, not the trained world model: with "
                  "random weights and a random shortcut LoRA standing in for a distilled one, the numbers show "
                  "that the harness runs end to end and how the methods' costs compare; they say nothing about "
                  "the paper's claims on alignment quality.", ""]
    lines += ["## What comes out", ""]
    lines += verdicts(results, rewards, s) + [""]
    for kind in s["budgets"]:
        budget = s["time_budget"] if kind == "time" else s["call_budget"]
        title = f"{budget} s of training" if kind == "time" else f"{budget} UNet calls"
        lines += [f"## Table 1 shape: equal {'wall-clock' if kind == 'time' else 'UNet calls'} ({title})", ""]
        for reward in rewards:
            lines += [f"### trained on `{reward}`", ""] + \
                     table(results, [v for v in TABLE1 if v in s["variants"]], reward, kind, budget, rewards,
                           world, [("base (no fine-tuning)", base)]) + [""]
        lines += [f"### Table 3 shape: ablations ({title})", ""]
        for reward in rewards:
            lines += [f"trained on `{reward}`:", ""] + \
                     table(results, [v for v in ABLATIONS if v in s["variants"]], reward, kind, budget, rewards,
                           world) + [""]
        lines += [f"### Table 2 shape: fine-tune the base (shortft) vs the shortcut model (shortcut-ft) "
                  f"({title})", "", "shortft samples with the original 50-step chain; shortcut-ft samples with "
                  "the shortcut's own few-step chain, so each has its own untuned starting point (the two "
                  "base rows).", ""]
        for reward in rewards:
            lines += [f"trained on `{reward}`:", ""] + \
                     table(results, [v for v in TABLE2 if v in s["variants"]], reward, kind, budget, rewards,
                           world, [("base, 50-step chain", base),
                                   ("shortcut model, its few-step chain", base_sc)]) + [""]
    if figs:
        lines += ["## Figures", ""]
        for title, path in figs.items():
            lines += [f"{title}:", "", f"![{title}]({path.relative_to(out_dir).as_posix()})", ""]
    curve = sorted({r["budget"] for r in results if r["kind"] == "time"})
    lines += ["## Reproduce", "", f"    {command}", "",
              f"Time budgets run: {curve} s (the smaller ones only for `{rewards[0]}`, for the curve). Raw "
              f"per-run JSON (metrics and step histories): `{Path(args.workdir) / 'results.json'}`.", ""]
    return "\n".join(lines)

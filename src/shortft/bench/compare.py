"""`shortft bench compare`: every method x reward x seed at an equal budget, scored on held-out prompts.

Two budget kinds, run separately: the same wall-clock seconds of training (`time_budget`) and the same
number of UNet calls in rollouts (`unet_call_budget`). Every run uses the same config (learning rate,
rank, batch, guidance, ...) apart from the method; nothing is tuned per method. After training, the final
LoRAs sample the held-out prompts with fixed seeds along the inference chain (the original 50 steps) and
`shortft.evaluate.score_images` scores the images with every available reward, the symmetry metric, the
JPEG size and (on the world) the world evaluator's prompt fidelity. The base model (no fine-tuning) is
scored the same way.

Runs are interleaved (variant innermost, its order rotated per seed) inside one worker process per seed,
so drifting machine load hits every method alike and one process's warm-up is paid once.

An interrupted comparison continues where it stopped: each finished run's result (metrics, history, wall
time) is written atomically to WORKDIR/results/ as soon as it is known, and rerunning the same command
runs only the runs without one, then writes the report from all of them. WORKDIR/settings.json records
what the comparison runs (settings, the common config, rewards, threads); a rerun with other settings is
refused with the keys that differ, so results of two comparisons never mix: give it another --workdir.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from shortft import files
from shortft.bench import chain_scaled, command_line, prepare_model, run_worker, set_threads
from shortft.bench.compare_report import report
from shortft.bench.plots import plots
from shortft.bench.variants import BASES, VARIANTS
from shortft.errors import ConfigError

WANTED_REWARDS = ("world_clip", "symmetry", "compressibility")  # the comparison's three rewards
HELD_OUT_IMAGE_METRICS = ("asymmetry", "jpeg_kb")  # evaluate.IMAGE_METRICS scored beside the rewards

# Presets. Budgets are per run. `curve` scores every time-budget run's snapshots at these fractions of its
# budget too, for the held-out-reward-vs-wall-clock plot; the base model is its point at 0 s. A run costs its budget
# plus a fixed part (model loads, train's own before/after evaluation, saving, the held-out evaluation of
# 8 images); docs/RESULTS.md gives the measured totals. --quick keeps every row of Tables 1-3 and 3 seeds
# on one reward and one budget kind (32 runs with the untuned-shortcut row); --full runs all three rewards
# and both budget kinds (181 runs). These budgets give each method only a few optimiser steps: they test
# the harness and the accounting; a comparison worth reading needs a larger --time-budget.
PRESETS = {
    "quick": dict(variants=list(VARIANTS), rewards=list(WANTED_REWARDS), max_rewards=1, seeds=3, budgets=["time"],
                  time_budget=3.0, call_budget=120, curve=[], eval_n=8, batch_size=2),
    "full": dict(variants=list(VARIANTS), rewards=list(WANTED_REWARDS), max_rewards=None, seeds=3,
                 budgets=["time", "calls"], time_budget=6.0, call_budget=200, curve=[], eval_n=8, batch_size=2),
}


# --- rewards -------------------------------------------------------------------------------------------------
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
            "grid_every": 0, "snapshots": run.get("snapshots", [])}


def snapshot_runs(run: dict) -> list[dict]:
    """The held-out curve's points of a run: one result per snapshot fraction, named `KEY@FRACTION`, whose
    budget is that fraction of the run's."""
    return [{**run, "key": f"{run['key']}@{f:g}", "budget": round(run["budget"] * f, 3), "snapshot": f"{f:g}"}
            for f in run.get("snapshots", []) if f < 1]


def result_file(root: Path, run: dict) -> Path:
    """Where a finished run's result lives in the work folder."""
    return Path(root) / "results" / f"{run['key']}.json"


def inference_chain(run: dict, common: dict, preset: str | None):
    """(backend, plan, history) of one run: trained (its saved LoRAs, loaded back; a snapshot's when the run
    names one) or an untuned base row."""
    from shortft.backends import load_backend
    from shortft.chain import sampling_plan
    from shortft.config import build_config
    from shortft.methods import METHODS
    from shortft.sample import load_run
    from shortft.train import train

    if run["variant"] == "base":
        cfg = build_config(preset, overrides={**common, "method": "draft"})
        backend = load_backend(cfg.model)
        return backend, sampling_plan(backend.timesteps(cfg.num_steps), lambda i: (), cfg.guidance), []
    if run["variant"] == "base-shortcut":  # shortcut-ft before its first step: its fresh LoRA is zero, so
        cfg = build_config(preset, overrides={**common, "method": "shortcut-ft"})  # this samples the untuned
        backend = load_backend(cfg.model)  # shortcut model on its own few-step chain
        method = METHODS[cfg.method](cfg)
        method.setup(backend)
        return backend, method.sample_plan(), []
    if "snapshot" in run:  # trained already, with the run it belongs to
        backend, method, _ = load_run(Path(run["run_dir"]) / "snapshots" / run["snapshot"])
        return backend, method.sample_plan(), []
    shutil.rmtree(run["run_dir"], ignore_errors=True)  # what an interrupted attempt of this run left
    run_dir = train(build_config(preset, overrides=run_config(common, run))).dir
    backend, method, _ = load_run(run_dir)
    return backend, method.sample_plan(), json.loads((run_dir / "history.json").read_text())


def worker_group(spec: dict) -> list[dict]:
    """Train and score `spec['runs']` in order in this process; each result is written to the work folder
    (atomically) as soon as it is known, so an interruption loses at most the run in progress."""
    import torch

    from shortft.evaluate import IMAGE_METRICS, score_images
    from shortft.prompts import load_prompts
    from shortft.sample import generate

    set_threads(spec["threads"])
    torch.manual_seed(0)
    common, preset, world = spec["common"], spec["preset"], spec["common"]["model"] in ("world", "world-flow")
    rewards, _ = build_rewards(spec["rewards"])
    metrics = {**{f"reward:{n}": fn for n, fn in rewards.items()},
               **{n: IMAGE_METRICS[n] for n in HELD_OUT_IMAGE_METRICS}}
    prompts = load_prompts(common["eval_prompts"])[: spec["eval_n"]]
    seeds = list(range(1000, 1000 + len(prompts)))  # fixed evaluation noise, distinct from training draws
    warm(common, preset)
    results = []
    for run in [point for planned in spec["runs"] for point in (planned, *snapshot_runs(planned))]:
        t0 = time.perf_counter()
        backend, plan, history = inference_chain(run, common, preset)
        scores = score_images(generate(backend, plan, prompts, seeds), prompts, metrics, batch_size=len(prompts),
                              fidelity=world)
        held_out = {name: s["mean"] for name, s in scores["summary"].items()}
        if world and isinstance(scores["prompt_fidelity"], dict):
            held_out["fidelity"] = scores["prompt_fidelity"]["mean"]
        result = {**run, "metrics": held_out, "history": history, "wall_s": time.perf_counter() - t0}
        files.write_json(result_file(spec["root"], run), result)
        results.append(result)
        print(f"bench compare: {run['key']}: {len(history)} steps, {held_out}", flush=True)
        del backend
    return results


def warm(common: dict, preset: str | None) -> None:
    """Pay one-off costs (kernel selection, lazy imports) before the first timed run."""
    import torch

    from shortft.backends import load_backend
    from shortft.config import build_config

    cfg = build_config(preset, overrides={**common, "method": "draft"})
    backend = load_backend(cfg.model)
    x = torch.randn(backend.latent_shape(1), requires_grad=True)
    cond = backend.encode_prompts(["warm-up"])
    for _ in range(2):
        backend.decode(backend.model_output(x, backend.timesteps(2)[0], cond)).mean().backward()


# --- planning and continuing ---------------------------------------------------------------------------------
def plan_runs(variants: list[str], rewards: list[str], seeds: int, budgets: list[str], time_budget: float,
              call_budget: int, curve: list[float], root: Path) -> list[list[dict]]:
    """One list of runs per (seed, reward) (a worker process each); the first list also holds the base-model
    rows. Every run has a `key` naming it in the work folder; runs on the time budget save snapshots at the
    `curve` fractions of it, the held-out curve's points."""
    groups = []
    for seed in range(seeds):
        order = variants[seed % len(variants):] + variants[: seed % len(variants)]  # rotate the position
        for reward in rewards:
            runs = []
            for kind, budget in [(k, time_budget if k == "time" else call_budget) for k in budgets]:
                for v in order:
                    key = f"{v}-{reward}-s{seed}-{kind}{budget}"
                    runs.append({"key": key, "variant": v, "reward": reward, "seed": seed, "kind": kind,
                                 "budget": budget, "run_dir": str(Path(root) / "runs" / key),
                                 "snapshots": sorted(curve) if kind == "time" else []})
            groups.append(runs)
    bases = BASES if "shortcut-ft" in variants else BASES[:1]
    groups[0] = [{"key": b, "variant": b, "reward": "-", "seed": 0, "kind": "-", "budget": 0}
                 for b in bases] + groups[0]
    return groups


def check_settings(root: Path, current: dict) -> None:
    """Record what this comparison runs in ROOT/settings.json; refuse a work folder that holds another one."""
    from shortft.config import flatten

    path = Path(root) / "settings.json"
    if not path.is_file():
        files.write_json(path, current)
        return
    old, new = flatten(json.loads(path.read_text())), flatten(json.loads(json.dumps(current)))  # tuples -> lists
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differ:
        raise ConfigError(f"{root} holds results of another comparison (it differs in {', '.join(differ)}); rerun "
                          "with its settings to continue it, or pass another --workdir")


def run_comparison(root: Path, s: dict, common: dict, preset: str | None, rewards: list[str], threads: int,
                   runner=run_worker, jobs: int = 1) -> list[dict]:
    """Every planned run's result (and its snapshots'), in plan order: read from the work folder where an
    earlier attempt of the same comparison left it, else computed by `runner` (a worker process per group,
    `jobs` of them at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root)
    check_settings(root, {"settings": s, "common": common, "preset": preset, "rewards": rewards, "threads": threads})
    groups = plan_runs(s["variants"], rewards, s["seeds"], s["budgets"], s["time_budget"], s["call_budget"],
                       s["curve"], root)
    def finished(run: dict) -> bool:  # a run's snapshots are scored after it: the last point ends it
        return result_file(root, ([run, *snapshot_runs(run)])[-1]).is_file()

    todo = [[r for r in runs if not finished(r)] for runs in groups]
    total, left = sum(map(len, groups)), sum(map(len, todo))
    print(f"bench compare: {total} runs in {len(groups)} worker(s), {total - left} already finished in {root}; "
          f"rewards {rewards}", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for job in [pool.submit(runner, "compare_group", {
                "tag": f"group{i}", "root": str(root), "common": common, "runs": runs, "rewards": rewards,
                "eval_n": s["eval_n"], "preset": preset, "threads": threads}, root / "workers")
                for i, runs in enumerate(todo) if runs]:
            job.result()
    return [json.loads(result_file(root, p).read_text()) for runs in groups for r in runs
            for p in (r, *snapshot_runs(r))]


# --- the command ---------------------------------------------------------------------------------------------
def add_parser(bsub) -> None:
    p = bsub.add_parser("compare", help="methods x rewards x seeds at equal budgets -> docs/RESULTS.md",
                        description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="every variant, the first reward, 3 seeds, a 3-s time budget (32 runs)")
    g.add_argument("--full", dest="preset", action="store_const", const="full",
                   help="every variant and reward, 3 seeds, 6 s and 200 UNet calls (181 runs)")
    p.add_argument("--model", default="world", help="world | tiny | small | medium | a diffusers folder")
    p.add_argument("--shortcut", default="", help="shortcut LoRA file (default: the model's own)")
    p.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--rewards", default=None, help="comma-separated reward names (default: the comparison's "
                   "three; --quick keeps the first that is available)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training per run")
    p.add_argument("--call-budget", type=int, default=None, help="UNet calls of training per run")
    p.add_argument("--budgets", default=None, help="which budget kinds: time,calls")
    p.add_argument("--curve", default=None, help="fractions of the time budget at which every run's LoRAs are "
                   "also scored (snapshots): the held-out curve, e.g. 0.25,0.5")
    p.add_argument("--eval-n", type=int, default=None, help="held-out prompts (one fixed seed each)")
    p.add_argument("--batch", type=int, default=None, help="prompts per rollout (every method)")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="config overrides applied to every method alike, e.g. lr=1e-3")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = torch's default, every "
                   "core); 1 avoids oversubscription stalls on a shared machine")
    p.add_argument("--jobs", type=int, default=1, help="worker processes at a time (with --threads 1: one per core)")
    p.add_argument("--out", default="docs/RESULTS.md", help="markdown report (figures go beside it)")
    p.add_argument("--workdir", default="runs/bench/compare", help="run folders, logs, per-run results; "
                   "rerunning the same command continues an interrupted comparison from here")
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
        raise ConfigError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    bad = [b for b in s["budgets"] if b not in ("time", "calls")]
    if bad:
        raise ConfigError(f"unknown budget kind(s) {bad}; choose from time, calls")
    return s


def run(args) -> int:
    """Plan the comparison, run (or continue) it, write results.json, the figures and the report."""
    from shortft.config import TrainConfig, build_config, parse_overrides

    t_start = time.time()
    s = settings(args)
    root = Path(args.workdir)
    spec = prepare_model(args.model, root, args.shortcut)
    rewards, missing = available_rewards(s["rewards"])
    if not rewards:
        raise ConfigError(f"none of the rewards {s['rewards']} is available: {missing}")
    skipped = rewards[s["max_rewards"]:] if s.get("max_rewards") else []
    rewards = [r for r in rewards if r not in skipped]
    extra = parse_overrides(TrainConfig, args.set)
    common = {"model": spec.model, "shortcut": spec.shortcut, "prompts": spec.prompts,
              "eval_prompts": spec.eval_prompts, "batch_size": s["batch_size"], "reward": rewards[0],
              **chain_scaled(extra.get("num_steps", 50)), **spec.config, **extra}
    build_config(spec.preset, overrides={**common, "method": "shortft"})  # fail early on a bad --set
    results = run_comparison(root, s, common, spec.preset, rewards, args.threads, jobs=args.jobs)
    files.write_json(root / "results.json", {"settings": s, "common": common, "results": results}, indent=None)
    out = Path(args.out)
    figs = plots(results, rewards, s, out.parent / "figures", out.stem)
    files.write_text(out, report(results, rewards, missing, s, spec, common, args, command_line("compare"), figs,
                                 out.parent, skipped))
    print(f"wrote {out} ({(time.time() - t_start) / 60:.1f} min)")
    return 0

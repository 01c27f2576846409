"""The report of `shortft bench compare`: mean +- std over seeds per table cell, the tables of the paper's
shape (Table 1: methods; Table 3: ablations; Table 2: base vs shortcut model), plain verdicts read off
them, and the markdown of docs/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from shortft.bench import ModelSpec, machine, median, now
from shortft.bench.variants import ABLATIONS, FIDELITY, TABLE1, TABLE2
from shortft.config import build_config


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
            for other in ("draft-lv", "drtune", "full", "leapalign", "shortft-no-tlora", "shortft-no-progressive",
                          "shortcut-ft"):
                if "shortft" in s["variants"] and other in s["variants"]:
                    c = cmp("shortft", other, reward, kind, budget)
                    if c:
                        lines.append(f"  - shortft vs {other}: higher is {c}.")
    return lines


def metric_cells(fmt, reward: str, rewards: list[str], world: bool) -> list[str]:
    """The held-out metric cells of a row, `fmt(metric key, decimals)` formatting each."""
    return [fmt(f"reward:{reward}", 3)] + [fmt(f"reward:{r}", 3) for r in rewards if r != reward] + \
           ([fmt("fidelity", 3)] if world else []) + [fmt("asymmetry", 3), fmt("jpeg_kb", 2)]


def table(results: list[dict], variants: list[str], reward: str, kind: str, budget, rewards: list[str],
          world: bool, bases: list[tuple[str, dict | None]] = ()) -> list[str]:
    """One markdown table: the untuned `bases` rows (their single scores), then each variant's mean ± std."""
    head = ["method", f"held-out {reward} ↑"] + [f"{r} ↑" for r in rewards if r != reward] + \
           (["fidelity ↑"] if world else []) + ["asymmetry ↓", "JPEG kB", "steps", "s/it", "UNet calls",
                                                "graph calls/it", "train s", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, base in bases:
        if base is not None:
            m = base["metrics"]
            cells = metric_cells(lambda k, nd, m=m: f"{m[k]:.{nd}f}", reward, rewards, world)
            lines.append("| " + " | ".join([label, *cells, "0", "", "0", "", "0", "-"]) + " |")
    for v in variants:
        x = summarise(results, v, reward, kind, budget)
        if x.get("n"):
            cells = metric_cells(lambda k, nd, x=x: pm(x[k], nd), reward, rewards, world)
            cells += [f"{x['steps'][0]:.1f}", f"{x['s_it']:.2f}", f"{x['calls'][0]:.0f}", f"{x['graph']:.1f}",
                      f"{x['train_s'][0]:.1f}", str(x["n"])]
            lines.append("| " + " | ".join([v, *cells]) + " |")
    return lines


def report(results, rewards, missing, s, spec: ModelSpec, common, args, command, figs, out_dir: Path,
           skipped: list[str] = ()) -> str:
    """The markdown of docs/RESULTS.md; the same results give the same text (apart from the date)."""
    world = spec.model in ("world", "world-flow")
    base = next((r for r in results if r["variant"] == "base"), None)
    base_sc = next((r for r in results if r["variant"] == "base-shortcut"), None)
    steps = build_config(spec.preset, overrides=common).num_steps  # the original chain's length
    lines = ["# Results: ShortFT and its baselines at equal compute on the embedded world"
             if world else f"# Results: ShortFT and its baselines at equal compute ({spec.label})", "",
             f"Written by `{command}` on {now()}; the runs took {sum(r['wall_s'] for r in results) / 60:.1f} "
             "minutes (the sum of their wall-clock times).", "",
             f"Machine: {machine()}; torch threads per worker: {args.threads or 'default'}.", "",
             f"Model: {spec.label}; shortcut {f'`{spec.shortcut}`' if spec.shortcut else 'the shipped one'}; training prompts `{spec.prompts}`, "
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
                  f"({title})", "", f"shortft samples with the original {steps}-step chain; shortcut-ft samples with "
                  "the shortcut's own few-step chain, so each has its own untuned starting point (the two "
                  "base rows).", ""]
        for reward in rewards:
            lines += [f"trained on `{reward}`:", ""] + \
                     table(results, [v for v in TABLE2 if v in s["variants"]], reward, kind, budget, rewards,
                           world, [(f"base, {steps}-step chain", base),
                                   ("shortcut model, its few-step chain", base_sc)]) + [""]
        lines += [f"### Shortcut fidelity: the distilled shortcut vs the base model's own one-step jump ({title})",
                  "", "shortft-naive-jump is ShortFT with `shortcut=none`: each jump over a segment's inner steps "
                  "is one step of the base model at the chain's CFG, so the gradient travels the same short "
                  "path through a jump that lands far from the true trajectory.", ""]
        for reward in rewards:
            lines += [f"trained on `{reward}`:", ""] + \
                     table(results, [v for v in FIDELITY if v in s["variants"]], reward, kind, budget, rewards,
                           world) + [""]
    if figs:
        lines += ["## Figures", ""]
        for title, path in figs.items():
            lines += [f"{title}:", "", f"![{title}]({path.relative_to(out_dir).as_posix()})", ""]
    curve = sorted({r["budget"] for r in results if r["kind"] == "time"})
    lines += ["## Reproduce", "", f"    {command}", "",
              f"Time budgets run: {curve} s (the smaller ones only for `{rewards[0]}`, for the curve). Raw "
              f"per-run JSON (metrics and step histories): `{Path(args.workdir) / 'results'}/`, all of them in "
              f"`{Path(args.workdir) / 'results.json'}`; the same command continues an interrupted comparison.", ""]
    return "\n".join(lines)

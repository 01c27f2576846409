"""The figures of `shortft bench compare`: held-out reward against the wall-clock budget, and each run's
training reward against its cumulative training seconds."""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path

from shortft.bench.compare_report import mean_std
from shortft.bench.variants import BASES, VARIANTS
from shortft.report import axes, running_mean

PALETTE = [f"C{i}" for i in range(10)] + ["black", "navy", "gold"]  # matplotlib's tab10, then three more
COLOURS = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(VARIANTS)}  # one colour per variant in every figure
DASHED = ("shortft-no-tlora", "shortft-no-progressive", "shortcut-ft")  # ablations and Table 2's variant
FIGURE = dict(size=(7, 4.2), dpi=110, legend_size=7)


def heldout_curve(results: list[dict], reward: str, s: dict, path: Path) -> Path | None:
    """Held-out `reward` (mean ± std over seeds) against the time budget, per variant; the untuned model
    is each curve's point at 0 s (for shortcut-ft the shortcut model on its own chain). None without
    time-budget runs."""
    key = f"reward:{reward}"
    budgets = sorted({r["budget"] for r in results if r["kind"] == "time" and r["reward"] == reward})
    if not budgets:
        return None
    start = {r["variant"]: r for r in results if r["variant"] in BASES}
    with axes(path, "training wall-clock budget (s)", f"held-out {reward} (mean ± std over seeds)",
              f"held-out {reward} vs wall-clock", **FIGURE) as ax:
        for v in s["variants"]:
            base = start.get("base-shortcut" if v == "shortcut-ft" else "base")
            points = [(0.0, base["metrics"][key], 0.0)] if base else []
            for b in budgets:
                m, sd = mean_std([r["metrics"][key] for r in results if r["variant"] == v and r["reward"] == reward
                                  and r["kind"] == "time" and r["budget"] == b])
                if m == m:
                    points.append((b, m, sd))
            if points:
                xs, ms, sds = zip(*points)
                ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3, label=v, color=COLOURS[v],
                            linestyle="--" if v in DASHED else "-")
    return path


def training_curves(results: list[dict], reward: str, s: dict, path: Path) -> Path | None:
    """Training `reward` (running mean over a fifth of the steps) against cumulative training seconds,
    one line per run at the full time budget. None without such runs."""
    runs = [r for r in results if r["reward"] == reward and r["kind"] == "time" and r["history"]
            and r["budget"] == s["time_budget"]]
    if not runs:
        return None
    with axes(path, "cumulative training seconds", f"training {reward} (running mean)",
              f"training {reward} vs wall-clock (each seed a line)", **FIGURE) as ax:
        seen = set()
        for r in runs:
            t = list(accumulate(h["seconds"] for h in r["history"]))
            ys = [h["reward"] for h in r["history"]]
            ax.plot(t, running_mean(ys, max(1, len(ys) // 5)), color=COLOURS[r["variant"]], alpha=0.8, lw=1,
                    label=None if r["variant"] in seen else r["variant"])
            seen.add(r["variant"])
    return path


def plots(results: list[dict], rewards: list[str], s: dict, folder: Path, stem: str = "RESULTS") -> dict:
    """PNG figures: the held-out curve of the first reward, the training curves of every reward. File names
    start with the report's stem, so reports written side by side keep their own figures. {title: path}."""
    r0, figs = rewards[0], {}
    path = heldout_curve(results, r0, s, folder / f"{stem}_heldout_{r0}_vs_time.png")
    if path:
        figs[f"held-out {r0} vs training wall-clock (budget 0 = the untuned model; for shortcut-ft the shortcut "
             "model on its own chain)"] = path
    for reward in rewards:
        path = training_curves(results, reward, s, folder / f"{stem}_train_{reward}_vs_time.png")
        if path:
            figs[f"training {reward} vs wall-clock"] = path
    return figs

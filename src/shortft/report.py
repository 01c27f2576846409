"""What a run leaves for people to look at: the reward curve, the before/after grid, the summary; and the
two helpers every figure of the project uses (`running_mean`, `axes`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

from shortft import files


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@contextmanager
def axes(path: str | Path, xlabel: str, ylabel: str, title: str = "", size=(6, 3.5), dpi: int = 100,
         legend_size: int | None = None) -> Iterator:
    """A matplotlib Axes (Agg, no screen needed) that is labelled, given a legend and saved to `path`
    when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_curve(history: list[dict], path: Path, title: str = "") -> Path:
    """Training reward per step (and its running mean) as a PNG."""
    steps = [h["step"] for h in history]
    rewards = [h["reward"] for h in history]
    window = max(1, len(rewards) // 10)
    with axes(path, "optimiser step", "training reward", title) as ax:
        ax.plot(steps, rewards, alpha=0.35, label="per step")
        ax.plot(steps, running_mean(rewards, window), label=f"running mean ({window})")
    return path


def before_after(run_dir: Path) -> Path | None:
    """Stack the first and last eval grids with labels: same prompts and seeds, before and after."""
    grids = sorted((run_dir / "grids").glob("step-*.png"))
    if len(grids) < 2:
        return None
    a, b = Image.open(grids[0]), Image.open(grids[-1])
    label = 18
    out = Image.new("RGB", (max(a.width, b.width), a.height + b.height + 2 * label), "white")
    draw = ImageDraw.Draw(out)
    draw.text((4, 2), f"before ({grids[0].stem})", fill="black")
    out.paste(a, (0, label))
    draw.text((4, a.height + label + 2), f"after ({grids[-1].stem})", fill="black")
    out.paste(b, (0, a.height + 2 * label))
    path = run_dir / "before_after.png"
    out.save(path)
    return path


def write_summary(run_dir: Path, before: dict | None, after: dict, history: list[dict], skipped: int) -> dict:
    """summary.json: eval reward and fidelity before/after, training reward trend, speed, skipped steps."""
    secs = sorted(h["seconds"] for h in history) or [0.0]
    summary = {"before": before, "after": after,
               "train_reward_first": history[0]["reward"] if history else None,
               "train_reward_last": history[-1]["reward"] if history else None,
               "median_seconds_per_step": secs[len(secs) // 2], "steps": len(history), "skipped_steps": skipped}
    files.write_json(run_dir / "summary.json", summary)
    before_after(run_dir)
    return summary

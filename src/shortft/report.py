"""What a run leaves for people to look at: the reward curve, the before/after grid, the summary."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw


def plot_curve(history: list[dict], path: Path, title: str = "") -> Path:
    """Training reward per step (and its running mean) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    rewards = [h["reward"] for h in history]
    window = max(1, len(rewards) // 10)
    smooth = [sum(rewards[max(0, i - window + 1): i + 1]) / len(rewards[max(0, i - window + 1): i + 1])
              for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, rewards, alpha=0.35, label="per step")
    ax.plot(steps, smooth, label=f"running mean ({window})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training reward")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
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
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    before_after(run_dir)
    return summary

"""Real-size cost: what one training iteration of each method needs on a full-size architecture
(`shortft bench efficiency --arch sd15 --resolutions 128,256`).

The architecture is built offline from its published config with random weights (`shortft.bench.arch`),
with a random LoRA of the shortcut's format standing in for Hyper-SD's; time and memory do not depend on the
weights' values. Every row runs its family's preset (sd15 / sdxl / sd35: LoRA rank, chain length, CFG),
batch 1, at each resolution, in a fresh process: `--warmup` untimed iterations, then `--iters` timed ones
(seconds: their median; memory: peak RSS, or on a GPU CUDA max_memory_allocated). A row already measured in
the work folder with the same settings is not run again, so an interrupted table continues when rerun.

The native-resolution columns are estimates where the native resolution was not run: a least-squares line
in the pixel count through the measured resolutions, for the seconds and for the memory the iteration added
over the loaded model. The GPU memory estimate assumes half precision: the model's fp16 weights (the size of
its fp16 files) plus half the fp32 activation memory the CPU line predicts.
"""

from __future__ import annotations

from pathlib import Path

from shortft.bench import run_worker, slug
from shortft.errors import ConfigError

ARCH_PRESETS = {"sd15": "sd15", "sdxl": "sdxl", "sd35m": "sd35"}  # the training preset of each architecture
NATIVE = {"sd15": 512, "sdxl": 1024, "sd35m": 1024}  # the resolution each was trained at
KEY_ROWS = ("shortft (stage 1)", "full (checkpointed)", "draft (K=1)")  # the paper's efficiency comparison
GPU_GB = (24, 48, 80)


def prepare_arch(name: str, workdir: Path, divisor: int = 1) -> tuple[Path, Path, Path]:
    """(model folder, shortcut LoRA, prompt file) of architecture `name`, built once under `workdir`."""
    from shortft.bench import SYNTHETIC_PROMPTS
    from shortft.bench.arch import ARCHS, build_arch
    from shortft.testing import make_tiny_lora

    if name not in ARCHS:
        raise ConfigError(f"--arch {name!r}: choose from {', '.join(ARCHS)}")
    folder = build_arch(name, workdir / (f"arch-{name}" + (f"-d{divisor}" if divisor > 1 else "")), divisor)
    shortcut = folder / "shortcut.safetensors"
    if not shortcut.is_file():  # Hyper-SD's LoRAs: rank 64 (the shape matters, not the values)
        make_tiny_lora(folder, shortcut, rank=64 if divisor == 1 else 4, scale=0.01)
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(SYNTHETIC_PROMPTS) + "\n")
    return folder, shortcut, prompts


def fp16_weight_gb(folder: Path) -> float:
    """The model's weights in half precision (GB): the saved files are fp16."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors") if f.name != "shortcut.safetensors") / 1e9


def run_arch(args, rows: list[tuple], workdir: Path) -> dict:
    """{"arch", "resolutions", "weights_gb", "rows": {label: {str(resolution): worker result}}}."""
    resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    folder, shortcut, prompts = prepare_arch(args.arch, workdir, args.arch_divisor)
    from shortft.bench import chain_scaled
    from shortft.presets import TRAIN_PRESETS

    steps = TRAIN_PRESETS[ARCH_PRESETS[args.arch]].get("num_steps", 50)
    base = dict(model=str(folder), shortcut=str(shortcut), prompts=str(prompts), eval_prompts=str(prompts),
                reward=args.reward, batch_size=1, **chain_scaled(steps))
    out = {"arch": args.arch, "resolutions": resolutions, "weights_gb": fp16_weight_gb(folder), "rows": {}}
    for res in resolutions:
        for label, method, over, progress in rows:
            print(f"bench efficiency: {args.arch} at {res} px, {label} ...", flush=True)
            out["rows"].setdefault(label, {})[str(res)] = run_worker("efficiency_method", {
                "tag": f"{args.arch}-{res}-{slug(label)}", "preset": ARCH_PRESETS[args.arch],
                "overrides": {**base, **over, "method": method, "resolution": res}, "progress": progress,
                "warmup": args.warmup, "iters": args.iters, "overhead_reps": 0, "threads": args.threads},
                workdir, reuse=True)
    return out


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys over xs; a single point is a line through the origin."""
    if len(xs) == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def estimate(runs: dict, key, native: int) -> float:
    """`key(run)` at the native resolution: measured if it ran, else the line in the pixel count."""
    if str(native) in runs:
        return key(runs[str(native)])
    pts = sorted((int(r) ** 2, key(v)) for r, v in runs.items())
    a, b = line_fit([p for p, _ in pts], [v for _, v in pts])
    return a + b * native ** 2


def over_load(run: dict) -> float:
    """MB the iterations added over the loaded model (CUDA when it ran on a GPU)."""
    k = "cuda_mb" if "cuda_mb" in run["peak"] else "rss_mb"
    return run["peak"][k] - run["loaded"][k]


def arch_section(res: dict, command: str, when: str, where: str) -> list[str]:
    arch, rs = res["arch"], res["resolutions"]
    native = NATIVE[arch]
    gpu = any("cuda_mb" in r["peak"] for runs in res["rows"].values() for r in runs.values())
    ran = native in rs
    lines = [f"Measured by `{command}` on {when}. Machine: {where}. Architecture `{arch}` with random weights "
             f"({res['weights_gb']:.2f} GB of fp16 weights), its preset `{ARCH_PRESETS[arch]}`, batch 1 with "
             f"CFG, reward as in the command; every row and resolution in a fresh process.", "",
             f"Per resolution: seconds per iteration and the memory the iteration added over the loaded model "
             f"({'CUDA max_memory_allocated' if gpu else 'peak RSS, fp32 on a CPU'}). At {native} px: "
             + ("measured." if ran else "**estimates**, a line in the pixel count through the measured "
                "resolutions; 'GPU GB' assumes half precision (fp16 weights plus half the fp32 activations) "
                f"and 'fits' compares it with {' / '.join(map(str, GPU_GB))} GB cards."), ""]
    head = "| method | calls / it | in graph | " + " | ".join(f"{r} px s | {r} px MB" for r in rs) + \
        f" | {native} px s | {native} px GB | GPU GB | fits in |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for label, runs in res["rows"].items():
        first = next(iter(runs.values()))
        secs = estimate(runs, lambda r: r["seconds_median"], native)
        added = estimate(runs, over_load, native)
        gpu_gb = added / 1e3 if gpu else res["weights_gb"] + added / 2e3
        fits = " / ".join("yes" if gpu_gb <= g else "no" for g in GPU_GB)
        cells = " | ".join(f"{runs[str(r)]['seconds_median']:.1f} | {over_load(runs[str(r)]):.0f}"
                           if str(r) in runs else "n/a | n/a" for r in rs)
        lines.append(f"| {label} | {first['unet_calls']} | {first['graph_calls']} | {cells} | {secs:.1f} | "
                     f"{added / 1e3:.1f} | {gpu_gb:.1f} | {fits} |")
    key = [k for k in KEY_ROWS if k in res["rows"]]
    if "shortft (stage 1)" in key and "full (checkpointed)" in key:
        s, f = res["rows"]["shortft (stage 1)"], res["rows"]["full (checkpointed)"]
        ratios = [(r, s[str(r)]["seconds_median"] / f[str(r)]["seconds_median"],
                   over_load(s[str(r)]) / max(over_load(f[str(r)]), 1e-9)) for r in rs if str(r) in s and str(r) in f]
        lines += ["", "ShortFT stage 1 against full backprop (checkpointed), measured: " + "; ".join(
            f"{r} px: time {t:.2f}x, memory added {m:.2f}x" for r, t, m in ratios) + "."]
    return lines

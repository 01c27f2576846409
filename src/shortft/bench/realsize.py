"""Real-size cost: what one training iteration of each method needs on a full-size architecture
(`shortft bench efficiency --arch sd15 --resolutions 64,96`).

The architecture is built offline from its published config with random weights (`shortft.bench.arch`),
with a random LoRA of the shortcut's format standing in for Hyper-SD's; time and memory do not depend on the
weights' values. Every row runs its family's preset (sd15 / sdxl / sd35: LoRA rank, chain length, CFG),
batch 1, in a fresh process, two ways:

- measured at each of `--resolutions` on this machine: `--warmup` untimed iterations, then `--iters` timed
  ones (seconds: their median; memory: what the iterations added over the loaded model, peak RSS on a CPU or
  CUDA max_memory_allocated on a GPU). An empty list measures nothing.
- estimated at the native resolution as on a GPU (`shortft.bench.fake`): the same iteration on fake tensors in
  the family's half precision, its live-tensor peak (what CUDA max_memory_allocated counts) and its FLOPs.

A row already in the work folder with the same settings is not run again, so an interrupted table continues.
"""

from __future__ import annotations

import math
from pathlib import Path

from shortft.bench import run_worker, slug
from shortft.errors import ConfigError

ARCH_PRESETS = {"sd15": "sd15", "sdxl": "sdxl", "sd35m": "sd35"}  # the training preset of each architecture
NATIVE = {"sd15": 512, "sdxl": 1024, "sd35m": 1024}  # the resolution each was trained at
KEY_ROWS = ("shortft (stage 1)", "full (checkpointed)", "draft (K=1)")  # the paper's efficiency comparison
GPU_GB = (24, 48, 80)
CUDA_GB = 1.0  # what a CUDA process holds besides its tensors (context, library workspaces), for the fits column
FAMILY_HALF = {"sd15": "fp16", "sdxl": "fp16", "sd35m": "bf16"}  # train.HALF of each architecture's family


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
    """The model's weights in half precision (GB): 2 bytes per element of its safetensors files (which
    `build_arch` writes in fp32), the shortcut LoRA left out."""
    from safetensors import safe_open

    elements = 0
    for f in Path(folder).rglob("*.safetensors"):
        if f.name != "shortcut.safetensors":
            with safe_open(f, "pt") as sf:
                elements += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    return 2 * elements / 1e9


def run_arch(args, rows: list[tuple], workdir: Path, runner=run_worker) -> dict:
    """{"arch", "resolutions", "native", "half", "weights_gb", "rows": {label: {str(resolution): measured}},
    "estimates": {label: estimated at the native resolution}}."""
    resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    folder, shortcut, prompts = prepare_arch(args.arch, workdir, args.arch_divisor)
    from shortft.bench import chain_scaled
    from shortft.presets import TRAIN_PRESETS

    steps = TRAIN_PRESETS[ARCH_PRESETS[args.arch]].get("num_steps", 50)
    base = dict(model=str(folder), shortcut=str(shortcut), prompts=str(prompts), eval_prompts=str(prompts),
                reward=args.reward, batch_size=1, **chain_scaled(steps))
    native, half = NATIVE[args.arch], FAMILY_HALF[args.arch]
    out = {"arch": args.arch, "resolutions": resolutions, "native": native, "half": half,
           "weights_gb": fp16_weight_gb(folder), "rows": {label: {} for label, *_ in rows}, "estimates": {}}
    rows = [(label, method, {k: steps if v == "all" else v for k, v in over.items()}, progress)
            for label, method, over, progress in rows]  # draft_k "all": every step of this family's chain
    measured = [r for r in rows if not args.measure_rows or r[0] in args.measure_rows.split(",")]
    for res in resolutions:
        for label, method, over, progress in measured:
            print(f"bench efficiency: {args.arch} at {res} px, {label} ...", flush=True)
            try:
                out["rows"][label][str(res)] = runner("efficiency_method", {
                    "tag": f"{args.arch}-{res}-{slug(label)}", "preset": ARCH_PRESETS[args.arch],
                    "overrides": {**base, **over, "method": method, "resolution": res}, "progress": progress,
                    "warmup": args.warmup, "iters": args.iters, "overhead_reps": 0, "threads": args.threads},
                    workdir, reuse=True)
            except RuntimeError as err:  # a row that does not fit is a result; the other rows still run
                failed = "out of memory" if "out of memory" in str(err).lower() else "failed"
                print(f"bench efficiency: {args.arch} at {res} px, {label}: {failed} (its log is in {workdir})")
                out["rows"][label][str(res)] = {"failed": failed}
    for label, method, over, progress in rows if args.estimate else ():
        print(f"bench efficiency: {args.arch} at {native} px in {half} on fake tensors, {label} ...", flush=True)
        out["estimates"][label] = runner("efficiency_estimate", {
            "tag": f"{args.arch}-{native}-{half}-{slug(label)}", "preset": ARCH_PRESETS[args.arch],
            "overrides": {**base, **over, "method": method, "resolution": native}, "progress": progress,
            "half": half}, workdir, reuse=True)
    return out


def over_load(run: dict) -> float:
    """MB the iterations added over the loaded model (CUDA when it ran on a GPU)."""
    k = "cuda_mb" if "cuda_mb" in run["peak"] else "rss_mb"
    return run["peak"][k] - run["loaded"][k]


def fits(peak_gb: float) -> str:
    """'yes / yes / no' against GPU_GB cards, with CUDA_GB for the process besides its tensors."""
    return " / ".join("yes" if peak_gb + CUDA_GB <= g else "no" for g in GPU_GB)


def completed(runs: dict) -> dict:
    """A row's measured runs by resolution, without those that failed (out of memory)."""
    return {r: run for r, run in runs.items() if "failed" not in run}


def arch_section(res: dict, command: str, when: str, where: str) -> list[str]:
    arch, rs, native, half = res["arch"], res["resolutions"], res["native"], res["half"]
    est = res["estimates"]
    gpu = any("cuda_mb" in r.get("peak", {}) for runs in res["rows"].values() for r in runs.values())
    lines = [f"Measured by `{command}` on {when}. Machine: {where}. Architecture `{arch}` with random weights "
             f"({res['weights_gb']:.2f} GB of fp16 weights), its preset `{ARCH_PRESETS[arch]}`, batch 1 with "
             f"CFG, reward as in the command; every row in a fresh process.", ""]
    if rs:
        lines += [f"Measured at {', '.join(f'{r} px' for r in rs)}: seconds per iteration and the memory the "
                  f"iteration added over the loaded model ({'CUDA max_memory_allocated' if gpu else 'peak RSS, fp32 on a CPU'}).", ""]
    lines += [f"Estimated at {native} px as on a GPU, with no GPU (`shortft.bench.fake`): the same iteration on fake "
              f"tensors, frozen weights in {half}, LoRAs and AdamW state in fp32, the denoiser under autocast. "
              "'weights' = the frozen weights and the LoRAs; 'peak' = the most bytes of tensors alive at once in a "
              "steady iteration (weights, AdamW state, activations; what CUDA max_memory_allocated counts); "
              f"'fits' = peak + {CUDA_GB:g} GB (CUDA context) within a {' / '.join(map(str, GPU_GB))} GB card.", ""]
    head = ("| method | calls / it | in graph | " + "".join(f"{r} px s | {r} px MB | " for r in rs)
            + f"{native} px TFLOP | {native} px weights GB | {native} px peak GB | fits in |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for label, runs in res["rows"].items():
        e = est.get(label)
        ran = completed(runs)
        calls = e or next(iter(ran.values()), {"unet_calls": "n/a", "graph_calls": "n/a"})
        cells = "".join(f"{ran[str(r)]['seconds_median']:.1f} | {over_load(ran[str(r)]):.0f} | " if str(r) in ran
                        else f"{runs[str(r)]['failed']} | {runs[str(r)]['failed']} | " if str(r) in runs
                        else "n/a | n/a | " for r in rs)
        native_cells = (f"{e['tflop']:.1f} | {e['weights_bytes'] / 1e9:.1f} | {e['peak_bytes'] / 1e9:.1f} | "
                        f"{fits(e['peak_bytes'] / 1e9)}" if e else "n/a | n/a | n/a | n/a")
        lines.append(f"| {label} | {calls['unet_calls']} | {calls['graph_calls']} | {cells}{native_cells} |")
    s, f = "shortft (stage 1)", "full (checkpointed)"
    if s in res["rows"] and f in res["rows"]:
        rows_s, rows_f = completed(res["rows"][s]), completed(res["rows"][f])
        ratios = [f"{r} px: time {rows_s[str(r)]['seconds_median'] / rows_f[str(r)]['seconds_median']:.2f}x, memory "
                  f"added {over_load(rows_s[str(r)]) / max(over_load(rows_f[str(r)]), 1e-9):.2f}x"
                  for r in rs if str(r) in rows_s and str(r) in rows_f]
        if s in est and f in est:
            ratios.append(f"{native} px (estimated): FLOPs {est[s]['tflop'] / est[f]['tflop']:.2f}x, peak "
                          f"{est[s]['peak_bytes'] / est[f]['peak_bytes']:.2f}x")
        lines += ["", "ShortFT stage 1 against full backprop (checkpointed): " + "; ".join(ratios) + "."]
    others = [(name, o) for name, o in (("full backprop without checkpointing", "full (no checkpointing)"),
                                        ("DRaFT-1", "draft (K=1)")) if o in est and s in est]
    if others:
        lines += ["", f"At {native} px (estimated), ShortFT stage 1 against " + "; against ".join(
            f"{name}: FLOPs {est[s]['tflop'] / est[o]['tflop']:.2f}x, peak {est[s]['peak_bytes'] / est[o]['peak_bytes']:.2f}x"
            for name, o in others) + "."]
    return lines

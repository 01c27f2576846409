"""`shortft bench`: the paper's tables, measured side by side in one run.

    shortft bench efficiency [--model M]    UNet calls, graph calls, s/it, peak memory, gradient norms,
                                            framework overhead -> docs/efficiency.md
    shortft bench compare [--quick|--full]  every method x reward x seed at an equal wall-clock budget
                                            and an equal UNet-call budget, held-out metrics, ablations,
                                            Table 2's shape, plots -> docs/RESULTS.md

Every measured configuration runs in its own subprocess (`python -m shortft.bench WORKER spec.json`):
peak RSS (ru_maxrss) only ever grows inside a process, and one run's allocator or thread state must not
leak into the next one's timing. The parent process only plans, collects JSON and writes reports.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shortft import files
from shortft.errors import ConfigError, MissingFileError


@dataclass(frozen=True)
class Synthetic:
    """A random-weight SD-format model the benchmarks build on the spot (no download)."""

    model: dict  # make_tiny_model / make_tiny_sd3 kwargs
    config: dict = field(default_factory=dict)  # config overrides its benchmarks run with, every method alike
    family: str = "sd"  # "sd" (SD 1.5 format, shortft.testing.make_tiny_model), "sdxl" (make_tiny_sdxl) or "sd3"


SYNTHETIC = {  # "world" is the shipped model
    "tiny": Synthetic(dict(channels=(16, 32), text_dim=32, sample_size=8)),  # the test model: seconds per run
    "small": Synthetic(dict(channels=(32, 64), text_dim=64, sample_size=16)),  # a small UNet where UNet calls dominate
    # ~9 M UNet parameters: per-call costs large enough that framework overhead shows against real work
    "medium": Synthetic(dict(channels=(64, 128, 128), layers_per_block=2, text_dim=256, sample_size=8,
                             attention_head_dim=8, norm_num_groups=32),
                        config=dict(guidance=7.5, lora_rank=4, lora_alpha=4.0, lora_layers="attn")),
    # SD 3-format (rectified flow) models: "small-sd3" has about as many denoiser parameters as "small"
    "tiny-sd3": Synthetic(dict(sample_size=8, width=32, layers=1), family="sd3"),
    "small-sd3": Synthetic(dict(sample_size=16, width=64, layers=4), family="sd3"),
    # SDXL-format: "small"'s widths and latent size, with SDXL's two text encoders (2 x 32 = small's 64-wide
    # context) and added time-id conditioning: what the conditioning costs
    "small-sdxl": Synthetic(dict(sample_size=16, width=32, channels=(32, 64)), family="sdxl"),
}


@dataclass
class ModelSpec:
    """What a benchmark trains: model folder (or "world"), shortcut LoRA file, prompt sets."""

    model: str  # "world" or a diffusers folder
    shortcut: str  # shortcut LoRA file ("" = the world's shipped one)
    prompts: str  # training prompt set
    eval_prompts: str  # held-out prompt set
    label: str  # how reports name it
    preset: str | None = "world"  # config preset the runs start from (None: the config's default for the model)
    config: dict = field(default_factory=dict)  # config overrides that come with the model (Synthetic.config)
    family: str = "sd"  # the backend family of the model ("sd", "sdxl" or "sd3"): what its chain's updates are


def prepare_model(name: str, cache: Path, shortcut: str = "") -> ModelSpec:
    """Resolve `name`: "world" (the embedded model), a SYNTHETIC name (random-weight SD-format models built
    into `cache` with a random shortcut LoRA standing in for a distilled one), or a diffusers folder
    (then `shortcut` must name its shortcut LoRA)."""
    from shortft.testing import make_tiny_lora, make_tiny_model, make_tiny_sd3, make_tiny_sdxl

    if name in ("world", "world-flow"):
        from shortft.backends import model_family, resolve_model
        from shortft.world import SHIPPED_SHORTCUTS

        folder = resolve_model(name)  # a MissingFileError when the embedded model is not there
        if not shortcut and not SHIPPED_SHORTCUTS[name].is_file():
            raise MissingFileError(f"the shortcut of {name!r} is missing at {SHIPPED_SHORTCUTS[name]}; pass --shortcut FILE")
        return ModelSpec(name, shortcut or "", "world-train", "world-heldout", name, preset=name,
                         family=model_family(folder))
    if name in SYNTHETIC:
        synth, folder = SYNTHETIC[name], cache / f"model-{name}"
        if not (folder / "model_index.json").is_file():
            make = {"sd": make_tiny_model, "sdxl": make_tiny_sdxl, "sd3": make_tiny_sd3}[synth.family]
            make(folder, seed=0, **synth.model)
        sc = folder / "shortcut.safetensors"
        if not sc.is_file():
            make_tiny_lora(folder, sc, rank=4, seed=1, scale=0.1)
        prompts = folder / "prompts.txt"
        prompts.write_text("\n".join(SYNTHETIC_PROMPTS) + "\n")
        return ModelSpec(str(folder), shortcut or str(sc), str(prompts), str(prompts),
                         f"{name} (random weights, {synth.model})", config=synth.config, family=synth.family)
    if not (Path(name) / "model_index.json").is_file():
        raise MissingFileError(f"--model {name!r}: not 'world', one of {', '.join(SYNTHETIC)}, "
                               "nor a diffusers pipeline folder (model_index.json)")
    if not shortcut:
        raise ConfigError(f"--model {name!r} needs --shortcut (a shortcut LoRA file for that model)")
    from shortft.backends import model_family

    return ModelSpec(name, shortcut, "simple-animals", "simple-animals", name, preset=None, family=model_family(name))


SYNTHETIC_PROMPTS = ["a red circle on the left", "a blue square at the top", "a small green triangle",
                     "a large yellow circle", "a purple square on the right", "a green circle at the bottom"]


def chain_scaled(num_steps: int) -> dict:
    """Method settings given in steps of a 50-step chain (DRTune's M and K, ReFL's window), scaled to a
    shorter chain so that every method still fits; {} at 50 steps (the defaults are used as they are)."""
    if num_steps == 50:
        return {}
    window = max(1, round(10 * num_steps / 50))
    return {"drtune_m": window, "drtune_k": min(5, num_steps - window + 1), "refl_window": window}


# --- subprocess workers --------------------------------------------------------------------------------------
def run_worker(worker: str, spec: dict, workdir: Path, timeout: float | None = None, reuse: bool = False) -> dict:
    """Run `worker` (a name in shortft.bench.__main__.WORKERS) on `spec` in a fresh Python process and
    return its JSON result. The worker's output goes to a log file beside the result. With `reuse`, a result
    already in `workdir` from the identical spec is returned without running it again (a long benchmark
    that was interrupted continues where it stopped)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{worker}-{spec.get('tag', 'x')}"
    spec_file, out_file, log_file = workdir / f"{tag}.spec.json", workdir / f"{tag}.json", workdir / f"{tag}.log"
    if reuse and out_file.is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        print(f"bench: {tag} already measured in {workdir}, reusing it", flush=True)
        return json.loads(out_file.read_text())
    files.write_json(spec_file, spec)
    out_file.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "shortft.bench", worker, str(spec_file), str(out_file)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0 or not out_file.is_file():
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"bench worker {worker} ({tag}) failed with status {proc.returncode}; "
                           f"log {log_file}:\n{tail}")
    return json.loads(out_file.read_text())


def sync(device) -> None:
    """Wait for the GPU, so that a timing covers the work and not only its launch."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_mb(field_name: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(text.split(f"{field_name}:", 1)[1].split()[0]) / 1024  # the kernel reports kB


def rss_mark() -> float:
    """Reset this process's peak-RSS mark to its current RSS and return that RSS (MB); `rss_peak` then
    reads the peak since. ru_maxrss cannot be reset, and a child process inherits its parent's peak across
    fork/exec in it, so a worker's ru_maxrss reports the bench command's memory whenever that is larger.
    Linux only (/proc/self/clear_refs, VmHWM); elsewhere the mark is ru_maxrss and nothing is reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_peak() -> float:
    """Peak RSS (MB) since the last `rss_mark`."""
    try:
        return _status_mb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads (the machine is shared: oversubscription makes timings meaningless)."""
    import torch

    if n > 0:
        torch.set_num_threads(n)


def machine() -> str:
    """One line naming the machine the numbers come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPU(s), {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def command_line(name: str) -> str:
    """The `shortft bench NAME ...` command this process runs, as typed (for the reports' Reproduce lines)."""
    if sys.argv[1:3] == ["bench", name]:
        return " ".join(["shortft bench", name, *map(shlex.quote, sys.argv[3:])])
    return f"shortft bench {name}"


def slug(label: str) -> str:
    """A row label as a file-name tag: "shortft (stage 1)" -> "shortft_stage_1"."""
    return "".join(c for c in label.replace(" ", "_") if c.isalnum() or c in "_-.")


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


# --- command line --------------------------------------------------------------------------------------------
def register(sub) -> None:
    """Add `shortft bench efficiency|compare` to the CLI's subparsers."""
    p = sub.add_parser("bench", help="benchmarks: per-method efficiency, equal-budget method comparison",
                       description=__doc__.splitlines()[0])
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    from shortft.bench import compare, efficiency, faults

    efficiency.add_parser(bsub)
    compare.add_parser(bsub)
    faults.add_parser(bsub)

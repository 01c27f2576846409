"""`shortft bench faults`: inject the faults a shared GPU cluster produces into real training runs and check
that nothing is lost.

A run of `shortft train` (a subprocess, the tiny random-weight model by default) is stopped again and
again: SIGTERM and SIGINT (a preemption, a Ctrl-C: the run must checkpoint and exit 143 / 130), SIGKILL at
a random instant, and SIGKILL while a checkpoint is being written (the driver watches for the checkpoint's
`.tmp` folder). After each fault the run is resumed with `--resume`; at the end its LoRA weights are compared
with an uninterrupted run of the same config. Bad input of several kinds is tried too, each must end with a
one-line error and exit status 2, no traceback. The table goes to docs/faults.md.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

FAULTS = ("SIGTERM", "SIGINT", "SIGKILL", "SIGKILL during checkpoint")


def launch(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m shortft train ARGS` in a new process, its output appended to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "shortft", "train", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll `predicate` every millisecond until it holds (True) or the process ends / time runs out (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.001)
    return False


def inject(proc: subprocess.Popen, run_dir: Path, fault: str, rng: random.Random, max_delay: float,
           timeout: float = 300) -> bool:
    """Deliver `fault` to a running training process, at a random instant up to `max_delay` seconds after
    training started (any instant from the process start for SIGKILL); False if it finished first."""
    ckpts = run_dir / "checkpoints"
    existing = set(ckpts.glob("step-*"))
    if fault == "SIGKILL during checkpoint":
        hit = _wait_for(lambda: any(ckpts.glob("*.tmp")), proc, timeout)
    else:  # a random instant once this process trains (a new checkpoint appeared), any instant for SIGKILL
        started = fault == "SIGKILL" or _wait_for(lambda: set(ckpts.glob("step-*")) - existing, proc, timeout)
        time.sleep(rng.uniform(0.0, max_delay))
        hit = started and proc.poll() is None
    if hit:
        proc.send_signal(getattr(signal, fault.split()[0]))
    proc.wait(timeout=timeout)
    return hit


def run_with_faults(args: list[str], run_dir: Path, faults: list[str], seed: int = 0, max_delay: float = 3.0) -> dict:
    """Train with `args` (which set run_dir), delivering `faults` in order and resuming after each; then finish.
    Returns what happened: per fault kind the number injected, the exit statuses seen, the resumes."""
    rng = random.Random(seed)
    log = run_dir.parent / f"{run_dir.name}.log"
    out = {"injected": {f: 0 for f in FAULTS}, "statuses": {f: [] for f in FAULTS}, "resumes": 0, "missed": 0}
    resume: list[str] = []
    for fault in faults:
        proc = launch(args + resume, log)
        if inject(proc, run_dir, fault, rng, max_delay):
            out["injected"][fault] += 1
            out["statuses"][fault].append(proc.returncode)
        else:
            out["missed"] += 1  # the run ended first: start again so the next fault lands
        resume = [f"resume={run_dir}"]
        out["resumes"] += 1
    proc = launch(args + resume, log)
    out["final_status"] = proc.wait(timeout=600)
    return out


def lora_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every trained LoRA tensor of a finished run (the lora/*.safetensors files), keyed by file and tensor."""
    from safetensors.torch import load_file

    return {f"{f.stem}/{k}": v for f in sorted((run_dir / "lora").glob("*.safetensors")) for k, v in load_file(f).items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys() or not a:
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

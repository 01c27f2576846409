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


# --- bad input: each must be one line and exit status 2, no traceback -----------------------------------------
def bad_inputs(model: str, shortcut: str, prompts: str, root: Path) -> list[tuple[str, list[str], dict]]:
    """(what, `shortft train` arguments, extra environment) of every kind of bad input tried."""
    run = [f"run_dir={root / 'never'}"]
    ok = [f"model={model}", f"shortcut={shortcut}", f"prompts={prompts}", f"eval_prompts={prompts}", *run]
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "empty-cache")}
    return [
        ("unknown key", ["learning_rate=1", *ok], {}),
        ("wrong type", ["lr=fast", *ok], {}),
        ("NaN guidance", ["--guidance", "nan", *ok], {}),
        ("infinite learning rate", ["lr=inf", *ok], {}),
        ("unknown method", ["--method", "ppo", *ok], {}),
        ("unknown reward", ["--reward", "beauty", *ok], {}),
        ("unknown preset", ["--preset", "sd9", *ok], {}),
        ("value outside its choices", ["--inner-weights", "all", *ok], {}),
        ("zero steps", ["max_steps=0", *ok], {}),
        ("model folder that does not exist", ["--model", str(root / "no-model"), *run], {}),
        ("prompt file that does not exist", [*ok, f"prompts={root / 'no.txt'}"], {}),
        ("hub model not in the cache, offline", ["--model", "someorg/some-model", *run], offline),
        ("hub shortcut not in the cache, offline", [*ok, "shortcut=ByteDance/Hyper-SD/x.safetensors"], offline),
        ("reward weights not in the cache, offline", [*ok, "reward=hpsv2"], offline),
        ("malformed reward paths", [*ok, "reward_paths=hpsv2"], {}),
        ("resume of a folder that does not exist", [*ok, f"resume={root / 'not-a-run'}"], {}),
    ]


def try_bad_input(args: list[str], env: dict, cwd: Path) -> dict:
    """Run one bad `shortft train` and report its exit status, its error line and whether it wrote a run."""
    proc = subprocess.run([sys.executable, "-m", "shortft", "train", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=cwd, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("shortft: error:")]
    return {"status": proc.returncode, "message": errors[-1] if errors else proc.stderr.strip()[-300:],
            "traceback": "Traceback" in proc.stderr, "error_lines": len(errors)}


# --- the command ---------------------------------------------------------------------------------------------
def add_parser(bsub) -> None:
    p = bsub.add_parser("faults", help="inject faults into real training runs and try bad input -> docs/faults.md",
                        description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="shortft,draft-lv", help="comma-separated methods to train under faults")
    p.add_argument("--rounds", type=int, default=3, help="faults of each kind per method")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps of each run")
    p.add_argument("--seed", type=int, default=0, help="seeds the random instants")
    p.add_argument("--out", default="docs/faults.md", help="markdown report to write")
    p.add_argument("--workdir", default="runs/bench/faults", help="models, run folders and logs")
    p.set_defaults(func=run)


def run(args) -> int:
    from shortft.bench import command_line, machine, now, prepare_model

    root = Path(args.workdir).resolve()
    spec = prepare_model("tiny", root)
    common = {"model": spec.model, "shortcut": spec.shortcut, "prompts": spec.prompts, "eval_prompts": spec.prompts,
              "reward": "symmetry", "num_steps": 10, "batch_size": 2, "max_steps": args.steps, "checkpoint_every": 1,
              "lora_rank": 4, "lora_alpha": 4.0, "eval_count": 2, "lr": 5e-2}
    rows = []
    for method in args.methods.split(","):
        over = {**common, "method": method}
        ref = root / f"{method}-reference"
        assert launch([f"{k}={v}" for k, v in {**over, "run_dir": ref}.items()], root / f"{ref.name}.log").wait() == 0
        faulty = root / f"{method}-faulty"
        plan = [f for _ in range(args.rounds) for f in FAULTS]
        print(f"bench faults: {method}: {len(plan)} faults ...", flush=True)
        report = run_with_faults([f"{k}={v}" for k, v in {**over, "run_dir": faulty}.items()], faulty, plan,
                                 seed=args.seed, max_delay=2.0)
        rows.append((method, report, max_difference(lora_weights(ref), lora_weights(faulty))))
    bad = [(what, try_bad_input(a, env, root)) for what, a, env in bad_inputs(spec.model, spec.shortcut, spec.prompts,
                                                                               root)]
    text = report_text(rows, bad, command_line("faults"), machine(), now(), args).replace(str(root), "WORKDIR")
    Path(args.out).write_text(text)
    print(text)
    return 0


def report_text(rows, bad, command: str, machine_line: str, when: str, args) -> str:
    lines = ["# Runs that survive faults", "", f"Written by `{command}` on {when}. Machine: {machine_line}.", "",
             f"Each method trains the tiny random-weight model for {args.steps} optimiser steps (a checkpoint every "
             f"step) in a subprocess that is stopped {args.rounds} times by each fault below, at random instants, "
             "and resumed with `--resume` after each; then it runs to the end. Its final LoRA files are compared "
             "with an uninterrupted run of the same config. WORKDIR below is `--workdir`.", "",
             "| method | SIGTERM (exit 143) | SIGINT (exit 130) | SIGKILL | SIGKILL while a checkpoint is written | "
             "faults that landed | resumes | runs that could not resume | largest LoRA weight difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, r, diff in rows:
        cells = [f"{r['injected'][f]} (statuses {sorted(set(r['statuses'][f]))})" for f in FAULTS]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {sum(r['injected'].values())} | {r['resumes']} | "
                     f"{int(r['final_status'] != 0)} | {diff:.2e} |")
    lines += ["", "Bad input (each a `shortft train` command; the error line as printed):", "",
              "| input | exit status | traceback | error lines | message |", "|---|---|---|---|---|"]
    for what, b in bad:
        lines.append(f"| {what} | {b['status']} | {'yes' if b['traceback'] else 'no'} | {b['error_lines']} | "
                     f"`{b['message'] if len(b['message']) <= 300 else b['message'][:300] + ' ...'}` |")
    return "\n".join(lines) + "\n"

"""What a training run writes into its folder and reads back on a resume: config.yaml, the checkpoints
(shortft.files: safetensors + the optimizer state loaded with weights_only + state.json + a manifest), and
the deliverable LoRA files with the per-step schedule."""

from __future__ import annotations

import shutil
from pathlib import Path

from shortft import files, lora
from shortft.config import TrainConfig, to_dict
from shortft.errors import UserError

KEEP_CHECKPOINTS = 2  # the newest ones are kept; older ones are deleted after each save


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (half-written `.tmp` folders are not checkpoints)."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))


def save_checkpoint(run_dir: Path, unet, method, optimizer, state: dict) -> Path:
    """Adapters (exact tensors), optimizer and loop state; the newest KEEP_CHECKPOINTS are kept. A write that
    fails (disk full, folder not writable) leaves the previous checkpoints as they were."""
    tensors = {n: p for n, p in unet.named_parameters() if any(f".{a}." in n for a in method.adapter_names())}
    folder = run_dir / "checkpoints" / f"step-{state['step']:07d}"
    try:
        files.save_checkpoint(folder, tensors, state, optimizer.state_dict())
    except OSError as err:
        previous = checkpoint_folders(run_dir)
        raise UserError(f"cannot write checkpoint {folder} ({err.strerror or err}); "
                        + (f"the previous one, {previous[-1]}, is intact" if previous else "no earlier checkpoint")
                        ) from err
    for old in checkpoint_folders(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return folder


def load_checkpoint(run_dir: Path, unet, optimizer) -> dict | None:
    """Restore the newest complete checkpoint of `run_dir` and return its loop state; a damaged one is named
    and skipped for the one before it. None when there is none yet (the run restarts at step 0, which is
    exactly where it was)."""
    for folder in reversed(checkpoint_folders(run_dir)):
        try:
            tensors, state, opt_state = files.load_checkpoint(folder)
        except files.CorruptCheckpoint as err:
            print(f"shortft: skipping {err}")
            continue
        params = dict(unet.named_parameters())
        for name, value in tensors.items():
            params[name].data.copy_(value)
        optimizer.load_state_dict(opt_state)
        print(f"shortft: resuming {run_dir} at step {state['step']} ({folder.name})")
        return state
    print(f"shortft: no checkpoint in {run_dir / 'checkpoints'} yet; starting at step 0")
    return None


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    import yaml

    files.write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def save_loras(run_dir: Path, backend, method, cfg: TrainConfig) -> None:
    """The deliverable: one diffusers LoRA file per adapter (the family's format) plus the per-timestep schedule."""
    for name in method.adapter_names():
        lora.save_lora(backend.net, name, run_dir / "lora" / f"{name}.safetensors", fmt=backend.lora_format)
    from shortft.sample import run_metadata

    files.write_json(run_dir / "lora" / "shortft.json", run_metadata(method, to_dict(cfg)))

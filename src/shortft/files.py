"""Files that must never be seen half-written: atomic writes and checkpoints.

A checkpoint is a folder `NAME/` holding `tensors.safetensors`, optionally `optimizer.pt` (a torch
state dict, only ever loaded with `weights_only=True`: no pickled code runs), `state.json`, and last
`manifest.json` (size and SHA-256 of each file). It is written under `NAME.tmp/` and renamed into place,
so a process killed at any moment leaves either the previous checkpoint or the new one, never half of
one; `load_checkpoint` checks the manifest, so a folder damaged later is reported by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from shortft.errors import UserError


class CorruptCheckpoint(UserError):
    """A checkpoint folder that is incomplete or whose files do not match its manifest."""


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed onto `path` (a file
    or a folder), when it fails it is removed. Readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            _remove(path)  # a folder cannot be renamed onto a non-empty one
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        _fsync(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


# --- checkpoints ------------------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict,
                    optimizer: dict | None = None) -> Path:
    """Write a checkpoint folder atomically (see the module docstring); returns it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            _fsync(tmp / name)
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _digest(tmp / name)} for name in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / "manifest.json")
    return folder


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """(tensors, state, optimizer state or None) of a checkpoint folder; `CorruptCheckpoint` naming the
    folder when it is incomplete or a file does not match the manifest."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"checkpoint {folder} is incomplete (no readable manifest.json: {err})") from None
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _digest(path) != entry["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {folder}: {name} is missing or does not match its manifest")
    tensors = load_file(folder / "tensors.safetensors")
    state = json.loads((folder / "state.json").read_text())
    optimizer = None
    if (folder / "optimizer.pt").is_file():
        try:
            optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # it holds more than tensors and plain values: never run it
            raise CorruptCheckpoint(f"checkpoint {folder}: optimizer.pt holds objects other than tensors and "
                                    "plain values; refusing to load it") from None
    return tensors, state, optimizer

"""Model backends, one per family, each loading its models with diffusers and exposing the few operations
the chain needs (see backends/sd.py); the chain and the methods never learn which one they drive.
`load_backend` picks the family from the model folder's model_index.json."""

from __future__ import annotations

import torch

from shortft.backends.common import Denoiser, model_family, resolve_model
from shortft.backends.sd import SDBackend
from shortft.backends.sd3 import SD3Backend
from shortft.backends.sdxl import SDXLBackend

BACKENDS = {"sd": SDBackend, "sdxl": SDXLBackend, "sd3": SD3Backend}


def load_backend(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The backend of `model` (a hub id, a local diffusers folder, or an embedded model's name), loaded."""
    return BACKENDS[model_family(resolve_model(model))].load(model, device=device, dtype=dtype)


__all__ = ["BACKENDS", "Denoiser", "SD3Backend", "SDBackend", "SDXLBackend", "load_backend", "model_family",
           "resolve_model"]

"""Model backends. A backend loads a model family with diffusers and exposes the few operations the
chain needs; the chain never learns which backend it drives."""

from shortft.backends.sd import Denoiser, SDBackend

BACKENDS = {"sd": SDBackend}

__all__ = ["BACKENDS", "Denoiser", "SDBackend"]

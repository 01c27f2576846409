"""What every backend shares: finding a model folder, telling its family from model_index.json, and the
Denoiser module that runs the network with the step's adapters."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.utils.checkpoint

from shortft import lora
from shortft.errors import ConfigError, MissingFileError
from shortft.hub import hub_folder

Adapters = tuple[str, ...]

# The files a diffusers model folder needs (safetensors weights only, no fp16/ema variants, no pickles).
MODEL_FILES = ["model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer*/*",
               "*/diffusion_pytorch_model.safetensors", "*/diffusion_pytorch_model-*.safetensors",
               "*/diffusion_pytorch_model.safetensors.index.json", "text_encoder*/model.safetensors",
               "text_encoder*/model-*.safetensors", "text_encoder*/model.safetensors.index.json"]
# model_index.json's pipeline class -> backend family
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
EMBEDDED = {"world": "model", "world-flow": "flow-model"}  # shipped model names -> folder under world/assets


def resolve_model(spec: str) -> Path:
    """The local folder of a model: an embedded one by name, a local diffusers folder, or a hub id found in
    the hub cache (downloaded only when it is not there and the hub is reachable; offline it fails at once)."""
    if spec in EMBEDDED:
        from shortft.world import ASSETS

        path = ASSETS / EMBEDDED[spec]
        if not (path / "model_index.json").is_file():
            raise MissingFileError(f"the embedded model {spec!r} is missing at {path}; rebuild it with "
                                   "`shortft world pretrain`")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        path = hub_folder(spec, "model", "pass a local diffusers folder with --model", allow_patterns=MODEL_FILES)
    if not (path / "model_index.json").is_file():
        raise MissingFileError(f"model folder {spec!r} has no model_index.json (a diffusers pipeline folder expected)")
    return path


def model_family(folder: Path) -> str:
    """'sd', 'sdxl' or 'sd3', from the pipeline class the folder's model_index.json names."""
    name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "")
    if name not in FAMILIES:
        raise ConfigError(f"model {str(folder)!r} is a {name or 'unknown'} pipeline; supported: "
                          f"{', '.join(f'{k} ({v})' for k, v in FAMILIES.items())}")
    return FAMILIES[name]


def load_failed(model: str, err: Exception) -> MissingFileError:
    return MissingFileError(f"cannot load model {model!r} ({err.__class__.__name__}: {str(err).splitlines()[0]}); "
                            "is every component there (downloaded, or in the hub cache)?")


def freeze(*modules: torch.nn.Module, device) -> None:
    for m in modules:
        m.requires_grad_(False)
        m.eval()
        m.to(device)


class Denoiser(torch.nn.Module):
    """The denoising network plus the adapter switch: the module accelerate prepares (DDP wraps it), so every
    network call of the chain goes through the wrapper and gradients synchronise across processes. A family
    says how its network is called (`call`)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.dtype = net.dtype  # read once: diffusers computes it by walking the model on every access
        self.checkpoint_all = False  # TrainConfig.checkpoint_calls: recompute every in-graph call in backward

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, adapters: Adapters,
                checkpoint: bool = False) -> torch.Tensor:
        if checkpoint or (self.checkpoint_all and torch.is_grad_enabled()):
            # The recomputation in backward runs _run again, which re-activates *this* step's adapters.
            return torch.utils.checkpoint.checkpoint(self._run, x, t, cond, adapters, use_reentrant=False)
        return self._run(x, t, cond, adapters)

    def _run(self, x, t, cond, adapters):
        lora.activate(self.net, adapters)  # O(1) when the adapters did not change since the last call
        cond = {k: v.to(self.dtype) for k, v in cond.items()}
        # the chain keeps its own precision (float32 over a half-precision model, float64 in the gradient tests)
        return self.call(x.to(self.dtype), t, cond).to(x.dtype)

    def call(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError


class Latents:
    """What the backends share about latents and images (a mixin over `net`, `vae`, `resolution`,
    `vae_slicing`): the latent shape at the run's resolution and the differentiable VAE decode."""

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """The image side in pixels: the run's `resolution`, or the model's own (its network's sample size)."""
        return self.resolution or self.net.config.sample_size * self.vae_scale

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        side = self.image_size // self.vae_scale
        return (batch, self.net.config.in_channels, side, side)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) images in [0, 1], differentiable w.r.t. the latents (one image
        at a time with `vae_slicing`: the decoder's activation peak of one image, the same result)."""
        c = self.vae.config
        z = (latents / c.scaling_factor + (c.get("shift_factor") or 0.0)).to(next(self.vae.parameters()).dtype)
        parts = z.split(1) if self.vae_slicing else [z]
        img = torch.cat([self.vae.decode(part).sample for part in parts]).float()
        return (img / 2 + 0.5).clamp(0, 1)

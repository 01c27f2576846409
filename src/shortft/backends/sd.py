"""Stable Diffusion 1.5-family backend: UNet2DConditionModel + AutoencoderKL + CLIP text encoder.

Loaded with diffusers/transformers from a hub id or a local folder in the diffusers layout
(`unet/ vae/ text_encoder/ tokenizer/ scheduler/`). The embedded world model (`--model world`) is such
a folder, so it goes through exactly this code. Nothing outside `backends/` touches these classes.

The backend exposes the few operations the chain needs:
    encode_prompts(prompts)              -> (B, L, D) text embeddings
    model_eps(x, t, context, adapters)   -> (B, C, h, w) predicted noise (v-prediction converted)
    decode(latents)                      -> (B, 3, H, W) images in [0, 1], differentiable
    alpha(t), timesteps(n)               -> the noise schedule ᾱ_t and the DDIM sampling timesteps
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint

from shortft import lora
from shortft.errors import ConfigError, MissingFileError
from shortft.hub import hub_folder

Adapters = tuple[str, ...]


class Denoiser(torch.nn.Module):
    """The UNet plus the adapter switch: the module that accelerate prepares (DDP wraps this), so that
    every UNet call of the chain goes through the wrapper and gradients synchronise across processes."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.dtype = unet.dtype  # read once: diffusers computes it by walking the model on every access

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, adapters: Adapters,
                checkpoint: bool = False) -> torch.Tensor:
        if checkpoint:
            # The recomputation in backward runs _run again, which re-activates *this* step's adapters.
            return torch.utils.checkpoint.checkpoint(self._run, x, t, context, adapters, use_reentrant=False)
        return self._run(x, t, context, adapters)

    def _run(self, x, t, context, adapters):
        lora.activate(self.unet, adapters)  # O(1) when the adapters did not change since the last call
        out = self.unet(x.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype)).sample  # (B, C, h, w)
        return out.float()


# The files a diffusers model folder needs (safetensors weights only, no fp16/ema variants, no pickles).
MODEL_FILES = ["model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer*/*",
               "*/diffusion_pytorch_model.safetensors", "*/diffusion_pytorch_model-*.safetensors",
               "*/diffusion_pytorch_model.safetensors.index.json", "text_encoder*/model.safetensors",
               "text_encoder*/model-*.safetensors", "text_encoder*/model.safetensors.index.json"]


def resolve_model(spec: str) -> str:
    """The local folder of a model: `world` (the shipped one), a local diffusers folder, or a hub id found
    in the hub cache (downloaded only when it is not there and the hub is reachable; offline it fails at once)."""
    if spec == "world":
        from shortft.world import WORLD_MODEL

        if not (WORLD_MODEL / "unet").is_dir():
            raise MissingFileError(f"the embedded world model is missing at {WORLD_MODEL}; "
                                   "regenerate it with `shortft world pretrain`")
        return str(WORLD_MODEL)
    path = Path(spec).expanduser()
    if not path.exists():
        path = hub_folder(spec, "model", "pass a local diffusers folder with --model", allow_patterns=MODEL_FILES)
    if not (path / "unet").is_dir():
        raise MissingFileError(f"model folder {spec!r} has no unet/ subfolder (diffusers layout expected)")
    return str(path)


@dataclass
class SDBackend:
    """Frozen SD components plus the denoiser; LoRA adapters live on `unet`."""

    unet: torch.nn.Module  # UNet2DConditionModel (carries all adapters)
    vae: torch.nn.Module  # AutoencoderKL, frozen
    text_encoder: torch.nn.Module  # CLIPTextModel, frozen
    tokenizer: object  # CLIPTokenizer
    alphas_cumprod: torch.Tensor  # (1000,) float64, ᾱ_t of the training schedule
    final_alpha_cumprod: float  # ᾱ used after the last DDIM step (1.0 if set_alpha_to_one else ᾱ_0)
    scheduler_config: dict  # kept to build the stock DDIMScheduler for timesteps / parity
    prediction_type: str  # "epsilon" or "v_prediction"
    device: torch.device
    denoiser: torch.nn.Module | None = None  # Denoiser(unet), replaced by accelerate's prepared wrapper

    def __post_init__(self):
        if self.denoiser is None:
            self.denoiser = Denoiser(self.unet)

    @classmethod
    def load(cls, model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDBackend:
        """Load from a hub id, a local diffusers folder, or `world` (the embedded model)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        where = resolve_model(model)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype)
            unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype)
            scheduler = DDIMScheduler.from_pretrained(where, subfolder="scheduler")
        except OSError as err:
            raise MissingFileError(f"cannot load model {model!r} ({err.__class__.__name__}: "
                                    f"{str(err).splitlines()[0]}); is it downloaded / in the hub cache?") from err
        device = torch.device(device)
        for m in (text_encoder, vae, unet):
            m.requires_grad_(False)
            m.eval()
            m.to(device)
        sc = scheduler.config
        if sc.get("clip_sample", False) or sc.get("thresholding", False):
            raise ConfigError(f"model {model!r}: schedulers with clip_sample/thresholding are not supported by the "
                              "chain engine")
        ac = scheduler.alphas_cumprod.to(torch.float64)
        final = 1.0 if sc.get("set_alpha_to_one", True) else float(ac[0])
        return cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, alphas_cumprod=ac,
                   final_alpha_cumprod=final, scheduler_config=dict(sc),
                   prediction_type=sc.get("prediction_type", "epsilon"), device=device)

    # --- schedule -------------------------------------------------------------------------------------
    def timesteps(self, num_steps: int, spacing: str | None = None) -> list[int]:
        """The stock DDIMScheduler's sampling timesteps (SD 1.5, 50 steps: 981, 961, ..., 1);
        `spacing` overrides the model's timestep_spacing ("trailing" for few-step models)."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler_config, **({"timestep_spacing": spacing} if spacing else {}))
        sched.set_timesteps(num_steps)
        return [int(t) for t in sched.timesteps]

    def alpha(self, t: int | None) -> float:
        """ᾱ_t; t = -1 is 'after the last step' (the scheduler's final ᾱ), None is the clean image (ᾱ = 1)."""
        if t is None:
            return 1.0
        if t < 0:
            return self.final_alpha_cumprod
        return float(self.alphas_cumprod[t])

    # --- model ----------------------------------------------------------------------------------------
    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        c = self.unet.config
        return (batch, c.in_channels, c.sample_size, c.sample_size)

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B,) prompts -> (B, L, D) last hidden states, padded to max length as the SD pipeline does."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids)[0].float()

    def model_eps(self, x: torch.Tensor, t: int, context: torch.Tensor, adapters: Adapters = (),
                  checkpoint: bool = False) -> torch.Tensor:
        """ε̂(x_t, t, c) with the given adapters active; v-prediction is converted to ε."""
        tt = torch.tensor(t, device=x.device, dtype=torch.long)
        out = self.denoiser(x, tt, context, tuple(adapters), checkpoint)  # (B, C, h, w)
        if self.prediction_type == "v_prediction":
            a = self.alpha(t)
            return a**0.5 * out + (1 - a) ** 0.5 * x  # ε = √ᾱ v + √(1-ᾱ) x
        if self.prediction_type != "epsilon":
            raise ConfigError(f"prediction_type {self.prediction_type!r} not supported (epsilon, v_prediction)")
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latents -> (B, 3, H, W) images in [0, 1]; differentiable w.r.t. the latents."""
        vae_dtype = next(self.vae.parameters()).dtype
        img = self.vae.decode((latents / self.vae.config.scaling_factor).to(vae_dtype)).sample.float()
        return (img / 2 + 0.5).clamp(0, 1)

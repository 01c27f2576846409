"""Stable Diffusion 1.5-family backend: UNet2DConditionModel + AutoencoderKL + CLIP text encoder, DDIM.

Loaded with diffusers/transformers from a hub id or a local folder in the diffusers layout
(`unet/ vae/ text_encoder/ tokenizer/ scheduler/`). The embedded world model (`--model world`) is such
a folder, so it goes through exactly this code. Nothing outside `backends/` touches these classes.

What the chain needs from a backend (the same for every family):
    encode_prompts(prompts)                     -> conditioning: {"hidden": (B, L, D)}
    model_output(x, t, cond, adapters, ckpt)    -> (B, C, h, w) the network's raw prediction (ε or v)
    split(out, x, t)                            -> (x̂0, ε̂)
    coefficients(t)                             -> (a, b) with x_t = a x0 + b ε: (√ᾱ_t, √(1-ᾱ_t))
    timesteps(n)                                -> the stock DDIMScheduler's sampling timesteps
    decode(latents)                             -> (B, 3, H, W) images in [0, 1], differentiable
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shortft import lora
from shortft.backends.common import Denoiser, Latents, freeze, load_failed, resolve_model
from shortft.errors import ConfigError


class UNetDenoiser(Denoiser):
    def call(self, x, t, cond):
        return self.net(x, t, encoder_hidden_states=cond["hidden"]).sample  # (B, C, h, w)


def ddim_scheduler(where):
    """The model's schedule as a DDIMScheduler. A config saved by another scheduler class (SDXL ships
    EulerDiscreteScheduler's) may lack `clip_sample`, which DDIM would default to True; that class never clips,
    so its absence means False."""
    from diffusers import DDIMScheduler

    raw = dict(DDIMScheduler.load_config(where, subfolder="scheduler"))
    if raw.get("_class_name") != "DDIMScheduler":
        raw.setdefault("clip_sample", False)
    return DDIMScheduler.from_config(raw)


@dataclass
class SDBackend(Latents):
    """Frozen SD components plus the denoiser; LoRA adapters live on `net` (the UNet)."""

    net: torch.nn.Module  # UNet2DConditionModel (carries all adapters)
    vae: torch.nn.Module  # AutoencoderKL, frozen
    text_encoder: torch.nn.Module  # CLIPTextModel, frozen
    tokenizer: object  # CLIPTokenizer
    alphas_cumprod: tuple[float, ...]  # (1000,) ᾱ_t of the training schedule, as Python floats: the chain reads two per step
    final_alpha_cumprod: float  # ᾱ used after the last DDIM step (1.0 if set_alpha_to_one else ᾱ_0)
    scheduler_config: dict  # kept to build the stock DDIMScheduler for timesteps / parity
    prediction_type: str  # "epsilon" or "v_prediction"
    device: torch.device
    denoiser: torch.nn.Module | None = None  # UNetDenoiser(net), replaced by accelerate's prepared wrapper
    lora_format: lora.LoraFormat = lora.SD_LORA  # how this family's LoRA files look
    family: str = "sd"
    resolution: int = 0  # image side in pixels; 0 = the model's own (TrainConfig.resolution)
    vae_slicing: bool = False  # decode one image at a time (TrainConfig.vae_slicing)

    def __post_init__(self):
        if self.denoiser is None:
            self.denoiser = UNetDenoiser(self.net)

    @classmethod
    def load(cls, model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDBackend:
        """Load from a hub id, a local diffusers folder, or `world` (the embedded model)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        where = resolve_model(model)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype)
            unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype)
            scheduler = ddim_scheduler(where)
        except OSError as err:
            raise load_failed(model, err) from err
        device = torch.device(device)
        freeze(text_encoder, vae, unet, device=device)
        return cls(net=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, device=device,
                   **cls.check_scheduler(model, scheduler))

    @staticmethod
    def check_scheduler(model: str, scheduler) -> dict:
        """The schedule fields of a UNet-family backend from the model's DDIMScheduler, refusing what the chain
        engine does not implement."""
        sc = scheduler.config
        if sc.get("clip_sample", False) or sc.get("thresholding", False):
            raise ConfigError(f"model {model!r}: schedulers with clip_sample/thresholding are not supported by the "
                              "chain engine")
        if sc.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
            raise ConfigError(f"model {model!r}: prediction_type {sc['prediction_type']!r} is not supported "
                              "(epsilon, v_prediction)")
        ac = tuple(scheduler.alphas_cumprod.to(torch.float64).tolist())
        return {"alphas_cumprod": ac, "final_alpha_cumprod": 1.0 if sc.get("set_alpha_to_one", True) else ac[0],
                "scheduler_config": dict(sc), "prediction_type": sc.get("prediction_type", "epsilon")}

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
        return self.alphas_cumprod[t]

    def coefficients(self, t: int | None) -> tuple[float, float]:
        """(a, b) of x_t = a x0 + b ε: (√ᾱ_t, √(1-ᾱ_t))."""
        a = self.alpha(t)
        return a**0.5, (1 - a) ** 0.5

    # --- model ----------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> dict:
        """(B,) prompts -> {"hidden": (B, L, D)} last hidden states, padded to max length as the SD pipeline does."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return {"hidden": self.text_encoder(ids)[0].float()}

    def model_output(self, x: torch.Tensor, t: int, cond: dict, adapters: tuple[str, ...] = (),
                     checkpoint: bool = False) -> torch.Tensor:
        """The UNet's prediction at (x_t, t, c) with the given adapters active: ε or v, as the model predicts."""
        return self.denoiser(x, torch.tensor(t, device=x.device, dtype=torch.long), cond, tuple(adapters), checkpoint)

    def split(self, out: torch.Tensor, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from the prediction; v-prediction is converted (ε = √ᾱ v + √(1-ᾱ) x)."""
        a, b = self.coefficients(t)
        eps = a * out + b * x if self.prediction_type == "v_prediction" else out
        return (x - b * eps) / a, eps

"""Stable Diffusion 3 / 3.5 backend (rectified flow): SD3Transformer2DModel + AutoencoderKL + CLIP-L, CLIP-G
and, when the folder has it, T5; sampling times from the stock FlowMatchEulerDiscreteScheduler (with the
model's shift).

Flow matching writes x_σ = (1-σ) x0 + σ ε and the transformer predicts the velocity v ≈ ε - x0, so
    x̂0 = x - σ v,   ε̂ = x + (1-σ) v,   and   (1-σ') x̂0 + σ' ε̂ = x + (σ' - σ) v   (the Euler step, exactly).
Times are the scheduler's timesteps σ · 1000; the conditioning is built as StableDiffusion3Pipeline builds
it: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded to T5's width and followed by T5's
states (zeros when the folder has no T5, as diffusers does), and both CLIPs' pooled embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from shortft import lora
from shortft.backends.common import Denoiser, Latents, freeze, load_failed, resolve_model
from shortft.errors import ConfigError

T5_LENGTH = 256  # max_sequence_length of StableDiffusion3Pipeline


class TransformerDenoiser(Denoiser):
    def call(self, x, t, cond):
        return self.net(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=cond["hidden"],
                        pooled_projections=cond["pooled"], return_dict=False)[0]  # (B, C, h, w) velocity


@dataclass
class SD3Backend(Latents):
    """Frozen SD 3 components plus the denoiser; LoRA adapters live on `net` (the transformer)."""

    net: torch.nn.Module  # SD3Transformer2DModel (carries all adapters)
    vae: torch.nn.Module  # AutoencoderKL (16 latent channels, with a shift factor), frozen
    text_encoders: list  # [CLIP-L, CLIP-G] CLIPTextModelWithProjection, frozen
    tokenizers: list  # their CLIPTokenizers
    t5: torch.nn.Module | None  # T5EncoderModel, frozen; None when the folder has none
    t5_tokenizer: object | None
    scheduler_config: dict  # the stock FlowMatchEulerDiscreteScheduler's config (shift, ...)
    device: torch.device
    denoiser: torch.nn.Module | None = None  # TransformerDenoiser(net), replaced by accelerate's wrapper
    lora_format: lora.LoraFormat = lora.SD3_LORA
    family: str = "sd3"
    sigmas: dict = field(default_factory=dict)  # timestep -> the scheduler's own σ, for every grid it made
    resolution: int = 0  # image side in pixels; 0 = the model's own (TrainConfig.resolution)
    vae_slicing: bool = False  # decode one image at a time (TrainConfig.vae_slicing)
    t5_length: int = T5_LENGTH  # the T5 slot's sequence length (the pipeline's max_sequence_length); a model
    # folder may set it in shortft.json (the flow world: 1)

    def __post_init__(self):
        if self.denoiser is None:
            self.denoiser = TransformerDenoiser(self.net)

    @classmethod
    def load(cls, model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SD3Backend:
        """Load from a hub id or a local StableDiffusion3Pipeline folder (T5 optional)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        where = resolve_model(model)
        try:
            encoders = [CLIPTextModelWithProjection.from_pretrained(where, subfolder=s, torch_dtype=dtype)
                        for s in ("text_encoder", "text_encoder_2")]
            tokenizers = [CLIPTokenizer.from_pretrained(where, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
            t5 = t5_tok = None
            if (where / "text_encoder_3" / "config.json").is_file():
                t5 = T5EncoderModel.from_pretrained(where, subfolder="text_encoder_3", torch_dtype=dtype)
                t5_tok = T5TokenizerFast.from_pretrained(where, subfolder="tokenizer_3")
            vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype)
            net = SD3Transformer2DModel.from_pretrained(where, subfolder="transformer", torch_dtype=dtype)
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(where, subfolder="scheduler")
        except OSError as err:
            raise load_failed(model, err) from err
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ConfigError(f"model {model!r}: a scheduler with dynamic shifting (resolution-dependent, as FLUX) "
                              "is not supported; SD 3 / 3.5 use a fixed shift")
        device = torch.device(device)
        freeze(*encoders, vae, net, *([t5] if t5 is not None else []), device=device)
        extra = json.loads((where / "shortft.json").read_text()) if (where / "shortft.json").is_file() else {}
        return cls(net=net, vae=vae, text_encoders=encoders, tokenizers=tokenizers, t5=t5, t5_tokenizer=t5_tok,
                   scheduler_config=dict(scheduler.config), device=device,
                   t5_length=extra.get("max_sequence_length", T5_LENGTH))

    # --- schedule -------------------------------------------------------------------------------------
    def timesteps(self, num_steps: int, spacing: str | None = None) -> list[float]:
        """The stock FlowMatchEulerDiscreteScheduler's timesteps σ · 1000 (with the model's shift); `spacing`
        is accepted for the interface's sake: a flow grid always starts at σ = 1."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(num_steps)
        ts = [float(t) for t in sched.timesteps]
        self.sigmas.update(zip(ts, (float(s) for s in sched.sigmas)))
        return ts

    def coefficients(self, t: float | None) -> tuple[float, float]:
        """(a, b) of x_σ = a x0 + b ε: (1 - σ, σ). After the last step (END) and at x̂0 (X0), σ = 0."""
        if t is None or t < 0:
            return 1.0, 0.0
        sigma = self.sigmas.get(t, t / self.scheduler_config["num_train_timesteps"])
        return 1.0 - sigma, sigma

    # --- model ----------------------------------------------------------------------------------------
    def _clip(self, i: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP i's penultimate hidden states (B, 77, D_i) and pooled projection (B, P_i)."""
        tok = self.tokenizers[i]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoders[i](ids, output_hidden_states=True)
        return out.hidden_states[-2].float(), out[0].float()

    def encode_prompts(self, prompts: list[str]) -> dict:
        """{"hidden": (B, 77 + t5_length, D_joint), "pooled": (B, P_L + P_G)}, as StableDiffusion3Pipeline with
        max_sequence_length = t5_length (256 unless the model folder's shortft.json says otherwise)."""
        with torch.no_grad():
            (h1, p1), (h2, p2) = self._clip(0, prompts), self._clip(1, prompts)
            width = self.net.config.joint_attention_dim
            if self.t5 is None:
                t5 = torch.zeros(len(prompts), self.t5_length, width, device=self.device)
            else:
                ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                                        add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
                t5 = self.t5(ids)[0].float()
            clip = torch.nn.functional.pad(torch.cat([h1, h2], dim=-1), (0, t5.shape[-1] - h1.shape[-1] - h2.shape[-1]))
            return {"hidden": torch.cat([clip, t5], dim=-2), "pooled": torch.cat([p1, p2], dim=-1)}

    def model_output(self, x: torch.Tensor, t: float, cond: dict, adapters: tuple[str, ...] = (),
                     checkpoint: bool = False) -> torch.Tensor:
        """The transformer's velocity at (x_σ, t = σ · 1000, c) with the given adapters active."""
        return self.denoiser(x, torch.tensor(t, device=x.device, dtype=torch.float32), cond, tuple(adapters),
                             checkpoint)

    def split(self, out: torch.Tensor, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) = (x - σ v, x + (1 - σ) v)."""
        sigma = self.coefficients(t)[1]
        return x - sigma * out, x + (1 - sigma) * out

"""SDXL backend: the SD 1.5 family's DDIM chain (ε or v prediction; `SDBackend` supplies the schedule, the
split and the decode) with SDXL's conditioning, built as StableDiffusionXLPipeline builds it:

    hidden   = [CLIP-L penultimate states ; CLIP-G penultimate states]   (B, 77, 768 + 1280)
    pooled   = CLIP-G's projected pooled embedding                       (B, 1280)
    time_ids = (original size, crop top-left, target size) = (H, W, 0, 0, H, W) at the model's resolution

for the conditional and the unconditional branch alike; the empty prompt (the unconditional branch) is all
zeros where the model's pipeline says `force_zeros_for_empty_prompt`, as the stock pipeline does when no
negative prompt is given. The VAE decodes in fp32 when its config asks for it (`force_upcast`: the stock
SDXL VAE overflows in fp16), so 1024 px images reach the reward intact and differentiable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from shortft import lora
from shortft.backends.common import Denoiser, freeze, load_failed, resolve_model
from shortft.backends.sd import SDBackend, ddim_scheduler


class SDXLDenoiser(Denoiser):
    def call(self, x, t, cond):
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return self.net(x, t, encoder_hidden_states=cond["hidden"], added_cond_kwargs=added).sample


@dataclass
class SDXLBackend(SDBackend):
    """SDBackend with SDXL's two text encoders and added conditioning; LoRA adapters live on `net`."""

    text_encoder_2: torch.nn.Module | None = None  # CLIPTextModelWithProjection (CLIP-G), frozen
    tokenizer_2: object = None
    zero_empty_prompt: bool = True  # model_index.json's force_zeros_for_empty_prompt
    lora_format: lora.LoraFormat = lora.SDXL_LORA
    family: str = "sdxl"

    def __post_init__(self):
        if self.denoiser is None:
            self.denoiser = SDXLDenoiser(self.net)

    @classmethod
    def load(cls, model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDXLBackend:
        """Load from a hub id or a local StableDiffusionXLPipeline folder."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        where = resolve_model(model)
        try:
            tokenizers = [CLIPTokenizer.from_pretrained(where, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
            text_l = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype)
            text_g = CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype)
            unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype)
            scheduler = ddim_scheduler(where)
        except OSError as err:
            raise load_failed(model, err) from err
        if vae.config.get("force_upcast", False):
            vae = vae.to(torch.float32)  # decodes in fp32: the stock SDXL VAE produces NaN in fp16
        device = torch.device(device)
        freeze(text_l, text_g, vae, unet, device=device)
        base = SDBackend.check_scheduler(model, scheduler)
        zero = json.loads((where / "model_index.json").read_text()).get("force_zeros_for_empty_prompt", True)
        return cls(net=unet, vae=vae, text_encoder=text_l, tokenizer=tokenizers[0], text_encoder_2=text_g,
                   tokenizer_2=tokenizers[1], zero_empty_prompt=zero, device=device, **base)

    def encode_prompts(self, prompts: list[str]) -> dict:
        """{"hidden": (B, 77, D_L + D_G), "pooled": (B, P_G), "time_ids": (B, 6)}, as StableDiffusionXLPipeline;
        "" rows are zeros when the model zeroes its empty prompt."""
        hidden, pooled = [], None
        with torch.no_grad():
            for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(self.device)
                out = enc(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2].float())
                pooled = out[0].float() if out[0].ndim == 2 else pooled
        hidden = torch.cat(hidden, dim=-1)
        if self.zero_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=self.device)
            hidden, pooled = (torch.where(empty.view(-1, *[1] * (v.ndim - 1)), 0.0, v) for v in (hidden, pooled))
        size = float(self.image_size)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=self.device).expand(len(prompts), -1)
        return {"hidden": hidden, "pooled": pooled, "time_ids": time_ids}

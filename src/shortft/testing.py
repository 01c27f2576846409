"""Tiny random-weight SD-format models for tests, benchmarks and quick debugging: same classes and
file layout as Stable Diffusion 1.5, a few hundred thousand parameters, saved with save_pretrained so
they load back through `SDBackend.load` like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_model(path: str | Path, seed: int = 0, prediction_type: str = "epsilon",
                    channels: tuple[int, ...] = (16, 32), text_dim: int = 32, sample_size: int = 8,
                    layers_per_block: int = 1, attention_head_dim: int = 4, norm_num_groups: int = 8) -> Path:
    """Write a tiny SD-format model folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) and return it.
    The UNet has one block per entry of `channels`, cross-attention in all but the lowest resolution (as SD)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from shortft.clip_vocab import write_clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=text_dim, attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=sample_size * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=600, hidden_size=text_dim, intermediate_size=2 * text_dim,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                                        bos_token_id=512, eos_token_id=513, pad_token_id=513))
    write_clip_tokenizer(path / "tokenizer", max_length=32)  # byte symbols only: ids < 514
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text.save_pretrained(path / "text_encoder")
    scheduler.save_pretrained(path / "scheduler")
    return path


def make_tiny_lora(model_dir: str | Path, out: str | Path, rank: int = 4, seed: int = 1, scale: float = 0.3,
                   kohya: bool = False) -> Path:
    """A random non-zero LoRA for the tiny model's UNet in the diffusers (or kohya) file format, standing in
    for a shortcut such as Hyper-SD's."""
    from diffusers import UNet2DConditionModel

    from shortft import lora

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    lora.add_lora(unet, "tmp", rank)
    g = torch.Generator().manual_seed(seed)
    for p in lora.adapter_parameters(unet, "tmp"):
        p.data = torch.randn(p.shape, generator=g) * scale
    out = Path(out)
    lora.save_lora(unet, "tmp", out)
    if kohya:
        from diffusers.utils import convert_state_dict_to_kohya
        from safetensors.torch import load_file, save_file

        sd = {k.replace("unet.", "", 1): v for k, v in load_file(out).items()}
        kohya_sd = {"lora_unet_" + k: v for k, v in convert_state_dict_to_kohya(sd).items()}
        save_file(kohya_sd, out)
    return out

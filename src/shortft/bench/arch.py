"""Full-size architectures with random weights, built offline from the published configs, saved as pipeline
folders the normal backends load: what each method costs on SD 1.5, SDXL and SD 3.5 Medium does not depend
on the weights' values, only on their shapes.

    sd15   UNet 860 M (320/640/1280/1280, cross-attention 768), VAE (128/256/512/512), CLIP-L text (12 x 768)
    sdxl   UNet 2.6 B (320/640/1280, 1/2/10 transformer layers, text_time conditioning), the same VAE (fp32
           decode), CLIP-L (12 x 768) and OpenCLIP-G text with projection (32 x 1280)
    sd35m  MMDiT-X 2.5 B (24 joint blocks of 1536, dual attention in the first 13, RMS qk-norm), 16-channel
           VAE, CLIP-L and CLIP-G with projections; no T5 (diffusers allows it; zeros in its slot)

`width_divisor` > 1 divides every width by it (same block layout and depth): the tests build the real
structure at toy size. The tokenizers are CLIP's real BPE, written offline.
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("sd15", "sdxl", "sd35m")


def _w(x: int, d: int, multiple: int = 8) -> int:
    """A width divided by d, kept a multiple of `multiple` (group norms and heads need it)."""
    return max(multiple, x // d // multiple * multiple)


def clip_text(d: int, width: int, layers: int, heads: int, projection: int | None, act: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    w = _w(width, d, 16)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=w, intermediate_size=4 * w, num_hidden_layers=layers,
                         num_attention_heads=max(1, heads if d == 1 else w // 16), max_position_embeddings=77,
                         hidden_act=act, projection_dim=_w(projection, d, 16) if projection else w,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def vae(d: int, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=2,
                         block_out_channels=tuple(_w(c, d, 32) for c in (128, 256, 512, 512)),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=32, sample_size=1024, **extra)


def build_sd15(folder: Path, d: int = 1) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from shortft.clip_vocab import clip_merges, write_clip_tokenizer

    text = clip_text(d, 768, 12, 12, None, "quick_gelu")
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(_w(c, d, 32) for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=text.config.hidden_size,
        attention_head_dim=8, norm_num_groups=32)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae(d, 4, scaling_factor=0.18215), text_encoder=text, unet=unet, scheduler=sched,
                            tokenizer=write_clip_tokenizer(folder / "tokenizer", clip_merges(), 77),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def build_sdxl(folder: Path, d: int = 1) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from shortft.clip_vocab import clip_merges, write_clip_tokenizer

    text_l, text_g = clip_text(d, 768, 12, 12, None, "quick_gelu"), clip_text(d, 1280, 32, 20, 1280, "gelu")
    time_dim = 256 if d == 1 else 32  # per time id (6 of them) in the added conditioning
    widths = tuple(_w(c, d, 32) for c in (320, 640, 1280))
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=widths,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20) if d == 1 else (1, 2, 4), use_linear_projection=True,
        cross_attention_dim=text_l.config.hidden_size + text_g.config.hidden_size, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=text_g.config.projection_dim + 6 * time_dim,
        norm_num_groups=32)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    tok = write_clip_tokenizer(folder / "tokenizer", clip_merges(), 77)
    StableDiffusionXLPipeline(vae=vae(d, 4, scaling_factor=0.13025, force_upcast=True), text_encoder=text_l,
                              text_encoder_2=text_g, unet=unet, scheduler=sched, tokenizer=tok,
                              tokenizer_2=write_clip_tokenizer(folder / "tokenizer_2", clip_merges(), 77)
                              ).save_pretrained(folder)


def build_sd35m(folder: Path, d: int = 1) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from shortft.clip_vocab import clip_merges, write_clip_tokenizer

    text_l, text_g = clip_text(d, 768, 12, 12, 768, "quick_gelu"), clip_text(d, 1280, 32, 20, 1280, "gelu")
    heads = 24 if d == 1 else 2
    net = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=heads, joint_attention_dim=4096 if d == 1 else 128, caption_projection_dim=64 * heads,
        pooled_projection_dim=text_l.config.projection_dim + text_g.config.projection_dim, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    StableDiffusion3Pipeline(
        transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(d, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=text_l, tokenizer=write_clip_tokenizer(folder / "tokenizer", clip_merges(), 77),
        text_encoder_2=text_g, tokenizer_2=write_clip_tokenizer(folder / "tokenizer_2", clip_merges(), 77),
        text_encoder_3=None, tokenizer_3=None).save_pretrained(folder)


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "sd35m": build_sd35m}


def build_arch(name: str, folder: Path, width_divisor: int = 1, seed: int = 0) -> Path:
    """The pipeline folder of architecture `name` with random weights (fp32 files), built once into `folder`."""
    import torch

    from shortft.errors import ConfigError

    if name not in BUILDERS:
        raise ConfigError(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        torch.manual_seed(seed)
        with torch.device("cpu"):
            BUILDERS[name](folder, width_divisor)
    return folder

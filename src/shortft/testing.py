"""Tiny random-weight models of each family (SD 1.5, SDXL, SD 3) for tests, benchmarks and quick debugging: the real classes and
file layout (a diffusers pipeline folder with model_index.json), a few hundred thousand parameters, saved
with save_pretrained so they load back through the backends like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

TOKENS = 514  # the byte-symbol CLIP vocabulary of shortft.clip_vocab with no merges: bos 512, eos 513


def tiny_clip_text(width: int, projection: int | None = None):
    """A 2-layer CLIP text tower over the byte vocabulary (with a projection: CLIPTextModelWithProjection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=600, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513, projection_dim=projection or width)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def tiny_vae(latent_channels: int, sample_size: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=sample_size * 2, **kw)


def make_tiny_model(path: str | Path, seed: int = 0, prediction_type: str = "epsilon",
                    channels: tuple[int, ...] = (16, 32), text_dim: int = 32, sample_size: int = 8,
                    layers_per_block: int = 1, attention_head_dim: int = 4, norm_num_groups: int = 8) -> Path:
    """Write a tiny SD 1.5-format pipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/) and return it.
    The UNet has one block per entry of `channels`, cross-attention in all but the lowest resolution (as SD)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from shortft.clip_vocab import write_clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    n = len(channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), cross_attention_dim=text_dim,
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=tiny_vae(4, sample_size), text_encoder=tiny_clip_text(text_dim),
                                   tokenizer=write_clip_tokenizer(path / "tokenizer", max_length=32), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def tiny_t5_tokenizer(folder: Path):
    """A T5TokenizerFast over single characters (a Unigram model made offline), saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(ord("a"), ord("z") + 1)] + [(c, -2.0) for c in ",.-0123456789"]
    core = Tokenizer(models.Unigram(pieces, unk_id=2))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    tok = T5TokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    tok.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def make_tiny_sd3(path: str | Path, seed: int = 0, t5: bool = True, sample_size: int = 8, width: int = 32,
                  layers: int = 1, shift: float = 3.0) -> Path:
    """Write a tiny SD 3-format pipeline folder (transformer/ vae/ text_encoder{,_2,_3}/ tokenizer{,_2,_3}/
    scheduler/; without T5 when t5=False, as diffusers allows) and return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    from shortft.clip_vocab import write_clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    net = SD3Transformer2DModel(sample_size=sample_size, patch_size=1, in_channels=4, out_channels=4,
                                num_layers=layers, attention_head_dim=8, num_attention_heads=width // 8,
                                joint_attention_dim=width, caption_projection_dim=width,
                                pooled_projection_dim=width // 2 + width)  # CLIP-L + CLIP-G projections
    clip_l, clip_g = tiny_clip_text(width // 2, projection=width // 2), tiny_clip_text(width // 2, projection=width)
    text_3 = tok_3 = None
    if t5:
        text_3 = T5EncoderModel(T5Config(vocab_size=64, d_model=width, d_ff=2 * width, d_kv=8, num_layers=1,
                                         num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        tok_3 = tiny_t5_tokenizer(path / "tokenizer_3")
    pipe = StableDiffusion3Pipeline(
        transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=tiny_vae(4, sample_size, shift_factor=0.06, scaling_factor=1.5),
        text_encoder=clip_l, tokenizer=write_clip_tokenizer(path / "tokenizer", max_length=32),
        text_encoder_2=clip_g, tokenizer_2=write_clip_tokenizer(path / "tokenizer_2", max_length=32),
        text_encoder_3=text_3, tokenizer_3=tok_3)
    pipe.save_pretrained(path)
    return path


def make_tiny_sdxl(path: str | Path, seed: int = 0, sample_size: int = 8, width: int = 32,
                   channels: tuple[int, int] = (16, 32)) -> Path:
    """Write a tiny SDXL-format pipeline folder (unet/ with addition_embed_type="text_time", vae/, text_encoder/,
    text_encoder_2/ with a projection, both tokenizers, scheduler/) and return it. Cross-attention runs in the
    lower-resolution block only, as SDXL's UNet has none at its highest resolution."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from shortft.clip_vocab import write_clip_tokenizer

    path = Path(path)
    torch.manual_seed(seed)
    time_dim = 8  # per time id; 6 of them (original size, crop, target size) join the pooled text embedding
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 1), cross_attention_dim=2 * width,
        projection_class_embeddings_input_dim=width + 6 * time_dim, norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(4, sample_size, force_upcast=True), text_encoder=tiny_clip_text(width),
        text_encoder_2=tiny_clip_text(width, projection=width), unet=unet, scheduler=scheduler,
        tokenizer=write_clip_tokenizer(path / "tokenizer", max_length=32),
        tokenizer_2=write_clip_tokenizer(path / "tokenizer_2", max_length=32))
    pipe.save_pretrained(path)
    return path


def make_tiny_lora(model_dir: str | Path, out: str | Path, rank: int = 4, seed: int = 1, scale: float = 0.3,
                   kohya: bool = False) -> Path:
    """A random non-zero LoRA for the tiny model's denoising network in its family's diffusers (or, for the
    UNet, kohya) file format, standing in for a shortcut such as Hyper-SD's."""
    from shortft import lora
    from shortft.backends import load_backend

    backend = load_backend(str(model_dir))
    fmt = backend.lora_format
    lora.add_lora(backend.net, "tmp", rank, targets=fmt.targets)
    g = torch.Generator().manual_seed(seed)
    for p in lora.adapter_parameters(backend.net, "tmp"):
        p.data = torch.randn(p.shape, generator=g) * scale
    out = Path(out)
    lora.save_lora(backend.net, "tmp", out, fmt=fmt)
    if kohya:
        from diffusers.utils import convert_state_dict_to_kohya
        from safetensors.torch import load_file, save_file

        sd = {k.replace("unet.", "", 1): v for k, v in load_file(out).items()}
        kohya_sd = {"lora_unet_" + k: v for k, v in convert_state_dict_to_kohya(sd).items()}
        save_file(kohya_sd, out)
    return out

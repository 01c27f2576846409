"""The world's denoiser: a UNet2DConditionModel (epsilon prediction, SD 1.5 schedule) over the VAE's 8x8x4
latents with its CLIP text encoder, saved with the VAE, tokenizer and DDIM scheduler as a
StableDiffusionPipeline folder (model/)."""

from __future__ import annotations

import copy

import torch
from tqdm import tqdm

from shortft.config import to_dict
from shortft.factory.clip import text_config
from shortft.factory.common import ema_update, load_as_fp32, load_ema, lr_at, require, update
from shortft.factory.config import PretrainConfig
from shortft.factory.resume import Checkpointer
from shortft.factory.tokenizer import load_tokenizer, tokenize
from shortft.world.scenes import TEMPLATES, caption, render, sample_scenes

SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


def unet_config(tiny: bool, cross_dim: int) -> dict:
    """UNet over 8x8x4 latents: 8 -> 4 -> 2, cross-attention at every level.

    Why the text also enters the time embedding (addition_embed_type="text", FiLM scale-shift):
    position is decided at high noise, where each 8x8 site sees nearly pure noise; a global
    text vector that modulates every ResNet lets the coarse 2x2 level place the object."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 16, 16) if tiny else (64, 128, 128),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_dim,
        attention_head_dim=8 if tiny else 32,
        addition_embed_type="text",
        addition_embed_type_num_heads=2 if tiny else 4,
        resnet_time_scale_shift="scale_shift",
    )


def ddim_scheduler():
    """SD 1.5's DDIM sampler settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SD15_SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading"
    )


@torch.no_grad()
def latent_pool(vae, n: int, seed: int, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode n train-split scenes once: posterior means (N, 4, 8, 8) and the token ids of every caption
    template (N, T, L).

    Means, not posterior samples: the VAE reconstructs from the mean and its KL weight is tiny, so the
    encoder's log-variance only ever sees the KL gradient and sits at 0 (std exactly 1, against latent
    means of mean |z| 0.57). Sampling would bury every training latent in unit noise."""
    scenes = sample_scenes(n, "train", seed=seed)
    means = [vae.encode(render(scenes[i : i + 128]) * 2 - 1).latent_dist.mean
             for i in tqdm(range(0, n, 128), desc="encode latents", mininterval=5)]
    ids = torch.stack([tokenize(tok, [caption(s, k) for s in scenes]) for k in range(len(TEMPLATES))], 1)
    return torch.cat(means), ids


def draw(mean: torch.Tensor, ids: torch.Tensor, n: int, g: torch.Generator):
    """n random pool entries: latents (n, 4, 8, 8), unscaled, and the token ids of one random caption
    template each (n, L)."""
    idx = torch.randint(len(mean), (n,), generator=g)
    return mean[idx], ids[idx, torch.randint(ids.shape[1], (n,), generator=g)]


def text_encoder(cfg: PretrainConfig):
    """The UNet's text encoder and whether it trains: a fresh CLIPTextModel trained jointly with the UNet,
    or the world CLIP's text tower (clip/, which the clip part writes first), frozen or fine-tuned (the
    tower separates position phrases from the start; fine-tuning adds what the UNet needs)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if cfg.unet.text == "joint":
        return CLIPTextModel(CLIPTextConfig(**text_config(cfg.unet.tiny))), True
    text = CLIPTextModel.from_pretrained(require(cfg.root / "clip", "clip"), torch_dtype=torch.float32)  # the tower of a CLIPModel
    if cfg.unet.text == "clip-tuned":
        return text.train(), True
    return text.requires_grad_(False).eval(), False


def denoising_loss(unet, text, text_trains: bool, x0: torch.Tensor, ids: torch.Tensor, acp: torch.Tensor,
                   highnoise: float, g: torch.Generator) -> torch.Tensor:
    """Epsilon MSE at a random timestep per row, weighted 1 + min(1/SNR, highnoise).

    Epsilon MSE hardly penalises a wrong layout at high noise (x0's share of eps is sqrt(SNR)); the
    weight gives those steps an x0-like weight, like v-prediction's loss."""
    b = len(x0)
    t = torch.randint(0, len(acp), (b,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    a = acp[t].view(b, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # (B, 4, 8, 8)
    with torch.set_grad_enabled(text_trains):
        context = text(ids).last_hidden_state  # (B, L, D)
    eps = unet(xt, t, encoder_hidden_states=context).sample
    snr = acp[t] / (1 - acp[t])
    w = 1.0 + (1.0 / snr).clamp(max=highnoise) if highnoise else torch.ones(b)
    return (w * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()


def build_unet(cfg: PretrainConfig):
    """(unet, text encoder, whether the text encoder trains, optimiser, trained parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(cfg.seed)
    text, text_trains = text_encoder(cfg)
    unet = UNet2DConditionModel(**unet_config(cfg.unet.tiny, text.config.hidden_size))
    groups = [dict(params=list(unet.parameters()), scale=1.0)]
    if text_trains:
        scale = cfg.unet.text_lr_scale if cfg.unet.text == "clip-tuned" else 1.0
        groups.append(dict(params=list(text.parameters()), scale=scale))
    opt = torch.optim.AdamW(groups, lr=cfg.unet.lr, weight_decay=0.01, fused=True)  # fused: 10x faster step on CPU
    params = (list(text.parameters()) if text_trains else []) + list(unet.parameters())
    return unet, text, text_trains, opt, params


def pretrain_unet(cfg: PretrainConfig):
    """Train the UNet (and its text encoder, unless frozen) on the VAE's posterior means of train scenes;
    ship the EMA weights as model/ (fp16). Returns (unet, text encoder, losses)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    c = cfg.unet
    model_dir = cfg.root / "model"
    tok = load_tokenizer(require(model_dir / "tokenizer", "tokenizer"))
    vae = AutoencoderKL.from_pretrained(require(model_dir / "vae", "vae"), torch_dtype=torch.float32).eval()
    scale = vae.config.scaling_factor
    unet, text, text_trains, opt, params = build_unet(cfg)
    ema = [p.detach().clone() for p in params]
    ckpt = Checkpointer(cfg.work / "unet", c.checkpoint_every, {**to_dict(c), "seed": cfg.seed},
                        {"unet": unet, "text": text}, opt, {"ema": ema})
    start = ckpt.resume()
    pool_mean, pool_ids = latent_pool(vae, c.pool, cfg.seed + 1, tok)
    empty = tokenize(tok, [""])[0]  # (L,)
    acp = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod  # (1000,)
    print(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, text encoder "
          f"{sum(p.numel() for p in text.parameters()) / 1e6:.2f} M ({c.text}); {c.steps} steps x batch "
          f"{c.batch}; latent pool {len(pool_mean)}; scaling {scale:.4f}")
    g = torch.Generator()
    losses = []
    bar = tqdm(range(start, c.steps), desc="unet", mininterval=10)
    for step in bar:
        g.manual_seed(cfg.seed * 1_000_003 + step)  # each step's draws depend only on (seed, step)
        x0, ids = draw(pool_mean, pool_ids, c.batch, g)
        ids[torch.rand(c.batch, generator=g) < c.drop_caption] = empty
        loss = denoising_loss(unet, text, text_trains, x0 * scale, ids, acp, c.highnoise, g)
        lr = lr_at(step, c.steps, c.lr, c.lr_min, c.warmup)
        losses.append(update(opt, loss, lr, clip=params))
        ema_update(ema, params, step, c.ema)
        ckpt.step_done(step + 1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", lr=f"{lr:.1e}")
    load_ema(params, ema)  # ship the EMA weights
    save_world_model(model_dir, unet, text, tok)
    return unet, text, losses


def save_world_model(model_dir, unet, text, tokenizer) -> None:
    """Write unet/ text_encoder/ (fp16 safetensors), scheduler/ and model_index.json next to vae/ (written
    again, unchanged) and tokenizer/ (kept byte for byte), so StableDiffusionPipeline.from_pretrained(model_dir)
    works. The modules passed in stay fp32."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(model_dir / "vae"),
        text_encoder=copy.deepcopy(text),
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet),
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    files = {p: p.read_bytes() for p in (model_dir / "tokenizer").iterdir()}
    pipe.save_pretrained(model_dir, safe_serialization=True)
    load_as_fp32(model_dir / "text_encoder")
    for path in (model_dir / "tokenizer").iterdir():  # the pipeline added a 3.5 MB tokenizer.json: back to what ships
        path.unlink()
    for path, data in files.items():
        path.write_bytes(data)
    print(f"saved world model to {model_dir}")

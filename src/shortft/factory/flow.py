"""The embedded flow world: an SD 3-format rectified-flow model trained here on the same procedural world,
saved as a StableDiffusion3Pipeline folder (flow-model/) that `--model world-flow` names.

What it reuses of the ε world: the VAE (its latents, scaling factor and refined decoder; shift factor 0),
the tokenizer, and the world CLIP's text tower as CLIP-L, fine-tuned with the transformer as the ε world's
UNet fine-tunes it. SD 3 has a second CLIP (CLIP-G); here it is a small frozen random tower (its states
and pooled embedding are a fixed random code of the words) and there is no T5: the pipeline's T5 slot is
zeros, as diffusers makes it without text_encoder_3, with a sequence length of 1 instead of 256
(`FLOW_T5_LENGTH`, recorded in the folder's shortft.json; a stock pipeline reproduces the model with
`max_sequence_length=1`), which keeps the joint sequence short enough to train on a CPU.

Training: x_σ = (1-σ) x0 + σ ε with σ = shift(u), u uniform and the scheduler's shift applied (more time at
high noise, where layout is decided); the transformer predicts v = ε - x0 (MSE); empty captions for CFG;
EMA weights ship, in fp16.
"""

from __future__ import annotations

import copy
import shutil

import torch
from tqdm import tqdm

from shortft import files
from shortft.config import to_dict
from shortft.factory.common import ema_update, load_as_fp32, load_ema, lr_at, require, update
from shortft.factory.config import PretrainConfig
from shortft.factory.resume import Checkpointer
from shortft.factory.tokenizer import load_tokenizer, tokenize
from shortft.factory.unet import draw, latent_pool

FLOW_T5_LENGTH = 1  # the T5 slot's (all-zero) sequence length of the flow world


def transformer_config(tiny: bool, clip_widths: tuple[int, int], pooled: int) -> dict:
    """SD3Transformer2DModel over the VAE's 8x8x4 latents in 2x2 patches (16 image tokens)."""
    return dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1 if tiny else 8,
                attention_head_dim=8 if tiny else 32, num_attention_heads=2 if tiny else 4,
                joint_attention_dim=sum(clip_widths), caption_projection_dim=16 if tiny else 128,
                pooled_projection_dim=pooled, pos_embed_max_size=4)


def text_encoders(cfg: PretrainConfig):
    """(CLIP-L: the world CLIP's text tower with its projection, trained; CLIP-G: a small random tower with a
    projection, frozen)."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModelWithProjection

    clip_dir = require(cfg.root / "clip", "clip")
    text_cfg = CLIPConfig.from_pretrained(clip_dir)
    tower = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_cfg.text_config.to_dict(),
                                                         "projection_dim": text_cfg.projection_dim}))
    weights = load_file(clip_dir / "model.safetensors")
    tower.load_state_dict({k: v.float() for k, v in weights.items() if k.startswith(("text_model.", "text_projection."))})
    torch.manual_seed(cfg.seed + 11)
    g_width = 8 if cfg.flow.tiny else 16
    second = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=g_width, intermediate_size=2 * g_width, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=tower.config.max_position_embeddings, projection_dim=g_width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return tower.train(), second.requires_grad_(False).eval()


def encode(text_l, text_g, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids -> joint states (B, L + FLOW_T5_LENGTH, D_L + D_G) and pooled (B, P_L + P_G), as
    StableDiffusion3Pipeline builds them (penultimate CLIP states side by side, then the zero T5 slot)."""
    out_l, out_g = (enc(ids, output_hidden_states=True) for enc in (text_l, text_g))
    clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    t5 = clip.new_zeros(len(ids), FLOW_T5_LENGTH, clip.shape[-1])
    return torch.cat([clip, t5], dim=1), torch.cat([out_l[0], out_g[0]], dim=-1)


def flow_loss(net, text_l, text_g, x0: torch.Tensor, ids: torch.Tensor, shift: float, g: torch.Generator):
    """Rectified-flow velocity MSE at σ = shift(u), u ~ U(0, 1), one σ per row."""
    u = torch.rand(len(x0), generator=g)
    sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    hidden, pooled = encode(text_l, text_g, ids)
    v = net(hidden_states=(1 - sigma) * x0 + sigma * noise, timestep=sigma.flatten() * 1000,
            encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]
    return ((v - (noise - x0)) ** 2).mean()


def pretrain_flow(cfg: PretrainConfig):
    """Train the transformer and CLIP-L on the VAE's posterior means of train scenes; ship the EMA weights as
    flow-model/. Returns (transformer, CLIP-L, losses)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    c = cfg.flow
    vae = AutoencoderKL.from_pretrained(require(cfg.root / "model" / "vae", "vae"), torch_dtype=torch.float32).eval()
    tok = load_tokenizer(require(cfg.root / "model" / "tokenizer", "tokenizer"))
    text_l, text_g = text_encoders(cfg)
    torch.manual_seed(cfg.seed)
    pooled = text_l.config.projection_dim + text_g.config.projection_dim
    net = SD3Transformer2DModel(**transformer_config(c.tiny, (text_l.config.hidden_size, text_g.config.hidden_size),
                                                     pooled))
    groups = [dict(params=list(net.parameters()), scale=1.0), dict(params=list(text_l.parameters()),
                                                                     scale=c.text_lr_scale)]
    opt = torch.optim.AdamW(groups, lr=c.lr, weight_decay=0.01, fused=True)
    params = list(text_l.parameters()) + list(net.parameters())
    ema = [p.detach().clone() for p in params]
    ckpt = Checkpointer(cfg.work / "flow", c.checkpoint_every, {**to_dict(c), "seed": cfg.seed},
                        {"net": net, "text": text_l}, opt, {"ema": ema})
    start = ckpt.resume()
    pool_mean, pool_ids = latent_pool(vae, c.pool, cfg.seed + 1, tok)
    scale, empty = vae.config.scaling_factor, tokenize(tok, [""])[0]
    print(f"flow: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M transformer params, CLIP-L "
          f"{sum(p.numel() for p in text_l.parameters()) / 1e6:.2f} M (trained), CLIP-G "
          f"{sum(p.numel() for p in text_g.parameters()) / 1e6:.2f} M (frozen); {c.steps} steps x batch {c.batch}")
    g, losses = torch.Generator(), []
    bar = tqdm(range(start, c.steps), desc="flow", mininterval=10)
    for step in bar:
        g.manual_seed(cfg.seed * 1_000_003 + step)  # each step's draws depend only on (seed, step)
        x0, ids = draw(pool_mean, pool_ids, c.batch, g)
        ids[torch.rand(c.batch, generator=g) < c.drop_caption] = empty
        loss = flow_loss(net, text_l, text_g, x0 * scale, ids, c.shift, g)
        losses.append(update(opt, loss, lr_at(step, c.steps, c.lr, c.lr_min, c.warmup), clip=params))
        ema_update(ema, params, step, c.ema)
        ckpt.step_done(step + 1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    load_ema(params, ema)  # ship the EMA weights
    save_flow_model(cfg, net, text_l, text_g, vae)
    return net, text_l, losses


def save_flow_model(cfg: PretrainConfig, net, text_l, text_g, vae) -> None:
    """flow-model/: a StableDiffusion3Pipeline folder (fp16 weights, no T5) plus shortft.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    folder, tokenizer_dir = cfg.root / "flow-model", cfg.root / "model" / "tokenizer"
    vae = copy.deepcopy(vae)
    vae.register_to_config(shift_factor=0.0)  # SD 3's decode adds it back; these latents are not shifted
    tok = load_tokenizer(tokenizer_dir)
    pipe = StableDiffusion3Pipeline(transformer=copy.deepcopy(net), vae=vae, text_encoder=copy.deepcopy(text_l),
                                    text_encoder_2=copy.deepcopy(text_g), text_encoder_3=None, tokenizer=tok,
                                    tokenizer_2=tok, tokenizer_3=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.flow.shift))
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # the world's CLIP tokenizer as it ships (save added a tokenizer.json)
        shutil.rmtree(folder / sub)
        shutil.copytree(tokenizer_dir, folder / sub)
    for sub in ("text_encoder", "text_encoder_2"):
        load_as_fp32(folder / sub)
    files.write_json(folder / "shortft.json", {"max_sequence_length": FLOW_T5_LENGTH})
    print(f"saved the flow world model to {folder}")

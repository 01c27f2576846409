"""The world's VAE: an AutoencoderKL 64x64x3 -> 8x8x4 trained on train-split scenes (held-out compositions
never), and the refinement of its decoder with the encoder frozen."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shortft.config import to_dict
from shortft.factory.common import lr_at, require, save_fp16, update
from shortft.factory.config import PretrainConfig
from shortft.factory.resume import Checkpointer
from shortft.world.scenes import COLOURS, random_colours, render, sample_scenes


def vae_config(tiny: bool) -> dict:
    """Four downsampling levels, one ResNet each, 4 latent channels."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8) if tiny else (16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def object_weight(x: torch.Tensor, w: float) -> torch.Tensor:
    """(B, 1, H, W) loss weight: 1 on background, 1 + w where the pixel differs from the corner."""
    diff = (x - x[:, :, :1, :1]).abs().sum(1, keepdim=True)
    return 1.0 + w * (diff > 0.05).float()


def vae_images(n: int, random_colour: float, seed: int) -> torch.Tensor:
    """(n, 3, 64, 64) train-split scenes in [0, 1]; a `random_colour` share recoloured at random."""
    scenes = sample_scenes(n, "train", seed=seed)
    if random_colour <= 0:
        return render(scenes)
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([COLOURS[s.colour] for s in scenes])
    swap = torch.rand(len(scenes), generator=g) < random_colour
    colours[swap] = random_colours(scenes, g)[swap]
    return render(scenes, colours)


@torch.no_grad()
def vae_readback(vae, n: int = 64, seed: int = 3) -> dict[str, float]:
    """Shape as the evaluator reads it from reconstructions of n real train and n held-out images: how much
    shape the latent keeps (the UNet cannot draw what the decoder cannot)."""
    from shortft.world.evaluator import read_attributes

    out = {}
    for split in ("train", "heldout"):
        scenes = sample_scenes(n, split, seed=seed)
        rec = vae.decode(vae.encode(render(scenes) * 2 - 1).latent_dist.mean).sample
        read = read_attributes(((rec + 1) / 2).clamp(0, 1))
        out[split] = sum(r["shape"] == s.shape for r, s in zip(read, scenes)) / n
    return out


def _log(bar, name: str, step: int, loss: torch.Tensor, rec: torch.Tensor, x: torch.Tensor, vae, readback_every: int):
    """Loss and PSNR on the bar every 100 steps; the shape read-back every `readback_every` steps."""
    if step % 100 == 0:
        mse = F.mse_loss(rec.detach(), x).item()
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{-10 * math.log10(max(mse, 1e-10)):.1f}")
    if readback_every and (step + 1) % readback_every == 0:
        rb = vae_readback(vae)
        tqdm.write(f"{name}: step {step + 1} shape read back from reconstructions: train {rb['train']:.3f}, "
                   f"held-out {rb['heldout']:.3f}")


@torch.no_grad()
def set_scaling_factor(vae, n: int, seed: int) -> float:
    """Scaling factor: 1 / std of the posterior means of n train scenes, as in SD (0.18215)."""
    x = render(sample_scenes(n, "train", seed=10_000 + seed))
    z = torch.cat([vae.encode(c * 2 - 1).latent_dist.mean for c in x.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae.config.scaling_factor


def pretrain_vae(cfg: PretrainConfig):
    """Train the VAE from scratch, reconstructing from the posterior mean (sampling stalled) with extra
    weight on object pixels; write model/vae (fp16). Returns (vae, losses)."""
    from diffusers import AutoencoderKL

    c = cfg.vae
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**vae_config(c.tiny))
    opt = torch.optim.Adam(vae.parameters(), lr=c.lr)
    ckpt = Checkpointer(cfg.work / "vae", c.checkpoint_every, {**to_dict(c), "seed": cfg.seed}, {"vae": vae}, opt)
    start = ckpt.resume()
    print(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, {c.steps} steps x batch {c.batch}")
    losses = []
    bar = tqdm(range(start, c.steps), desc="vae", mininterval=5)
    for step in bar:
        x = vae_images(c.batch, c.random_colour, seed=cfg.seed * 1_000_003 + step)  # (B, 3, 64, 64)
        post = vae.encode(x * 2 - 1).latent_dist
        rec = (vae.decode(post.mean).sample + 1) / 2
        loss = (object_weight(x, c.object_weight) * (rec - x) ** 2).mean() + c.kl * post.kl().mean()
        losses.append(update(opt, loss, lr_at(step, c.steps, c.lr, c.lr_min, c.warmup)))
        ckpt.step_done(step + 1)
        _log(bar, "vae", step, loss, rec, x, vae, c.readback_every)
    vae.eval()
    scale = set_scaling_factor(vae, c.scale_images, cfg.seed)
    out = save_fp16(vae, cfg.root / "model" / "vae")
    print(f"vae: saved to {out}; scaling_factor {scale:.4f}")
    return vae, losses


def pretrain_vae_decoder(cfg: PretrainConfig):
    """Refine the saved VAE's decoder with the encoder frozen: the latent space (and so the UNet and the
    scaling factor) stays exactly as it is, reconstructions get sharper. Every other step decodes the mean
    plus a little noise (`decoder.noise`), so slightly-off latents from the UNet decode well. Not a
    posterior sample: the posterior std is 1 (see unet.latent_pool), which would teach the decoder to guess
    shapes from unit noise. Rewrites model/vae (fp16). Returns (vae, losses)."""
    from diffusers import AutoencoderKL

    c, v = cfg.decoder, cfg.vae
    folder = require(cfg.root / "model" / "vae", "vae")
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    vae.requires_grad_(False)
    train = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train, lr=c.lr)
    settings = {**to_dict(c), "object_weight": v.object_weight, "random_colour": v.random_colour, "seed": cfg.seed}
    ckpt = Checkpointer(cfg.work / "vae_decoder", c.checkpoint_every, settings, {"vae": vae}, opt)
    start = ckpt.resume()
    latent_std = 1 / vae.config.scaling_factor
    losses = []
    bar = tqdm(range(start, c.steps), desc="vae decoder", mininterval=10)
    for step in bar:
        x = vae_images(c.batch, v.random_colour, seed=cfg.seed * 1_000_003 + step + 2_000_000)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 3_000_000)
        with torch.no_grad():
            mean = vae.encode(x * 2 - 1).latent_dist.mean
            z = mean + (step % 2) * c.noise * latent_std * torch.randn(mean.shape, generator=g)
        rec = (vae.decode(z).sample + 1) / 2
        loss = (object_weight(x, v.object_weight) * (rec - x) ** 2).mean()
        losses.append(update(opt, loss, lr_at(step, c.steps, c.lr, c.lr_min)))
        ckpt.step_done(step + 1)
        _log(bar, "vae decoder", step, loss, rec, x, vae, c.readback_every)
    vae.eval()
    save_fp16(vae, folder)
    print(f"vae decoder: saved to {folder}")
    return vae, losses

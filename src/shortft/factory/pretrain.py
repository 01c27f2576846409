"""Pretrain every asset of the embedded world from scratch: tokenizer, VAE, CLIP, text encoder + UNet,
VAE decoder refinement, and the shortcut (by `shortft distill`).

Each part is one function `pretrain_<part>(cfg)` that reads only the world generator (and, for the
UNet, the VAE it already saved) and writes a `save_pretrained` folder. Long parts checkpoint to
`cfg.work_dir` so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shortft.world import ASSETS
from shortft.world.scenes import (
    COLOURS,
    MAX_TOKENS,
    caption,
    one_attribute_wrong,
    random_colours,
    render,
    sample_scenes,
)


@dataclass
class PretrainConfig:
    out: Path = ASSETS  # asset root: writes model/ and clip/ below it
    work_dir: Path = Path("runs/world-pretrain")  # checkpoints and logs (never committed)
    seed: int = 0  # every data stream and init derives from it
    tiny: bool = False  # tiny networks and few steps: for tests
    threads: int = 0  # torch CPU threads (0 = torch default)
    # VAE
    vae_steps: int = 3000  # ~11 min at 4.7 it/s alone on 2 threads; shape read back from reconstructions still rose at 1,500
    vae_batch: int = 16  # small batches trained faster than 32 per wall-clock minute
    vae_lr: float = 1e-3  # cosine-decayed to vae_lr_min
    vae_lr_min: float = 2e-4
    vae_object_weight: float = 8.0  # extra loss weight on object pixels: the background is trivial
    vae_kl: float = 1e-6  # tiny KL keeps the latent scale bounded; reconstruction uses the mean
    vae_random_colour: float = 0.5  # fraction of VAE images whose object gets a random RGB colour (never one read as a held-out pair), so the codec does not tie shape to colour
    vae_decoder_steps: int = 2000  # decoder-only fine-tune, encoder (the latent space) frozen (~5 min): decodes the UNet's off-manifold latents cleanly
    vae_decoder_noise: float = 0.1  # on half the refinement steps the decoder reads mean + this x (latent std) x N(0, 1): slightly-off latents, as the UNet makes them
    # text encoder + UNet
    unet_steps: int = 5000  # ~22 min alone on 2 threads (4 it/s)
    unet_batch: int = 32  # half the step time of 64 on 2 shared cores: more updates before the deadline
    unet_lr: float = 5e-4
    unet_warmup: int = 100
    unet_drop_caption: float = 0.1  # empty captions so classifier-free guidance works
    unet_ema: float = 0.999  # EMA decay of the shipped weights
    unet_highnoise: float = 5.0  # loss weight 1 + min(1/SNR, this) favours high-noise (layout) steps; 0 = plain
    unet_pool: int = 10000  # pre-encoded training latents (encoding is a one-off ~2 min)
    unet_text_lr_scale: float = 0.1  # with unet_text="clip-tuned": the text tower's learning rate relative to the UNet's
    unet_text: str = "clip-tuned"  # the UNet's text encoder: joint (a fresh CLIPTextModel trained with it), clip (the world CLIP's text tower, frozen, as SD freezes OpenAI CLIP's) or clip-tuned (that tower, trained with the UNet)
    # CLIP preference model
    clip_steps: int = 1000  # ~7 min at 1 thread
    clip_batch: int = 64
    clip_lr: float = 1e-3
    clip_hard_negatives: int = 2  # one-attribute-wrong captions per image in each batch
    # shortcut (`shortft distill` with the settings that made the shipped file, docs/distill.md)
    shortcut_steps: int = 10000  # distillation step cap; on 2 CPU cores the time budget ends it first
    shortcut_seconds: float = 3000.0  # distillation time budget (the shipped file: 3,000 s); the cosine learning rate reaches 0 there
    shortcut_anchor_fraction: float = 0.5  # share of distillation steps whose rows start where ShortFT jumps (DistillConfig.anchor_fraction)

    def __post_init__(self) -> None:
        self.out, self.work_dir = Path(self.out), Path(self.work_dir)
        if self.tiny:
            self.vae_steps, self.unet_steps, self.clip_steps, self.vae_decoder_steps = 4, 4, 4, 2
            self.vae_batch, self.unet_batch, self.clip_batch = 4, 4, 8
            self.unet_pool, self.unet_warmup = 16, 1
            self.shortcut_steps, self.shortcut_seconds = 3, 0.0


# ----------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(out_dir: Path):
    """The real CLIP BPE tokenizer (49,408 tokens) built offline from open_clip's bundled merges,
    saved as a transformers CLIPTokenizer. Ids equal `open_clip.tokenize`."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # 48,894 merges, as CLIP
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=merges,
        model_max_length=MAX_TOKENS,
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(out_dir)
    # Ship vocab.json + merges.txt only (1.4 MB): both transformers 4 and 5 rebuild the same tokenizer from
    # them, and tokenizer.json would add 3.5 MB of the same content.
    (out_dir / "tokenizer.json").unlink(missing_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer.from_pretrained(out_dir)  # the saved files are what ships


def load_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


def tokenize(tok, prompts: list[str]) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------- VAE
def vae_config(tiny: bool) -> dict:
    ch = (8, 8, 8, 8) if tiny else (16, 32, 64, 64)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=ch,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _object_weight(x: torch.Tensor, w: float) -> torch.Tensor:
    """(B, 1, H, W) loss weight: 1 on background, 1 + w where the pixel differs from the corner."""
    diff = (x - x[:, :, :1, :1]).abs().sum(1, keepdim=True)
    return 1.0 + w * (diff > 0.05).float()


def _vae_images(cfg: PretrainConfig, seed: int) -> torch.Tensor:
    """A VAE training batch of train-split scenes; a `vae_random_colour` fraction recoloured at random."""
    scenes = sample_scenes(cfg.vae_batch, "train", seed=seed)
    if cfg.vae_random_colour <= 0:
        return render(scenes)
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([COLOURS[s.colour] for s in scenes])
    swap = torch.rand(len(scenes), generator=g) < cfg.vae_random_colour
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


def _cosine_lr(step: int, total: int, lr: float, lr_min: float, warmup: int = 0) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(1.0, p)))


def _save_ckpt(path: Path, **state) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def pretrain_vae(cfg: PretrainConfig):
    """AutoencoderKL 64x64x3 -> 8x8x4, trained on train-split scenes (held-out compositions never)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**vae_config(cfg.tiny))
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    ckpt = cfg.work_dir / "vae.pt"
    start = 0
    if ckpt.exists() and not cfg.tiny:
        s = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        start = s["step"]
        print(f"vae: resumed at step {start}")
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"vae: {n_params / 1e6:.2f} M params, {cfg.vae_steps} steps x batch {cfg.vae_batch}")
    losses = []
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", disable=cfg.tiny, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, cfg.vae_steps, cfg.vae_lr, cfg.vae_lr_min, warmup=100)
        x = _vae_images(cfg, seed=cfg.seed * 1_000_003 + step)  # (B, 3, 64, 64)
        post = vae.encode(x * 2 - 1).latent_dist
        rec = (vae.decode(post.mean).sample + 1) / 2  # reconstruct from the mean (sampling stalled)
        w = _object_weight(x, cfg.vae_object_weight)
        loss = (w * (rec - x) ** 2).mean() + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            mse = F.mse_loss(rec.detach(), x).item()
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{-10 * math.log10(max(mse, 1e-10)):.1f}")
        if (step + 1) % 250 == 0 and not cfg.tiny:
            _save_ckpt(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
            rb = vae_readback(vae)
            tqdm.write(f"vae: step {step + 1} shape read back from reconstructions: "
                       f"train {rb['train']:.3f}, held-out {rb['heldout']:.3f}")
    vae.eval()
    # Scaling factor: 1 / std of the posterior means over a fixed batch, as in SD (0.18215).
    with torch.no_grad():
        x = render(sample_scenes(64 if cfg.tiny else 1024, "train", seed=10_000 + cfg.seed))
        z = torch.cat([vae.encode(c * 2 - 1).latent_dist.mean for c in x.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    out = cfg.out / "model" / "vae"
    vae.to(torch.float16).save_pretrained(out, safe_serialization=True)
    vae.to(torch.float32)
    print(f"vae: saved to {out}; scaling_factor {vae.config.scaling_factor:.4f}")
    return vae, losses


# --------------------------------------------------------------------------------------- entry point
def run_pretrain(cfg: PretrainConfig, part: str = "all") -> None:
    """Build `part` ('tokenizer', 'vae', 'clip', 'unet', 'vae_decoder', 'shortcut' or 'all', in that order).
    The UNet only sees the VAE encoder's latents, so the decoder can be refined afterwards (or at
    the same time, in another process) without changing what the UNet learned."""
    valid = ("tokenizer", "vae", "unet", "vae_decoder", "clip", "shortcut", "all")
    if part not in valid:
        raise ValueError(f"part={part!r}; valid: {list(valid)}")
    if cfg.unet_text not in UNET_TEXT:
        raise ValueError(f"unet_text={cfg.unet_text!r}; valid: {list(UNET_TEXT)}")
    t0 = time.time()
    if part in ("tokenizer", "all"):
        build_tokenizer(cfg.out / "model" / "tokenizer")
        build_tokenizer(cfg.out / "clip")
    if part in ("vae", "all"):
        pretrain_vae(cfg)
    if part in ("clip", "all"):  # before the UNet: with unet_text="clip" its text tower is the UNet's encoder
        pretrain_clip(cfg)
    if part in ("unet", "all"):
        pretrain_unet(cfg)
    if part in ("vae_decoder", "all"):
        pretrain_vae_decoder(cfg)
    if part in ("shortcut", "all"):  # last: it distils the finished model
        pretrain_shortcut(cfg)
    print(f"pretrain {part}: {time.time() - t0:.0f} s")


def pretrain_vae_decoder(cfg: PretrainConfig):
    """Refine the saved VAE's decoder with the encoder frozen: the latent space (and so the UNet and
    the scaling factor) stay exactly as they are, reconstructions get sharper. Half of the steps
    decode the mean plus a little noise (`vae_decoder_noise`), so slightly-off latents from the UNet
    decode well. Not a posterior sample: the posterior std is 1 (see `_latent_pool`), which would
    teach the decoder to guess shapes from unit noise."""
    from diffusers import AutoencoderKL

    path = cfg.out / "model" / "vae"
    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32)
    vae.requires_grad_(False)
    train = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train, lr=cfg.vae_lr_min * 2)
    ckpt = cfg.work_dir / "vae_decoder.pt"
    start = 0
    if ckpt.exists() and not cfg.tiny:
        s = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        start = s["step"]
        print(f"vae decoder: resumed at step {start}")
    g = torch.Generator().manual_seed(cfg.seed + 3)
    bar = tqdm(range(start, cfg.vae_decoder_steps), desc="vae decoder", disable=cfg.tiny, mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, cfg.vae_decoder_steps, cfg.vae_lr_min * 2, cfg.vae_lr_min * 0.2)
        x = _vae_images(cfg, seed=cfg.seed * 1_000_003 + step + 2_000_000)
        with torch.no_grad():
            post = vae.encode(x * 2 - 1).latent_dist
            sigma = (step % 2) * cfg.vae_decoder_noise / vae.config.scaling_factor  # scaling = 1 / latent std
            z = post.mean + sigma * torch.randn(post.mean.shape, generator=g)
        rec = (vae.decode(z).sample + 1) / 2
        loss = (_object_weight(x, cfg.vae_object_weight) * (rec - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            mse = F.mse_loss(rec.detach(), x).item()
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{-10 * math.log10(max(mse, 1e-10)):.1f}")
        if (step + 1) % 250 == 0 and not cfg.tiny:
            _save_ckpt(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
            rb = vae_readback(vae)
            tqdm.write(f"vae decoder: step {step + 1} shape read back: train {rb['train']:.3f}, "
                       f"held-out {rb['heldout']:.3f}")
    vae.to(torch.float16).save_pretrained(path, safe_serialization=True)
    print(f"vae decoder: saved to {path}")
    return vae


# ---------------------------------------------------------------------------- text encoder + UNet
def text_config(tiny: bool) -> dict:
    """A small CLIP text tower over the full 49,408-token CLIP vocabulary (ids stay CLIP ids)."""
    return dict(
        vocab_size=49408,
        hidden_size=16 if tiny else 64,  # width 64 keeps the token table at 3.2 M params
        intermediate_size=32 if tiny else 256,
        num_hidden_layers=1 if tiny else 3,
        num_attention_heads=2 if tiny else 4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=49406,
        eos_token_id=49407,  # pooling reads the first <|endoftext|>; padding repeats it
        pad_token_id=49407,
    )


def unet_config(tiny: bool, cross_dim: int) -> dict:
    """UNet over 8x8x4 latents: 8 -> 4 -> 2, cross-attention at every level.

    Why the text also enters the time embedding (addition_embed_type="text", FiLM scale-shift):
    position is decided at high noise, where each 8x8 site sees nearly pure noise; a global
    text vector that modulates every ResNet lets the coarse 2x2 level place the object."""
    ch = (8, 16, 16) if tiny else (64, 128, 128)
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=ch,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_dim,
        attention_head_dim=8 if tiny else 32,
        addition_embed_type="text",
        addition_embed_type_num_heads=2 if tiny else 4,
        resnet_time_scale_shift="scale_shift",
    )


SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


def ddim_scheduler():
    """SD 1.5's DDIM sampler settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SD15_SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading"
    )


def _latent_pool(vae, n: int, seed: int, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode n train-split scenes once: posterior means (N, 4, 8, 8) and the token ids of every caption
    template (N, T, L).

    Means, not posterior samples: the VAE reconstructs from the mean and its KL weight is tiny, so the
    encoder's log-variance only ever sees the KL gradient and sits at 0 (std exactly 1, against latent
    means of mean |z| 0.57). Sampling would bury every training latent in unit noise."""
    from shortft.world.scenes import TEMPLATES

    scenes = sample_scenes(n, "train", seed=seed)
    means = []
    with torch.no_grad():
        for i in tqdm(range(0, n, 128), desc="encode latents", mininterval=5):
            means.append(vae.encode(render(scenes[i : i + 128]) * 2 - 1).latent_dist.mean)
    ids = torch.stack([tokenize(tok, [caption(s, k) for s in scenes]) for k in range(len(TEMPLATES))], 1)
    return torch.cat(means), ids


def _draw(mean: torch.Tensor, ids: torch.Tensor, n: int, g: torch.Generator):
    """n random pool entries: latents (n, 4, 8, 8), unscaled, and the token ids of one random caption
    template each (n, L)."""
    idx = torch.randint(len(mean), (n,), generator=g)
    return mean[idx], ids[idx, torch.randint(ids.shape[1], (n,), generator=g)]


UNET_TEXT = ("joint", "clip", "clip-tuned")


def text_encoder(cfg: PretrainConfig):
    """The UNet's text encoder and whether it trains: a fresh CLIPTextModel trained jointly with the
    UNet, or the world CLIP's text tower (cfg.out/clip, which pretrain_clip writes first), frozen or
    fine-tuned (the tower separates position phrases from the start; fine-tuning adds what the UNet needs)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if cfg.unet_text in ("clip", "clip-tuned"):
        text = CLIPTextModel.from_pretrained(cfg.out / "clip", torch_dtype=torch.float32)  # the tower of a CLIPModel
        if cfg.unet_text == "clip-tuned":  # starts from the tower, trains with the UNet at unet_text_lr_scale
            return text.train(), True
        return text.requires_grad_(False).eval(), False
    return CLIPTextModel(CLIPTextConfig(**text_config(cfg.tiny))), True


def pretrain_unet(cfg: PretrainConfig):
    """Train UNet2DConditionModel (epsilon prediction, SD 1.5 schedule) with its text encoder: trained
    jointly, or frozen (cfg.unet_text)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    model_dir = cfg.out / "model"
    tok = load_tokenizer(model_dir / "tokenizer")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).eval()
    scale = vae.config.scaling_factor
    torch.manual_seed(cfg.seed)
    text, text_trains = text_encoder(cfg)
    unet = UNet2DConditionModel(**unet_config(cfg.tiny, text.config.hidden_size))
    params = (list(text.parameters()) if text_trains else []) + list(unet.parameters())
    text_scale = cfg.unet_text_lr_scale if cfg.unet_text == "clip-tuned" else 1.0
    groups = [dict(params=list(unet.parameters()), scale=1.0)]
    if text_trains:
        groups.append(dict(params=list(text.parameters()), scale=text_scale))
    opt = torch.optim.AdamW(groups, lr=cfg.unet_lr, weight_decay=0.01, fused=True)  # fused: 10x faster step on CPU
    ema = [p.detach().clone() for p in params]
    ckpt = cfg.work_dir / "unet.pt"
    start = 0
    if ckpt.exists() and not cfg.tiny:
        s = torch.load(ckpt, weights_only=False)
        text.load_state_dict(s["text"])
        unet.load_state_dict(s["unet"])
        opt.load_state_dict(s["opt"])
        ema = s["ema"]
        start = s["step"]
        print(f"unet: resumed at step {start}")
    pool_mean, pool_ids = _latent_pool(vae, cfg.unet_pool, cfg.seed + 1, tok)
    del vae
    empty = tokenize(tok, [""])[0]  # (L,)
    sched = DDPMScheduler(**SD15_SCHEDULE)
    acp = sched.alphas_cumprod  # (1000,)
    snr = acp / (1 - acp)
    print(
        f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, text encoder "
        f"{sum(p.numel() for p in text.parameters()) / 1e6:.2f} M ({cfg.unet_text}); {cfg.unet_steps} steps x batch "
        f"{cfg.unet_batch}; latent pool {len(pool_mean)}; scaling {scale:.4f}"
    )
    g = torch.Generator().manual_seed(cfg.seed + 7)
    losses = []
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", disable=cfg.tiny, mininterval=10)
    for step in bar:
        g.manual_seed(cfg.seed * 1_000_003 + step)  # each step's draws depend only on (seed, step)
        lr = _cosine_lr(step, cfg.unet_steps, cfg.unet_lr, cfg.unet_lr * 0.1, warmup=cfg.unet_warmup)
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"]
        b = cfg.unet_batch
        x0, ids = _draw(pool_mean, pool_ids, b, g)
        x0 = x0 * scale  # (B, 4, 8, 8)
        drop = torch.rand(b, generator=g) < cfg.unet_drop_caption
        ids[drop] = empty
        t = torch.randint(0, 1000, (b,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = acp[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.set_grad_enabled(text_trains):
            context = text(ids).last_hidden_state  # (B, L, D)
        eps = unet(xt, t, encoder_hidden_states=context).sample
        # Epsilon-MSE hardly penalises a wrong layout at high noise (x0's share of eps is sqrt(SNR));
        # weight 1 + min(1/SNR, gamma) gives those steps an x0-like weight, like v-prediction's loss.
        w = 1.0 + (1.0 / snr[t]).clamp(max=cfg.unet_highnoise) if cfg.unet_highnoise else torch.ones(b)
        loss = (w * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.unet_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", lr=f"{lr:.1e}")
        if (step + 1) % 200 == 0 and not cfg.tiny:
            _save_ckpt(ckpt, text=text.state_dict(), unet=unet.state_dict(), opt=opt.state_dict(), ema=ema,
                       step=step + 1)
    with torch.no_grad():  # ship the EMA weights
        for e, p in zip(ema, params):
            p.copy_(e)
    save_world_model(model_dir, unet, text)
    return unet, text, losses


def load_as_fp32(folder: Path) -> None:
    """Weights ship in fp16 (half the size); mark a transformers config so that a plain from_pretrained
    (dtype "auto" in transformers 5) loads them in fp32, as diffusers does for the UNet and VAE, so a
    stock StableDiffusionPipeline.from_pretrained(folder) runs on a CPU without a dtype argument."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_world_model(model_dir: Path, unet, text) -> None:
    """Write unet/ text_encoder/ (fp16 safetensors), scheduler/ and model_index.json next to the
    existing vae/ and tokenizer/, so StableDiffusionPipeline.from_pretrained(model_dir) works."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(model_dir / "vae"),
        text_encoder=text,
        tokenizer=load_tokenizer(model_dir / "tokenizer"),
        unet=unet,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    pipe.to(torch.float32)
    load_as_fp32(Path(model_dir) / "text_encoder")
    print(f"saved world model to {model_dir}")


# ---------------------------------------------------------------------------------------- shortcut
def pretrain_shortcut(cfg: PretrainConfig) -> Path:
    """The world's 4-segment shortcut: `shortft distill` on the finished model with the settings of the
    shipped file (teacher straight to the segment edge, CFG-5 teacher and student, half the steps anchored
    at the jumps' starts, cosine decay, fp16 file). Equivalent command: see docs/distill.md."""
    from shortft.distill import DistillConfig, distill

    small = dict(num_steps=10, segments=2, batch_size=2, rank=4, pool=4) if cfg.tiny else dict(pool=1024)
    return distill(DistillConfig(
        model=str(cfg.out / "model"), out=str(cfg.out / "shortcut.safetensors"), steps=cfg.shortcut_steps,
        time_budget=cfg.shortcut_seconds, decay="cosine", teacher_steps=0, noised_fraction=0.0, guidance=5.0,
        student_guidance=5.0, anchor_fraction=cfg.shortcut_anchor_fraction, prompts="world-train", save_dtype="fp16",
        seed=cfg.seed,
        work_dir=str(cfg.work_dir / "shortcut"), **small))


# -------------------------------------------------------------------------- CLIP preference model
CLIP_MEAN = (0.5, 0.5, 0.5)  # images in [0, 1] are normalised to [-1, 1]
CLIP_STD = (0.5, 0.5, 0.5)


def clip_config(tiny: bool):
    from transformers import CLIPConfig

    w = 16 if tiny else 48  # text width 48: the 49,408-token table is most of the weights (30 MB budget)
    return CLIPConfig(
        text_config=dict(text_config(tiny), hidden_size=w, intermediate_size=4 * w),
        vision_config=dict(
            image_size=64,
            patch_size=8,  # 8x8 = 64 patches
            hidden_size=w if tiny else 96,
            intermediate_size=4 * (w if tiny else 96),
            num_hidden_layers=1 if tiny else 4,
            num_attention_heads=2 if tiny else 4,
        ),
        projection_dim=w,
    )


def pretrain_clip(cfg: PretrainConfig):
    """Small CLIPModel trained contrastively on (rendered image, caption) from the train split, plus
    for every image a softmax over its caption and `clip_hard_negatives` one-attribute-wrong captions,
    so the score has to read every attribute rather than the easiest one."""
    import random

    from transformers import CLIPImageProcessor, CLIPModel

    tok = build_tokenizer(cfg.out / "clip")
    torch.manual_seed(cfg.seed)
    model = CLIPModel(clip_config(cfg.tiny))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    print(f"clip: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params; {cfg.clip_steps} steps x "
          f"batch {cfg.clip_batch} (+{cfg.clip_hard_negatives} hard negatives each)")
    losses = []
    k = cfg.clip_hard_negatives
    bar = tqdm(range(cfg.clip_steps), desc="clip", disable=cfg.tiny, mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, cfg.clip_steps, cfg.clip_lr, cfg.clip_lr * 0.05, warmup=100)
        rng = random.Random(f"clip-{cfg.seed}-{step}")
        scenes = sample_scenes(cfg.clip_batch, "train", seed=cfg.seed * 1_000_003 + step + 500_000)
        b = len(scenes)
        tmpl = [rng.randrange(5) for _ in scenes]
        negs = [one_attribute_wrong(s, rng) for s in scenes for _ in range(k)]  # (B*K,)
        texts = [caption(s, i) for s, i in zip(scenes, tmpl)] + [
            caption(n, tmpl[j // k]) for j, n in enumerate(negs)]  # same template as the positive
        pix = (render(scenes) - mean) / std
        img = model.get_image_features(pixel_values=pix)
        txt = model.get_text_features(input_ids=tokenize(tok, texts))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img = F.normalize(img, dim=-1)  # (B, P)
        txt = F.normalize(txt, dim=-1)  # (B + B*K, P)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt[:b].T  # (B, B)
        target = torch.arange(b)
        hard = scale * torch.einsum("bp,bkp->bk", img, torch.cat([txt[:b, None], txt[b:].view(b, k, -1)], 1))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2 + F.cross_entropy(
            hard, torch.zeros(b, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            acc = (hard.argmax(1) == 0).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", hard_acc=f"{acc:.2f}")
    out = cfg.out / "clip"
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    load_as_fp32(out)
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 64}, do_center_crop=True, crop_size={"height": 64, "width": 64},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD), do_convert_rgb=True,
    ).save_pretrained(out)
    print(f"clip: saved to {out}")
    return model, losses

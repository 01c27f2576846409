"""The world's CLIP preference model (reward `world_clip`): a small CLIPModel trained contrastively on
(rendered image, caption) pairs of the train split, with one-attribute-wrong captions as hard negatives.
Its text tower also starts the UNet's text encoder (unet.text = clip or clip-tuned)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shortft.factory.common import load_as_fp32, lr_at, save_fp16, update
from shortft.factory.config import PretrainConfig
from shortft.factory.tokenizer import build_tokenizer, tokenize
from shortft.world.scenes import MAX_TOKENS, TEMPLATES, caption, one_attribute_wrong, render, sample_scenes

CLIP_MEAN = (0.5, 0.5, 0.5)  # images in [0, 1] are normalised to [-1, 1]
CLIP_STD = (0.5, 0.5, 0.5)


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


def clip_config(tiny: bool):
    """Text tower of width 48 (the 49,408-token table is most of the weights) and a ViT of width 96 on
    8x8 patches of the 64x64 image."""
    from transformers import CLIPConfig

    w = 16 if tiny else 48
    vision = 16 if tiny else 96
    return CLIPConfig(
        text_config=dict(text_config(tiny), hidden_size=w, intermediate_size=4 * w),
        vision_config=dict(
            image_size=64,
            patch_size=8,  # 8x8 = 64 patches
            hidden_size=vision,
            intermediate_size=4 * vision,
            num_hidden_layers=1 if tiny else 4,
            num_attention_heads=2 if tiny else 4,
        ),
        projection_dim=w,
    )


def clip_batch(cfg: PretrainConfig, step: int) -> tuple[torch.Tensor, list[str]]:
    """Step `step`'s images (B, 3, 64, 64), normalised, and captions: B true ones, then per image
    `hard_negatives` one-attribute-wrong ones in the same template (B * K)."""
    k = cfg.clip.hard_negatives
    rng = random.Random(f"clip-{cfg.seed}-{step}")
    scenes = sample_scenes(cfg.clip.batch, "train", seed=cfg.seed * 1_000_003 + step + 500_000)
    tmpl = [rng.randrange(len(TEMPLATES)) for _ in scenes]
    negs = [one_attribute_wrong(s, rng) for s in scenes for _ in range(k)]  # (B*K,)
    texts = [caption(s, i) for s, i in zip(scenes, tmpl)] + [caption(n, tmpl[j // k]) for j, n in enumerate(negs)]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (render(scenes) - mean) / std, texts


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, P) unit-norm image embeddings (transformers 4 returns a tensor, 5 an output with pooler_output)."""
    img = model.get_image_features(pixel_values=pixels)
    return F.normalize(getattr(img, "pooler_output", img), dim=-1)


def text_features(model, ids: torch.Tensor) -> torch.Tensor:
    """(N, P) unit-norm text embeddings."""
    txt = model.get_text_features(input_ids=ids)
    return F.normalize(getattr(txt, "pooler_output", txt), dim=-1)


def clip_loss(model, img: torch.Tensor, txt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric contrastive loss over the B true pairs, plus a softmax of each image over its true
    caption and its K hard negatives, so the score has to read every attribute rather than the easiest one.
    Returns (loss, hard logits (B, 1 + K))."""
    b = len(img)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt[:b].T  # (B, B)
    target = torch.arange(b)
    hard = scale * torch.einsum("bp,bkp->bk", img, torch.cat([txt[:b, None], txt[b:].view(b, k, -1)], 1))
    contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return contrastive + F.cross_entropy(hard, torch.zeros(b, dtype=torch.long)), hard


def pretrain_clip(cfg: PretrainConfig):
    """Train the CLIP preference model; write clip/ (fp16 weights, image processor, tokenizer).
    Returns (model, losses)."""
    from transformers import CLIPImageProcessor, CLIPModel

    c = cfg.clip
    out = cfg.root / "clip"
    tok = build_tokenizer(out)
    torch.manual_seed(cfg.seed)
    model = CLIPModel(clip_config(c.tiny))
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.05)
    print(f"clip: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params; {c.steps} steps x "
          f"batch {c.batch} (+{c.hard_negatives} hard negatives each)")
    losses = []
    bar = tqdm(range(c.steps), desc="clip", mininterval=10)
    for step in bar:
        pixels, texts = clip_batch(cfg, step)
        img, txt = image_features(model, pixels), text_features(model, tokenize(tok, texts))  # (B, P), (B + B*K, P)
        loss, hard = clip_loss(model, img, txt, c.hard_negatives)
        losses.append(update(opt, loss, lr_at(step, c.steps, c.lr, c.lr_min, c.warmup)))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", hard_acc=f"{(hard.argmax(1) == 0).float().mean().item():.2f}")
    save_fp16(model, out)
    load_as_fp32(out)
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 64}, do_center_crop=True, crop_size={"height": 64, "width": 64},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD), do_convert_rgb=True,
    ).save_pretrained(out)
    print(f"clip: saved to {out}")
    return model, losses

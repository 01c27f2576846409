"""Tiny random-weight reward models of the real architecture families, written to disk in the authors'
formats so tests (and anyone without the real weights) load them through the real loading code:
an open_clip ViT + an HPS-style state dict file, a transformers CLIPModel folder with its
CLIPImageProcessor and CLIPTokenizer, and an aesthetic MLP file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shortft.rewards.common import OPENAI_MEAN, OPENAI_STD

TINY_OPEN_CLIP = "shortft-tiny-ViT"  # open_clip config name registered by `register_tiny_open_clip`


def register_tiny_open_clip(folder: str | Path, image_size: int = 224) -> str:
    """Register a 1-layer open_clip ViT (real tokenizer and 77-token context, real 224 input) under
    `TINY_OPEN_CLIP`; returns the name."""
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = Path(folder) / f"{TINY_OPEN_CLIP}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def make_tiny_hps(folder: str | Path, seed: int = 0) -> Path:
    """An HPS-format checkpoint ({'state_dict': ...} of the whole open_clip model) for the tiny ViT."""
    import open_clip

    register_tiny_open_clip(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    file = Path(folder) / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, file)
    return file


def byte_tokenizer(folder: Path, max_length: int):
    """A CLIPTokenizer over the 512 byte symbols and the two specials: any text tokenizes, no merges
    needed. ids: bos 512, eos 513."""
    from shortft.clip_vocab import write_clip_tokenizer

    return write_clip_tokenizer(folder, max_length=max_length)


def make_tiny_clip(folder: str | Path, image_size: int = 224, patch: int = 32, projection_dim: int = 16,
                   mean=OPENAI_MEAN, std=OPENAI_STD, seed: int = 0) -> Path:
    """A transformers CLIPModel folder (weights + CLIPImageProcessor + tokenizer) with one layer per tower."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    tok = byte_tokenizer(folder, max_length=32)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=projection_dim)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=list(mean), image_std=list(std), resample=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_aesthetic_mlp(file: str | Path, seed: int = 0) -> Path:
    """A random MLP state dict in the sac+logos+ava1-l14-linearMSE.pth key layout."""
    from shortft.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(AestheticMLP().state_dict(), file)
    return file

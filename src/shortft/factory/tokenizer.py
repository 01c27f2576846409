"""The world's tokenizer: the real CLIP BPE (49,408 tokens) built offline from open_clip's bundled merges
and saved as a transformers CLIPTokenizer, so its ids equal `open_clip.tokenize`."""

from __future__ import annotations

from pathlib import Path

import torch

from shortft.clip_vocab import clip_merges, write_clip_tokenizer
from shortft.world.scenes import MAX_TOKENS


def build_tokenizer(folder: Path):
    """Write the CLIP tokenizer (vocab.json + merges.txt, no tokenizer.json) to `folder`; return it loaded back."""
    return write_clip_tokenizer(folder, clip_merges(), max_length=MAX_TOKENS)


def build_tokenizers(cfg) -> None:
    """The tokenizer part: the same tokenizer for the model (model/tokenizer) and for the CLIP (clip/)."""
    build_tokenizer(cfg.root / "model" / "tokenizer")
    build_tokenizer(cfg.root / "clip")


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tok, prompts: list[str]) -> torch.Tensor:
    """(N, MAX_TOKENS) token ids, padded with <|endoftext|> as CLIP pads."""
    return tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids

"""HPS v2 / v2.1 (Wu et al., "Human Preference Score v2", 2023) as a differentiable reward.

The authors' model: open_clip ViT-H-14 whose whole state dict (both towers) is replaced by
`HPS_v2_compressed.pt` (v2.0) or `HPS_v2.1_compressed.pt` (v2.1), so no laion2B download is needed.
Their score is the diagonal of image_features @ text_featuresᵀ with both L2-normalised (a cosine,
~0.27 for SD 1.4 images), and their benchmark reports it x100. We return the x100 value, for training
too, so the number in the logs is the number in the paper's table (SD 1.5 ≈ 26.9 on v2.0).

Preprocessing: open_clip's eval transform for ViT-H-14 (resize shortest side to 224 bicubic, center
crop 224, OPENAI mean/std), written in torch (`common.clip_preprocess`) so gradients reach the image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shortft.rewards import RewardSettings, check_inputs, register
from shortft.rewards.common import (
    OPENAI_MEAN,
    OPENAI_STD,
    clip_preprocess,
    freeze,
    load_state_dict_file,
    load_strict,
    resolve_file,
)

HPS_FILES = {  # reward name -> default "repo_id/filename" on the hub (the authors' release)
    "hpsv2": "xswu/HPSv2/HPS_v2_compressed.pt",
    "hpsv2.1": "xswu/HPSv2/HPS_v2.1_compressed.pt",
}
HPS_ARCH = "ViT-H-14"  # open_clip architecture of both releases
HPS_SCALE = 100.0  # reported and trained in the benchmark's units (cosine x 100)


class HPSReward:
    """score = 100 · <img_feat/|img_feat|, txt_feat/|txt_feat|>, one per (image, prompt) pair."""

    def __init__(self, model, tokenizer, device="cpu", name: str = "hpsv2"):
        self.model, self.tokenizer, self.device, self.name = model, tokenizer, torch.device(device), name
        cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
        size = model.visual.image_size
        self.size = size[0] if isinstance(size, tuple | list) else int(size)
        self.mean = tuple(cfg.get("mean", OPENAI_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_STD))
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def load(cls, path: str | Path, arch: str = HPS_ARCH, device="cpu", dtype=torch.float32, name: str = "hpsv2"):
        """open_clip `arch` with random init, then the HPS state dict loaded strictly (weights_only)."""
        default = Path(HPS_FILES.get(name, HPS_FILES["hpsv2"])).name
        file = resolve_file(str(path), name, f"the HPS checkpoint {default}", filenames=(default,))
        state = load_state_dict_file(file, name)
        import open_clip  # after the file checks: a missing file fails fast

        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        load_strict(model, state, name, file)
        model = freeze(model.to(device=device, dtype=dtype))
        return cls(model, open_clip.get_tokenizer(arch), device, name)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 224, 224) normalised, differentiable."""
        return clip_preprocess(images, self.size, (self.size, self.size), self.mean, self.std)

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score already-preprocessed pixels (used by the parity test with open_clip's own transform)."""
        tokens = self.tokenizer(prompts).to(self.device)  # (B, 77)
        img = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True)  # (B, D)
        txt = self.model.encode_text(tokens, normalize=True)  # (B, D)
        return HPS_SCALE * (img * txt).sum(-1).float()  # diagonal of img @ txtᵀ

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        return self.score_pixels(self.preprocess(images.to(self.device, torch.float32)), prompts)


def _factory(name: str):
    def build(settings: RewardSettings) -> HPSReward:
        return HPSReward.load(settings.paths.get(name, HPS_FILES[name]), device=settings.device,
                              dtype=settings.dtype, name=name)

    build.__doc__ = f"{name}: weights from settings.paths[{name!r}] (default {HPS_FILES[name]})."
    return build


register("hpsv2")(_factory("hpsv2"))
register("hpsv2.1")(_factory("hpsv2.1"))

"""LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor", 2022) as a reward.

score = MLP(e / |e|), e = CLIP ViT-L/14 image embedding (768-d, the projected CLS token, i.e. OpenAI
CLIP's `encode_image`). We take the embedding from transformers' `CLIPModel`
(`openai/clip-vit-large-patch14`, the same weights as the `clip` package's "ViT-L/14") and its
processor settings (resize 224 bicubic, crop 224, OPENAI mean/std), in torch. The MLP is the
`sac+logos+ava1-l14-linearMSE.pth` layout, Linear/Dropout in an `nn.Sequential` called `layers`:
768→1024, Dropout .2, →128, Dropout .2, →64, Dropout .1, →16, →1 (no activations), so that file loads
strictly. Scores are on the AVA 1-10 scale (SD 1.5 ≈ 5.3); prompts are ignored.

Settings: paths['aesthetic'] = the MLP file (default: the copy TRL uses,
"trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"), paths['aesthetic_clip'] = the CLIP folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shortft.rewards import RewardSettings, check_inputs, register
from shortft.rewards.clip_pref import image_settings, load_clip_model
from shortft.rewards.common import (
    RewardWeightsError,
    clip_preprocess,
    features,
    freeze,
    load_state_dict_file,
    load_strict,
    resolve_file,
    resolve_folder,
)

AESTHETIC_MLP = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
MLP_SOURCE = ("the LAION aesthetic MLP sac+logos+ava1-l14-linearMSE.pth (github.com/christophschuhmann/"
              "improved-aesthetic-predictor; TRL's copy of it is aesthetic-model.pth)")


class AestheticMLP(nn.Module):
    """768-1024-128-64-16-1 with the original's Dropouts, so its state-dict keys are layers.{0,2,4,6,7}."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)  # (B, 1)


class AestheticReward:
    """score = MLP(normalise(CLIP-L/14 image embedding)), one per image."""

    def __init__(self, clip, mlp: AestheticMLP, image_cfg: dict, device="cpu"):
        self.clip, self.mlp, self.cfg, self.device = clip, mlp, image_cfg, torch.device(device)
        self.dtype = next(clip.parameters()).dtype

    @classmethod
    def load(cls, mlp_path: str | Path, clip_path: str | Path = AESTHETIC_CLIP, device="cpu", dtype=torch.float32):
        file = resolve_file(str(mlp_path), "aesthetic", MLP_SOURCE,
                            filenames=("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth"))
        state = load_state_dict_file(file, "aesthetic")
        mlp = AestheticMLP()
        load_strict(mlp, state, "aesthetic", file)
        folder = resolve_folder(str(clip_path), "aesthetic_clip", f"the CLIP ViT-L/14 model {AESTHETIC_CLIP}")
        clip = load_clip_model(folder, "aesthetic_clip", dtype)
        if clip.config.projection_dim != mlp.layers[0].in_features:
            raise RewardWeightsError(
                f"reward 'aesthetic': the CLIP in {folder} embeds to {clip.config.projection_dim} dims, the MLP "
                f"takes {mlp.layers[0].in_features}; the predictor needs CLIP ViT-L/14 ({AESTHETIC_CLIP})")
        return cls(freeze(clip.to(device)), freeze(mlp.to(device=device, dtype=dtype)),
                   image_settings(folder, "aesthetic_clip"), device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return clip_preprocess(images, c["size"], c["crop"], c["mean"], c["std"])

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        emb = features(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))  # (B, 768)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb).squeeze(-1).float()  # (B,)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        return self.score_pixels(self.preprocess(images.to(self.device, torch.float32)))


@register("aesthetic")
def build_aesthetic(settings: RewardSettings) -> AestheticReward:
    return AestheticReward.load(settings.paths.get("aesthetic", AESTHETIC_MLP),
                                settings.paths.get("aesthetic_clip", AESTHETIC_CLIP), settings.device, settings.dtype)

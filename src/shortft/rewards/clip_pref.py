"""CLIP preference rewards on a transformers `CLIPModel`: PickScore and the embedded world's CLIP.

PickScore (Kirstain et al., "Pick-a-Pic", 2023): `yuvalkirstain/PickScore_v1` (a fine-tuned
laion ViT-H-14) with the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`. The authors' score is
exp(logit_scale) · cos(image, prompt), the diagonal of their logits; SD 1.5 scores ≈ 20.5 on it.

world_clip: the small CLIPModel of `shortft.world.WORLD_CLIP`, scored the same way
(exp(logit_scale) · cosine, unclamped logit_scale as saved), the project's default training reward.

Preprocessing follows the saved CLIPImageProcessor (shortest-edge size, crop size, mean, std), read
from its config and done in torch (`common.clip_preprocess`) so gradients reach the image.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from shortft.rewards import RewardSettings, check_inputs, register
from shortft.rewards.common import (
    RewardWeightsError,
    clip_preprocess,
    features,
    freeze,
    resolve_folder,
)

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def load_clip_model(folder: str, reward: str, dtype=torch.float32):
    """CLIPModel.from_pretrained that refuses a checkpoint with missing or mis-shaped weights (transformers
    would otherwise initialise them at random and score silently wrong)."""
    from transformers import CLIPModel

    try:
        model, info = CLIPModel.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except Exception as err:
        raise RewardWeightsError(f"reward {reward!r}: cannot load a CLIPModel from {folder} ({err})") from err
    bad = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()), key=str)
    if bad:
        raise RewardWeightsError(f"reward {reward!r}: {folder} lacks {len(bad)} CLIPModel weights, e.g. "
                                 f"{[str(b) for b in bad[:3]]}; is it the right checkpoint?")
    return model


def image_settings(folder: str, reward: str) -> dict:
    """size, crop (h, w), mean, std from a saved CLIPImageProcessor config."""
    from transformers import CLIPImageProcessor

    try:
        proc = CLIPImageProcessor.from_pretrained(folder)
    except Exception as err:
        raise RewardWeightsError(f"reward {reward!r}: no CLIPImageProcessor config in {folder} ({err})") from err
    size = proc.size
    size = size.get("shortest_edge") or min(size["height"], size["width"])
    crop = proc.crop_size if proc.do_center_crop else {"height": size, "width": size}
    if int(getattr(proc, "resample", 3)) != 3:  # PIL.Image.BICUBIC; our torch resize is bicubic only
        raise RewardWeightsError(f"reward {reward!r}: processor resample {proc.resample} is not bicubic")
    return {"size": int(size), "crop": (int(crop["height"]), int(crop["width"])),
            "mean": tuple(proc.image_mean), "std": tuple(proc.image_std)}


class CLIPPreference:
    """score = exp(logit_scale) · cos(img_emb, txt_emb) per (image, prompt) pair: PickScore's formula."""

    def __init__(self, model, tokenizer, image_cfg: dict, device="cpu", name: str = "clip"):
        self.model, self.tokenizer, self.cfg, self.name = model, tokenizer, image_cfg, name
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, model_path: str | Path, processor_path: str | Path | None = None, device="cpu",
             dtype=torch.float32, name: str = "clip"):
        """Weights from `model_path` (folder or hub id); tokenizer and image settings from
        `processor_path` (default: the model folder)."""
        folder = resolve_folder(str(model_path), name, f"the CLIPModel {model_path}")
        proc = folder if processor_path is None else resolve_folder(str(processor_path), name,
                                                                     f"the CLIP processor {processor_path}")
        from transformers import AutoTokenizer  # after the folder checks: a missing folder fails fast

        model = freeze(load_clip_model(folder, name, dtype).to(device))
        try:
            tok = AutoTokenizer.from_pretrained(proc)
        except Exception as err:
            raise RewardWeightsError(f"reward {name!r}: no tokenizer in {proc} ({err})") from err
        return cls(model, tok, image_settings(proc, name), device, name)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, crop_h, crop_w) normalised, differentiable."""
        c = self.cfg
        return clip_preprocess(images, c["size"], c["crop"], c["mean"], c["std"])

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) preprocessed -> (B, D) unit-norm image embeddings."""
        return F.normalize(features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))),
                           dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=ids.input_ids.to(self.device),
                                           attention_mask=ids.attention_mask.to(self.device))
        return F.normalize(features(out), dim=-1)  # (B, D)

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score already-preprocessed pixels (the parity test feeds the processor's output here)."""
        img, txt = self.image_embeds(pixels), self.text_embeds(prompts)
        return (self.model.logit_scale.exp() * (img * txt).sum(-1)).float()  # diagonal of the logits

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        return self.score_pixels(self.preprocess(images.to(self.device, torch.float32)), prompts)


@register("pickscore")
def build_pickscore(settings: RewardSettings) -> CLIPPreference:
    """settings.paths['pickscore'] (default yuvalkirstain/PickScore_v1) and
    settings.paths['pickscore_processor'] (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    return CLIPPreference.load(settings.paths.get("pickscore", PICKSCORE_MODEL),
                               settings.paths.get("pickscore_processor", PICKSCORE_PROCESSOR),
                               settings.device, settings.dtype, "pickscore")


@register("world_clip")
def build_world_clip(settings: RewardSettings) -> CLIPPreference:
    """settings.paths['world_clip'] (default shortft.world.WORLD_CLIP, built by `shortft world pretrain`)."""
    from shortft.world import WORLD_CLIP

    path = Path(settings.paths.get("world_clip", WORLD_CLIP))
    if not path.is_dir():
        raise RewardWeightsError(f"reward 'world_clip': {path} does not exist; build it with "
                                 "`shortft world pretrain --part clip` or pass --reward-paths world_clip=/folder")
    return CLIPPreference.load(path, device=settings.device, dtype=settings.dtype, name="world_clip")

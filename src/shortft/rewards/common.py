"""What the model-based rewards share: finding weight files (local path or hub), freezing models, and
the differentiable CLIP preprocessing that stands in for the authors' PIL transforms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from shortft.errors import UserError
from shortft.hub import hub_file, hub_folder

# OpenAI CLIP normalisation, used by open_clip's ViT-H-14 (laion2B) and by the PickScore processor.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class RewardWeightsError(UserError):
    """A reward's weights are missing, unreachable or not what they claim to be."""


def resolve_file(spec: str, reward: str, what: str, filenames: Sequence[str] = ()) -> Path:
    """A weight file from a local path, a local folder holding one of `filenames`, or the hub as
    "repo_id/filename" (e.g. "xswu/HPSv2/HPS_v2_compressed.pt")."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in filenames:
            if (path / name).is_file():
                return path / name
        raise RewardWeightsError(f"reward {reward!r}: folder {path} holds none of {list(filenames)}; put {what} "
                                 f"there or name the file itself")
    return hub_file(spec, f"reward {reward!r}: {what}",
                    f"pass its path with --reward-paths {reward}=/path/to/{Path(str(spec)).name}", error=RewardWeightsError)


def resolve_folder(spec: str, reward: str, what: str) -> str:
    """A transformers model folder: a local folder, or a hub repo id fetched (or found in the cache)."""
    return str(hub_folder(spec, f"reward {reward!r}: {what}",
                          f"pass the folder with --reward-paths {reward}=/path/to/folder",
                          allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"], error=RewardWeightsError))


def load_state_dict_file(path: Path, reward: str) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) with a clear error; unwraps {'state_dict': ...} and 'module.' prefixes."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RewardWeightsError(f"reward {reward!r}: {path} is not a loadable torch state dict ({err})") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RewardWeightsError(f"reward {reward!r}: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], reward: str, source: Path | str) -> None:
    """load_state_dict that names what is missing or unexpected instead of scoring with random weights."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        raise RewardWeightsError(
            f"reward {reward!r}: {source} does not match the model ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(shape)} with wrong shapes, e.g. {shape[:3]}). "
            "Is it the right file?")
    module.load_state_dict(state, strict=True)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no parameter ever asks for a gradient: the image still gets one through the module."""
    module.eval()
    module.requires_grad_(False)
    return module


def resize_shortest(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> shortest side = size, the other int(size * long / short), bicubic with antialias.

    torch's antialiased bicubic uses PIL's kernel (a = -0.5, support widened by the scale when
    shrinking), so this tracks torchvision/transformers on PIL images up to their uint8 rounding."""
    h, w = images.shape[-2:]
    if h <= w:
        new = (size, int(size * w / h))
    else:
        new = (int(size * h / w), size)
    if new == (h, w):
        return images
    return F.interpolate(images, size=new, mode="bicubic", align_corners=False, antialias=True)


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's CenterCrop offsets: round((H - h) / 2)."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    if h < height or w < width:
        raise ValueError(f"cannot center-crop {h}x{w} to {height}x{width}")
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return images[..., top:top + height, left:left + width]


def clip_preprocess(images: torch.Tensor, size: int, crop: tuple[int, int], mean: Sequence[float],
                    std: Sequence[float]) -> torch.Tensor:
    """Differentiable CLIP eval transform: (B, 3, H, W) in [0, 1] -> (B, 3, crop_h, crop_w) normalised.
    Same steps as open_clip's Resize/CenterCrop/Normalize and CLIPImageProcessor: resize the shortest
    side, center crop, (x - mean) / std. No clamp, no uint8: the graph stays whole."""
    x = center_crop(resize_shortest(images, size), *crop)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def features(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features, 4.x a tensor: take the embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output

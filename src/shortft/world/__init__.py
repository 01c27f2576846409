"""The embedded world: a procedurally generated captioned image world and the small
Stable-Diffusion-format model, CLIP preference model and shortcut trained on it by this project.

Everything under `assets/` is produced by `shortft world pretrain` (docs/world.md) and loaded through
the same code that loads Stable Diffusion 1.5.
"""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
WORLD_MODEL = ASSETS / "model"  # diffusers layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/
WORLD_CLIP = ASSETS / "clip"  # transformers CLIPModel + CLIPImageProcessor + CLIPTokenizer
WORLD_SHORTCUT = ASSETS / "shortcut.safetensors"  # 4-segment shortcut LoRA, diffusers LoRA format

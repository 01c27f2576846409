"""The embedded worlds: a procedurally generated captioned image world, and the small models trained on it
by this project: an SD 1.5-format model (`world`), an SD 3-format flow model (`world-flow`), each with its
shortcut, and the CLIP preference model both are rewarded with.

Everything under `assets/` is produced by `shortft world pretrain` (docs/world.md) and loaded through
the same code that loads Stable Diffusion 1.5 and SD 3.
"""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
WORLD_MODEL = ASSETS / "model"  # diffusers layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/
WORLD_CLIP = ASSETS / "clip"  # transformers CLIPModel + CLIPImageProcessor + CLIPTokenizer
WORLD_SHORTCUT = ASSETS / "shortcut.safetensors"  # 4-segment shortcut LoRA, diffusers LoRA format
WORLD_FLOW_MODEL = ASSETS / "flow-model"  # StableDiffusion3Pipeline layout: transformer/ vae/ text_encoder{,_2}/ ...
WORLD_FLOW_SHORTCUT = ASSETS / "flow-shortcut.safetensors"  # its 4-segment shortcut, SD 3 diffusers LoRA format
SHIPPED_SHORTCUTS = {"world": WORLD_SHORTCUT, "world-flow": WORLD_FLOW_SHORTCUT}  # model name -> its shortcut

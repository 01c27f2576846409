"""The named training recipes (`shortft train --preset NAME`) and the preset each model gets by default.

A preset is a dict of TrainConfig overrides; the dataclass's own defaults are the embedded world's. The
comments give each default's source.
"""

from __future__ import annotations

TRAIN_PRESETS: dict[str, dict] = {
    # The embedded world on a laptop CPU: the zero-argument `shortft train`. Its shortcut is distilled
    # with a CFG-5 student (docs/distill.md), so its shortcut steps run CFG 5 too.
    "world": {"shortcut_guidance": 5.0},
    # The embedded flow world (SD 3 format) on a laptop CPU: 28 steps, SD 3's default; otherwise as the world.
    "world-flow": {"model": "world-flow", "num_steps": 28, "shortcut_guidance": 5.0},
    # Stable Diffusion 1.5 as in the paper (GPU): Hyper-SD 4-step LoRA as the shortcut, HPS v2 reward.
    "sd15": dict(model="runwayml/stable-diffusion-v1-5",
                 shortcut="ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors",
                 guidance=7.5, lora_rank=128, lora_alpha=128.0, reward="hpsv2", prompts="simple-animals",
                 eval_prompts="simple-animals", eval_count=8, max_steps=2000, batch_size=2, lr=1e-4,
                 grid_every=100, checkpoint_every=100),
}
TRAIN_PRESETS["sd15-tiny"] = {**TRAIN_PRESETS["sd15"], "max_steps": 10}  # a quick end-to-end check on one GPU
# Stable Diffusion 3 Medium (GPU). 28 steps and CFG 7.0: its model card's example. Shortcut: Hyper-SD's 4-step
# CFG LoRA for SD 3 at the scale (0.125) and guidance (3.0 at 4 steps) its model card recommends. HPS v2.1:
# what the flow-matching reward work (FlowBP, LeapAlign) reports. Rank 32: the paper gives no rank for its
# SD 3 run; 128 (its SD 1.5 rank) on the twelve attention and feed-forward layers of both streams of every
# joint block would make each stacked LoRA several hundred MB. lr 1e-4 as the SD 1.5 preset.
TRAIN_PRESETS["sd3"] = dict(TRAIN_PRESETS["sd15"], model="stabilityai/stable-diffusion-3-medium-diffusers",
                            shortcut="ByteDance/Hyper-SD/Hyper-SD3-4steps-CFG-lora.safetensors", shortcut_scale=0.125,
                            shortcut_guidance=3.0, num_steps=28, guidance=7.0, lora_rank=32, lora_alpha=32.0,
                            reward="hpsv2.1", batch_size=1)
# Stable Diffusion 3.5 Medium: 40 steps and CFG 4.5, its model card's example; otherwise as sd3.
TRAIN_PRESETS["sd35"] = dict(TRAIN_PRESETS["sd3"], model="stabilityai/stable-diffusion-3.5-medium", num_steps=40,
                             guidance=4.5)
# SDXL base (GPU): 1024 px (its UNet's sample size), 50 steps and CFG 5.0 (StableDiffusionXLPipeline's
# defaults); shortcut: Hyper-SD's 4-step SDXL LoRA (distilled for CFG 0, like the SD 1.5 one, so its jumps run
# conditional-only). Rank 64: the paper publishes no SDXL rank; half its SD 1.5 rank keeps four stacked LoRAs
# of SDXL's larger UNet near the SD 1.5 preset's memory. lr 1e-4 as the SD 1.5 preset; HPS v2.1 as DRTune's
# SDXL runs (its "FDXL") report.
TRAIN_PRESETS["sdxl"] = dict(TRAIN_PRESETS["sd15"], model="stabilityai/stable-diffusion-xl-base-1.0",
                             shortcut="ByteDance/Hyper-SD/Hyper-SDXL-4steps-lora.safetensors", guidance=5.0,
                             lora_rank=64, lora_alpha=64.0, reward="hpsv2.1", batch_size=1)
FAMILY_PRESETS = {"sd": "sd15", "sdxl": "sdxl", "sd3": "sd3"}  # the preset of a model of that family


def default_preset(model: str) -> str:
    """The preset a model gets when none is named: the world's for the world, else its family's (SD 3.5 for
    an SD 3 model whose name says 3.5). A model that cannot be found gets SD 1.5's (loading it will say why)."""
    if model in ("world", "world-flow"):
        return model
    from shortft.backends.common import model_family, resolve_model
    from shortft.errors import UserError

    try:
        family = model_family(resolve_model(model))
    except UserError:
        return "sd15"
    if family == "sd3" and "3.5" in model:
        return "sd35"
    return FAMILY_PRESETS[family]

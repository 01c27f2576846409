"""shortft: align text-to-image diffusion models with rewards by backpropagating through the denoising chain.

ShortFT (Guo et al., "Diffusion Model Alignment via Shortcut-based Fine-Tuning", ICCV 2025) and the
baselines it is compared with (DRaFT-K, DRaFT-LV, AlignProp, DRTune, ReFL, full backprop) run in one
engine: a method builds a *plan* of denoising steps, `shortft.chain.run_plan` executes it.
"""

__version__ = "0.1.0"

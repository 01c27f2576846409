"""Quality of the world's assets: evaluator accuracy on real images, prompt fidelity of the model's
samples on held-out and train prompts, and the CLIP scorer's ranking of correct over
one-attribute-wrong captions. `shortft world eval` prints `format_table(evaluate(...))`."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from shortft.errors import MissingFileError
from shortft.factory.clip import image_features, text_features
from shortft.factory.tokenizer import tokenize
from shortft.world import WORLD_CLIP, WORLD_MODEL
from shortft.world.evaluator import prompt_fidelity
from shortft.world.scenes import (
    ALTERNATIVES,
    ATTRIBUTES,
    TEMPLATES,
    Scene,
    caption,
    prompt_split,
    render,
    sample_scenes,
)


def real_fidelity(n: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Evaluator accuracy on n rendered images per split (captions cycle through the templates)."""
    out = {}
    for split in ("train", "heldout"):
        scenes = sample_scenes(n, split, seed=seed + 12345)
        out[split] = prompt_fidelity(render(scenes), [caption(s, i) for i, s in enumerate(scenes)])
    return out


def _folder(path: Path | str | None, default: Path, what: str) -> str:
    """`path` (or `default`) as a string; a MissingFileError when it is not a folder."""
    folder = Path(path or default)
    if not folder.is_dir():
        raise MissingFileError(f"{what} folder {folder} does not exist")
    return str(folder)


def load_pipeline(model: Path | str | None = None):
    """The stock StableDiffusionPipeline of `model` (default: the shipped world model) in fp32, with DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        _folder(model, WORLD_MODEL, "model"), safety_checker=None, requires_safety_checker=False,
        torch_dtype=torch.float32,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int = 50, cfg_scale: float = 5.0, seed: int = 0,
             batch: int = 32) -> torch.Tensor:
    """(N, 3, 64, 64) in [0, 1]; image i uses noise seeded by (seed, i) so results do not depend on batch."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(seed * 100_003 + i + j) for j in range(len(chunk))]
        img = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg_scale, generator=gens, height=64, width=64,
                   output_type="pt").images
        out.append(img.float().clamp(0, 1))
    return torch.cat(out)


def model_fidelity(model=None, steps: int = 50, cfg_scale: float = 5.0, seed: int = 0) -> dict:
    """Evaluator fidelity of one sample per held-out and per train prompt, and the time of 8 samples."""
    pipe = load_pipeline(model)
    out = {}
    for split in ("heldout", "train"):
        prompts = prompt_split(split)
        out[split] = prompt_fidelity(generate(pipe, prompts, steps, cfg_scale, seed), prompts)
    t = time.time()
    generate(pipe, prompt_split("heldout")[:8], steps, cfg_scale, seed, batch=8)
    out["seconds_for_8_images"] = time.time() - t
    return out


def wrong_captions(scene: Scene, template: int) -> tuple[list[str], list[str]]:
    """Every one-attribute-wrong caption of `scene` in `template` and the attribute each one changes."""
    texts, attrs = [], []
    for a in ATTRIBUTES:
        for v in ALTERNATIVES[a]:
            if v != getattr(scene, a):
                texts.append(caption(Scene(**{**scene.attributes(), a: v}), template))
                attrs.append(a)
    return texts, attrs


@torch.no_grad()
def clip_ranking(clip: Path | str | None = None, n: int = 300, seed: int = 0, split: str = "heldout") -> dict[str, float]:
    """On n rendered images of `split`: how often the CLIP score (exp(logit_scale) * cosine) of the
    true caption beats every one-attribute-wrong caption (all alternatives, same template), overall
    and per changed attribute; plus top-1 among [true + all of them]."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path = _folder(clip, WORLD_CLIP, "CLIP")
    model = CLIPModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(path)
    proc = CLIPImageProcessor.from_pretrained(path)
    mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    scenes = sample_scenes(n, split, seed=seed + 777)
    img = image_features(model, (render(scenes) - mean) / std)  # (n, P)
    wins = {a: [] for a in ATTRIBUTES}
    top1 = []
    rng = random.Random(seed)
    for i, scene in enumerate(scenes):
        k = rng.randrange(len(TEMPLATES))
        wrong, attrs = wrong_captions(scene, k)
        txt = text_features(model, tokenize(tok, [caption(scene, k), *wrong]))
        score = model.logit_scale.exp() * txt @ img[i]  # (1 + alternatives,)
        for a, s in zip(attrs, score[1:]):
            wins[a].append(float(score[0] > s))
        top1.append(float(score.argmax() == 0))
    out = {a: sum(v) / len(v) for a, v in wins.items()}
    out["pairwise"] = sum(sum(v) for v in wins.values()) / sum(len(v) for v in wins.values())
    out["top1"] = sum(top1) / len(top1)
    return out


def evaluate(model=None, clip=None, n_real: int = 1000, cfg_scale: float = 5.0, steps: int = 50, seed: int = 0,
             skip: set[str] = frozenset()) -> dict:
    """Every measurement not in `skip` ("real", "model", "clip"), with the settings used."""
    res: dict = {"settings": dict(n_real=n_real, cfg_scale=cfg_scale, steps=steps, seed=seed,
                                  model=str(model or WORLD_MODEL), clip=str(clip or WORLD_CLIP))}
    if "real" not in skip:
        res["real"] = real_fidelity(n_real, seed)
    if "model" not in skip:
        res["model"] = model_fidelity(model, steps, cfg_scale, seed)
    if "clip" not in skip:
        res["clip_ranking_heldout"] = clip_ranking(clip, seed=seed)
        res["clip_ranking_train"] = clip_ranking(clip, seed=seed, split="train")
    return res


def format_table(res: dict) -> str:
    """`evaluate`'s results as a markdown table of fidelities and lines for the timing and CLIP ranking."""
    cols = list(ATTRIBUTES) + ["mean"]
    lines = ["| images | split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for kind in ("real", "model"):
        for split, acc in res.get(kind, {}).items():
            if isinstance(acc, dict):
                lines.append(f"| {kind} | {split} | " + " | ".join(f"{acc[c]:.3f}" for c in cols) + " |")
    if "model" in res:
        lines.append(f"\nmodel: 8 images, DDIM {res['settings']['steps']}, CFG {res['settings']['cfg_scale']}: "
                     f"{res['model']['seconds_for_8_images']:.2f} s")
    for split in ("train", "heldout"):
        if f"clip_ranking_{split}" in res:
            r = res[f"clip_ranking_{split}"]
            lines.append(f"CLIP ranking on {split} images (true caption > one-attribute-wrong): " + ", ".join(
                f"{k} {v:.3f}" for k, v in r.items()))
    return "\n".join(lines)

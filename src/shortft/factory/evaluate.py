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
from shortft.world import WORLD_CLIP
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


@torch.no_grad()
def generate(backend, prompts: list[str], steps: int, cfg_scale: float, seed: int = 0, batch: int = 32) -> torch.Tensor:
    """(N, 3, 64, 64) in [0, 1] of the model's own chain (its family's stock sampler, through the engine);
    image i's noise is seeded by (seed, i), as a stock pipeline given one generator per image draws it."""
    from shortft.chain import sampling_plan
    from shortft.sample import generate as sample

    plan = sampling_plan(backend.timesteps(steps), lambda i: (), cfg_scale)
    return sample(backend, plan, prompts, [seed * 100_003 + i for i in range(len(prompts))], batch_size=batch)


def model_fidelity(model: str = "world", steps: int = 0, cfg_scale: float = 5.0, seed: int = 0) -> dict:
    """Evaluator fidelity of one sample per held-out and per train prompt, and the time of 8 samples.
    `model`: "world", "world-flow" or a model folder; steps 0 = the model's own (50 DDIM, 28 flow)."""
    from shortft.backends import load_backend
    from shortft.config import TrainConfig
    from shortft.presets import TRAIN_PRESETS, default_preset

    backend = load_backend(str(model))
    steps = steps or TRAIN_PRESETS[default_preset(str(model))].get("num_steps", TrainConfig.num_steps)
    out = {}
    for split in ("heldout", "train"):
        prompts = prompt_split(split)
        out[split] = prompt_fidelity(generate(backend, prompts, steps, cfg_scale, seed), prompts)
    t = time.time()
    generate(backend, prompt_split("heldout")[:8], steps, cfg_scale, seed, batch=8)
    out["seconds_for_8_images"] = time.time() - t
    out["steps"] = steps
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


def evaluate(model: str = "world", clip=None, n_real: int = 1000, cfg_scale: float = 5.0, steps: int = 0,
             seed: int = 0, skip: set[str] = frozenset()) -> dict:
    """Every measurement not in `skip` ("real", "model", "clip"), with the settings used."""
    res: dict = {"settings": dict(n_real=n_real, cfg_scale=cfg_scale, steps=steps, seed=seed, model=str(model),
                                  clip=str(clip or WORLD_CLIP))}
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
        lines.append(f"\nmodel: 8 images, {res['model']['steps']} steps, CFG {res['settings']['cfg_scale']}: "
                     f"{res['model']['seconds_for_8_images']:.2f} s")
    for split in ("train", "heldout"):
        if f"clip_ranking_{split}" in res:
            r = res[f"clip_ranking_{split}"]
            lines.append(f"CLIP ranking on {split} images (true caption > one-attribute-wrong): " + ", ".join(
                f"{k} {v:.3f}" for k, v in r.items()))
    return "\n".join(lines)

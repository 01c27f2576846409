"""`shortft eval`: score images with every available metric; write a CSV per image, a JSON summary,
and print a table.

    shortft eval IMAGES_DIR [--out DIR] [--metrics hpsv2,pickscore,...] [--reward-paths hpsv2=/f.pt,...]
    shortft eval --run RUN_DIR --prompts FILE [--seeds 0,1] [--out DIR]     # sample a trained run first
    shortft eval --run RUN_DIR --hpdv2 DIR [--styles photo,anime] [--limit 50]

Images folder: PNG/JPG/JPEG/WEBP files; prompts from, in this order of preference,
  prompts.json  {"file name": "prompt", ...}
  prompts.csv   header `file,prompt` (other columns ignored)
  prompts.txt   one prompt per line, matched to the images in sorted file-name order
  <stem>.txt    beside each image.
HPDv2 benchmark prompts: DIR/{anime,concept-art,paintings,photo}.json (JSON lists of strings, as in
the benchmark) or .txt (one per line); `--hpdv2 hub` downloads them from the dataset repo.

Metrics (name: meaning, direction):
  hpsv2, hpsv2.1     HPS v2 score x100 ↑          pickscore   exp(logit_scale)·cos ↑
  aesthetic          LAION aesthetic, 1-10 ↑      world_clip  the world's CLIP score ↑
  asymmetry          symmetry metric ↓ (see rewards/symmetry.py)
  jpeg_kb            JPEG q95 size in kB (↓ = compressible)
  prompt_fidelity    the embedded world's rule-based evaluator (world prompts only; summary only)
A reward whose weights are not available is skipped with the reason in the summary.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from shortft.errors import ConfigError, MissingFileError
from shortft.rewards.jpeg import jpeg_size_kb
from shortft.rewards.symmetry import asymmetry

Metric = Callable[[torch.Tensor, list[str]], torch.Tensor]  # (B, 3, H, W) in [0, 1], prompts -> (B,)

REWARD_METRICS = ("hpsv2", "hpsv2.1", "pickscore", "aesthetic", "world_clip")
ALL_METRICS = (*REWARD_METRICS, "asymmetry", "jpeg_kb", "prompt_fidelity")
LOWER_IS_BETTER = {"asymmetry", "jpeg_kb"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPDV2_HUB = ("zhwang/HPDv2", "benchmark/{style}.json")  # dataset repo, file pattern


# ------------------------------------------------------------------------------------------------ inputs
def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) float in [0, 1]."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def load_folder(folder: str | Path) -> tuple[list[str], list[torch.Tensor], list[str]]:
    """(file names, images, prompts) of an image folder with a prompt sidecar (see module doc)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"image folder {folder} does not exist")
    files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if (folder / "prompts.json").is_file():
        table = json.loads((folder / "prompts.json").read_text())
    elif (folder / "prompts.csv").is_file():
        with open(folder / "prompts.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"file", "prompt"} <= set(rows[0]):
            raise ConfigError(f"{folder / 'prompts.csv'} needs columns 'file' and 'prompt', has {list(rows[0])}")
        table = {r["file"]: r["prompt"] for r in rows}
    elif (folder / "prompts.txt").is_file():
        lines = [ln for ln in (folder / "prompts.txt").read_text().splitlines() if ln.strip()]
        if len(lines) != len(files):
            raise ConfigError(f"{folder / 'prompts.txt'} has {len(lines)} prompts for {len(files)} images")
        table = dict(zip(files, lines))
    else:
        table = {f: (folder / f).with_suffix(".txt").read_text().strip()
                 for f in files if (folder / f).with_suffix(".txt").is_file()}
    missing = [f for f in files if f not in table]
    if missing:
        raise ConfigError(f"no prompt for {len(missing)} images in {folder} (e.g. {missing[:3]}); give prompts.json, "
                         "prompts.csv (file,prompt), prompts.txt (sorted order) or <stem>.txt sidecars")
    return files, [read_image(folder / f) for f in files], [table[f] for f in files]


def load_hpdv2(source: str, styles: list[str] | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """[(style, prompt)] of the HPDv2 benchmark from a folder, or from the hub when source == 'hub'."""
    styles = styles or list(HPDV2_STYLES)
    bad = [s for s in styles if s not in HPDV2_STYLES]
    if bad:
        raise ConfigError(f"unknown HPDv2 styles {bad}; choose from {list(HPDV2_STYLES)}")
    out = []
    for style in styles:
        if source == "hub":
            from shortft.hub import hub_file

            repo, pattern = HPDV2_HUB
            path = hub_file(f"{repo}/{pattern.format(style=style)}", f"HPDv2 {style!r} prompts", "pass its folder "
                            f"with --hpdv2 DIR (it holds benchmark/{style}.json)", repo_type="dataset")
        else:
            folder = Path(source)
            path = next((folder / f"{style}{ext}" for ext in (".json", ".txt") if (folder / f"{style}{ext}").is_file()),
                        None)
            if path is None:
                raise MissingFileError(f"HPDv2 prompts {style}.json or {style}.txt not in {folder} (the benchmark's "
                                        f"{HPDV2_HUB[0]} dataset, {HPDV2_HUB[1].format(style=style)})")
        prompts = json.loads(path.read_text()) if path.suffix == ".json" else [
            ln for ln in path.read_text().splitlines() if ln.strip()]
        out += [(style, p) for p in prompts[:limit]]
    return out


# ----------------------------------------------------------------------------------------------- metrics
def _asymmetry(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return asymmetry(images)


def _jpeg_kb(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return jpeg_size_kb(images)  # the real PIL file size at quality 95, not the reward's surrogate


IMAGE_METRICS: dict[str, Metric] = {"asymmetry": _asymmetry, "jpeg_kb": _jpeg_kb}  # metrics that need no model


def build_metric(name: str, settings=None) -> Metric:
    """The metric `name`: an image metric, or a reward model built with `settings` (RewardWeightsError or
    ImportError when its weights or package are missing)."""
    from shortft.rewards import REWARDS, RewardSettings, _import_builtin_rewards

    if name in IMAGE_METRICS:
        return IMAGE_METRICS[name]
    if name not in REWARD_METRICS:
        raise ConfigError(f"unknown metric {name!r}; choose from {list(ALL_METRICS)}")
    _import_builtin_rewards()
    return REWARDS[name](settings or RewardSettings())


def _world_fidelity(images: list[torch.Tensor], prompts: list[str]) -> dict[str, float] | str:
    """The world evaluator's prompt fidelity, or why it does not apply."""
    from shortft.world.evaluator import prompt_fidelity
    from shortft.world.scenes import parse_prompt

    if not all(any(v is not None for v in parse_prompt(p).values()) for p in prompts):
        return "not world prompts (some name no world attribute)"
    side = 64
    batch = torch.stack([torch.nn.functional.interpolate(im[None], size=(side, side), mode="bilinear",
                                                         antialias=True)[0] for im in images])
    return prompt_fidelity(batch.clamp(0, 1), prompts)


def _per_image(metric: Metric, images: list[torch.Tensor], prompts: list[str], batches: list[list[int]]) -> list[float]:
    """One metric's score of every image, computed over `batches` (lists of indices of same-size images)."""
    out = [math.nan] * len(images)
    for chunk in batches:
        scores = metric(torch.stack([images[i] for i in chunk]), [prompts[i] for i in chunk])  # (len(chunk),)
        for i, v in zip(chunk, scores.float().cpu().tolist()):
            out[i] = v
    return out


@torch.no_grad()
def score_images(images: torch.Tensor | list[torch.Tensor], prompts: list[str],
                 metrics: dict[str, Metric] | list[str] | None = None, batch_size: int = 8,
                 groups: list[str] | None = None, fidelity: bool = True, settings=None) -> dict:
    """Score images (a (N, 3, H, W) tensor or a list of (3, H, W), sizes may differ, values in [0, 1]).

    `metrics`: {name: metric}, or names from ALL_METRICS (default: all), each built with `settings` when
    its turn comes and dropped before the next, so one reward model is in memory at a time; a metric
    whose weights or package are missing is skipped with the reason ("prompt_fidelity" is `fidelity`).
    `groups`: optional label per image (e.g. the HPDv2 style) for per-group means.
    `fidelity`: also run the world evaluator's prompt fidelity (when the prompts are world prompts).
    Returns {"n", "per_image": {metric: [N floats]}, "summary": {metric: {mean, std}},
             "by_group": {group: {metric: mean}}, "prompt_fidelity": {...} or reason, "skipped": {...}}."""
    from shortft.rewards import RewardWeightsError

    images = list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    names = [n for n in (metrics if metrics is not None else ALL_METRICS) if n != "prompt_fidelity"]
    unknown = [] if isinstance(metrics, dict) else [n for n in names if n not in ALL_METRICS]
    if unknown:
        raise ConfigError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape), []).append(i)
    batches = [idx[s:s + batch_size] for idx in by_size.values() for s in range(0, len(idx), batch_size)]
    per_image, skipped = {}, {}
    for name in names:
        try:
            metric = metrics[name] if isinstance(metrics, dict) else build_metric(name, settings)
        except (RewardWeightsError, ImportError) as err:
            skipped[name] = str(err)
            continue
        per_image[name] = _per_image(metric, images, prompts, batches)
        del metric  # before the next one is built
    out = {"n": len(images), "per_image": per_image, "summary": {n: _stats(v) for n, v in per_image.items()},
           "skipped": skipped}
    if groups is not None:
        out["by_group"] = {g: {n: _stats([v[i] for i in range(len(images)) if groups[i] == g])["mean"]
                               for n, v in per_image.items()} for g in dict.fromkeys(groups)}
    if fidelity:
        try:
            out["prompt_fidelity"] = _world_fidelity(images, prompts)
        except ImportError as err:
            out["prompt_fidelity"] = f"the world evaluator is not available ({err})"
    return out


def _stats(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}


# ------------------------------------------------------------------------------------------------ output
def format_table(result: dict) -> str:
    lines = ["| metric | mean | std | better |", "|---|---|---|---|"]
    for name, s in result["summary"].items():
        lines.append(f"| {name} | {s['mean']:.4f} | {s['std']:.4f} | {'lower' if name in LOWER_IS_BETTER else 'higher'} |")
    fid = result.get("prompt_fidelity")
    if isinstance(fid, dict):
        lines.append(f"| prompt_fidelity (world) | {fid['mean']:.4f} | | higher |")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped | | {why.splitlines()[0][:90]} |")
    return "\n".join(lines)


def write_results(result: dict, files: list[str], prompts: list[str], out: Path,
                  groups: list[str] | None = None) -> None:
    """out/scores.csv (one row per image) and out/summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(result["per_image"])
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "prompt", *(["group"] if groups else []), *names])
        for i, (file, prompt) in enumerate(zip(files, prompts)):
            w.writerow([file, prompt, *([groups[i]] if groups else []), *(f"{result['per_image'][n][i]:.6g}"
                                                                           for n in names)])
    summary = {k: v for k, v in result.items() if k != "per_image"}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def save_images(images: torch.Tensor, folder: Path) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, im in enumerate(images):
        name = f"{i:05d}.png"
        arr = (im.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        Image.fromarray(arr).save(folder / name)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    """Add the `eval` subcommand."""
    p = subparsers.add_parser("eval", help="score images (a folder, or a trained run sampled on prompts)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="?", default=None, help="folder of images with a prompt sidecar")
    p.add_argument("--run", default=None, help="trained run folder to sample from instead of an image folder")
    p.add_argument("--prompts", default=None, help="--run: prompt file (one per line)")
    p.add_argument("--hpdv2", default=None, help="--run: HPDv2 benchmark prompts folder, or 'hub'")
    p.add_argument("--styles", default=None, help="HPDv2 styles, comma-separated (default: all four)")
    p.add_argument("--limit", type=int, default=None, help="HPDv2: first N prompts per style")
    p.add_argument("--seeds", default="0", help="--run: comma-separated seeds; each prompt is sampled once per seed")
    p.add_argument("--metrics", default=None, help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)")
    p.add_argument("--reward-paths", default="", help="where reward weights live: hpsv2=/path/file.pt,pickscore=/dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device for reward models")
    p.add_argument("--batch", type=int, default=8, help="images per metric call")
    p.add_argument("--out", default=None, help="output folder (default: IMAGES/eval or RUN/eval)")
    p.set_defaults(func=run_eval)


def run_eval(args) -> dict:
    from shortft.rewards import RewardSettings, parse_paths

    if (args.images is None) == (args.run is None):
        raise ConfigError("shortft eval: give an image folder or --run RUN_DIR (one of them)")
    groups = None
    if args.run:
        if args.hpdv2:
            pairs = load_hpdv2(args.hpdv2, args.styles.split(",") if args.styles else None, args.limit)
        elif args.prompts:
            pairs = [("", ln.strip()) for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
        else:
            raise ConfigError("shortft eval --run needs --prompts FILE or --hpdv2 DIR")
        seeds = [int(s) for s in args.seeds.split(",")]
        prompts = [p for _, p in pairs for _ in seeds]
        groups = [g for g, _ in pairs for _ in seeds] if args.hpdv2 else None
        out = Path(args.out or Path(args.run) / "eval")
        from shortft.sample import sample_run

        images = sample_run(args.run, prompts, [s for _ in pairs for s in seeds])
        files = save_images(images, out / "images")
        images = list(images)
    else:
        files, images, prompts = load_folder(args.images)
        out = Path(args.out or Path(args.images) / "eval")
    names = args.metrics.split(",") if args.metrics else list(ALL_METRICS)
    settings = RewardSettings(device=args.device, paths=parse_paths(args.reward_paths))
    # names, not built metrics: HPS v2, v2.1 and PickScore are ~1B parameters each, built one at a time
    result = score_images(images, prompts, names, args.batch, groups, fidelity="prompt_fidelity" in names,
                          settings=settings)
    result["source"] = str(args.run or args.images)
    write_results(result, files, prompts, out, groups)
    print(format_table(result))
    print(f"\nwrote {out / 'scores.csv'} and {out / 'summary.json'}")
    return result

"""`shortft world pretrain|eval`: rebuild the embedded world's assets and measure their quality
(docs/world.md). `register(subparsers)` is called by `shortft.cli`."""

from __future__ import annotations

from pathlib import Path

from shortft import config


def register(subparsers) -> None:
    from shortft.factory.config import PART_NAMES, PRETRAIN_PRESETS, PretrainConfig

    p = subparsers.add_parser("world", help="the embedded world: pretrain its assets, evaluate them")
    sub = p.add_subparsers(dest="world_command", required=True)

    pre = sub.add_parser("pretrain", help="train the world's assets from scratch (docs/world.md)",
                         description="Rebuild the embedded world's assets. Settings: --preset, then --section.key "
                                     "flags or section.key=value overrides (e.g. --vae.steps 500, unet.text=joint).")
    pre.add_argument("--preset", default="shipped", help=f"one of {', '.join(PRETRAIN_PRESETS)}; shipped: the recipe "
                     "of the shipped assets; tiny: tiny networks, a few steps (tests)")
    pre.add_argument("--part", choices=[*PART_NAMES, "all"], default="all",
                     help="which asset to (re)build; all: every part in this order")
    config.add_arguments(pre, PretrainConfig)
    pre.set_defaults(func=run_pretrain_command)

    ev = sub.add_parser("eval", help="prompt fidelity of real images and model samples, CLIP ranking")
    ev.add_argument("--model", default="world", help="world, world-flow or a diffusers folder")
    ev.add_argument("--clip", type=Path, default=None, help="CLIP folder (default: the shipped CLIP)")
    ev.add_argument("--real", type=int, default=1000, help="real images per split")
    ev.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    ev.add_argument("--steps", type=int, default=0, help="sampling steps; 0 = the model's own (world 50, world-flow 28)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the real images, sample noises and CLIP captions")
    ev.add_argument("--skip", nargs="*", default=[], choices=["real", "model", "clip"], help="measurements to leave out")
    ev.add_argument("--json", type=Path, default=Path("runs/world-eval.json"), help="where to write the results")
    ev.set_defaults(func=run_eval_command)


def run_pretrain_command(args) -> int:
    from shortft.factory.config import PretrainConfig, build_config
    from shortft.factory.pretrain import run_pretrain

    run_pretrain(build_config(args.preset, config.overrides_from_args(PretrainConfig, args)), args.part)
    return 0


def run_eval_command(args) -> int:
    from shortft.factory.evaluate import evaluate, format_table
    from shortft.files import write_json

    res = evaluate(model=args.model, clip=args.clip, n_real=args.real, cfg_scale=args.cfg, steps=args.steps,
                   seed=args.seed, skip=set(args.skip))
    print(format_table(res))
    print(f"wrote {write_json(args.json, res, indent=2)}")
    return 0

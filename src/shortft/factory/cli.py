"""`shortft world pretrain|eval`: regenerate the embedded world's assets and measure their quality.

`register(subparsers)` is called by `shortft.cli`; `python -m shortft.world.cli` runs it standalone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortft.world import ASSETS

PARTS = ("tokenizer", "vae", "clip", "unet", "vae_decoder", "shortcut", "all")  # "all" runs them in this order


def register(subparsers) -> None:
    p = subparsers.add_parser("world", help="the embedded world: pretrain its assets, evaluate them")
    sub = p.add_subparsers(dest="world_command", required=True)

    pre = sub.add_parser("pretrain", help="train world assets from scratch (see src/shortft/world/README.md)")
    pre.add_argument("--part", choices=PARTS, default="all", help="which asset to (re)build")
    pre.add_argument("--out", type=Path, default=ASSETS, help="asset root (writes model/ and clip/)")
    pre.add_argument("--work-dir", type=Path, default=Path("runs/world-pretrain"), help="checkpoints, logs")
    pre.add_argument("--steps", type=int, default=None, help="optimisation steps of the chosen part")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    pre.add_argument("--tiny", action="store_true", help="tiny networks, a few steps (tests)")
    pre.add_argument("--unet-text", choices=("joint", "clip", "clip-tuned"), default="clip-tuned",
                     help="the UNet's text encoder: its own, trained with it (joint); the world CLIP's text tower, "
                          "frozen (clip) or fine-tuned with it at a tenth of its learning rate (clip-tuned)")
    pre.add_argument("--vae-random-colour", type=float, default=None,
                     help="fraction of VAE images with a random object colour (default: PretrainConfig's)")
    pre.set_defaults(func=_pretrain)

    ev = sub.add_parser("eval", help="prompt fidelity of real images, model samples, CLIP ranking")
    ev.add_argument("--model", type=Path, default=None, help="diffusers folder (default: shipped model)")
    ev.add_argument("--clip", type=Path, default=None, help="CLIP folder (default: shipped clip)")
    ev.add_argument("--real", type=int, default=1000, help="real images per split")
    ev.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    ev.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--skip", nargs="*", default=[], choices=["real", "model", "clip"])
    ev.add_argument("--json", type=Path, default=Path("runs/world-eval.json"), help="where to write results")
    ev.set_defaults(func=_eval)


def _pretrain(args) -> None:
    import torch

    from shortft.factory.pretrain import PretrainConfig, run_pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PretrainConfig(out=args.out, work_dir=args.work_dir, seed=args.seed, tiny=args.tiny, unet_text=args.unet_text)
    if args.vae_random_colour is not None:
        cfg.vae_random_colour = args.vae_random_colour
    if args.steps is not None:
        if args.part == "all":
            raise SystemExit("--steps needs a single --part (tokenizer has none)")
        setattr(cfg, f"{args.part}_steps", args.steps)
    run_pretrain(cfg, args.part)


def _eval(args) -> None:
    from shortft.factory.evaluate import evaluate, format_table

    res = evaluate(
        model=args.model, clip=args.clip, n_real=args.real, cfg_scale=args.cfg, steps=args.steps,
        seed=args.seed, skip=set(args.skip),
    )
    print(format_table(res))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shortft")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

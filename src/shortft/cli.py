"""shortft: align text-to-image diffusion models with rewards by backpropagating through the denoising chain.

`shortft` with no arguments runs `shortft train` (ShortFT on the embedded world). Every config field is a
`--flag` and a `key=value` override. Bad input (a `UserError`: unknown key, wrong type, missing model or
file) ends with a one-line error and exit status 2, before anything is written; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shortft import config
from shortft.errors import TrainingStopped, UserError
from shortft.presets import TRAIN_PRESETS


def registry_help() -> dict[str, str]:
    """The method and reward names for `--help`, read from their registries."""
    from shortft.methods import METHODS
    from shortft.rewards import reward_names

    return {"method": f"one of: {', '.join(METHODS)}",
            "reward": f"built-in rewards: {', '.join(reward_names())}"}


def add_train(sub) -> None:
    p = sub.add_parser("train", help="align a model with a reward (default: ShortFT on the embedded world)",
                       description="Train LoRA adapters by backpropagating a reward through the denoising chain.")
    p.add_argument("--preset", help=f"one of {', '.join(TRAIN_PRESETS)}; defaults to the model's own (world, "
                                    "world-flow, or its family's: sd15, sdxl, sd3, sd35)")
    p.add_argument("--config", help="YAML file of config keys")
    config.add_arguments(p, config.TrainConfig, registry_help())
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    cfg = config.build_config(args.preset, args.config, config.overrides_from_args(config.TrainConfig, args))
    from shortft.train import train

    train(cfg)
    return 0


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images with a trained run (original chain, per-timestep LoRAs)")
    p.add_argument("run_dir", help="a finished `shortft train` run folder")
    p.add_argument("--prompts", default=None, help="prompt set or file (default: the run's eval prompts)")
    p.add_argument("--count", type=int, default=8, help="number of images (prompts are cycled)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--base", action="store_true", help="sample the base model (all adapters off) for comparison")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/samples)")
    p.set_defaults(func=run_sample)


def run_sample(args) -> int:
    from shortft.images import save_grid, to_pil
    from shortft.prompts import load_prompts
    from shortft.sample import run_metadata_of, sample_run

    cfg = run_metadata_of(args.run_dir)["config"]
    prompts = load_prompts(args.prompts or cfg["eval_prompts"])
    prompts = [prompts[i % len(prompts)] for i in range(args.count)]
    images = sample_run(args.run_dir, prompts, [args.seed + i for i in range(args.count)], base=args.base)
    out = Path(args.out or Path(args.run_dir) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        to_pil(img).save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(prompt + "\n")
    save_grid(images, out / "grid.png", scale=2 if images.shape[-1] < 256 else 1)
    print(f"wrote {len(images)} images and grid.png to {out} ({cfg['method']}{', base model' if args.base else ''})")
    return 0


def commands() -> list:
    """Each entry adds one subcommand to the parser."""
    from shortft import bench, distill, evaluate
    from shortft.factory import cli as factory_cli

    return [add_train, add_sample, evaluate.register, distill.register, bench.register, factory_cli.register]


def main(argv: list[str] | None = None) -> int:
    try:
        parser = argparse.ArgumentParser(prog="shortft", description=__doc__.splitlines()[0])
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for add in commands():
            add(sub)
        argv = sys.argv[1:] if argv is None else argv
        args = parser.parse_args(argv or ["train"])  # no arguments: the main job
        status = args.func(args)  # an exit status, or what the command made (eval's summary): then 0
        return status if isinstance(status, int) else 0
    except UserError as err:
        print(f"shortft: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"shortft: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:  # Ctrl-C outside training's safe points (start-up, other commands): nothing to save
        print("shortft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

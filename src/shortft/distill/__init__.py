"""`shortft distill`: a trajectory-preserving shortcut LoRA for any SD-family model.

Segmented trajectory distillation, the idea behind Hyper-SD's TSCD (Ren et al., "Hyper-SD: Trajectory
Segmented Consistency Model for Efficient Image Synthesis", 2024) without its consistency bridge: the
sampling chain is cut into k segments snapped to ShortFT's DDIM grid, and a LoRA on the model (adapter
"shortcut") learns to jump from any point of a segment to the frozen CFG teacher's own point at the
segment's edge in one DDIM move, exactly as ShortFT uses it (loss.py).

Data: the teacher's own trajectories, no dataset (pool.py). Before training, `pool` trajectories are
sampled from noise with the teacher and stored at every grid timestep. A row of a batch is either a
point on a stored trajectory (exactly the states ShortFT's base chain visits) or, with probability
`noised_fraction`, a stored clean sample re-noised with fresh noise (off-trajectory states, which
ShortFT's fine-tuned LoRAs also produce; the teacher then runs live to the edge).

Guidance. ShortFT runs its original chain with CFG (`guidance`: 5 on the world model, 7.5 on SD 1.5)
and the shortcut conditional-only by default (`shortcut_guidance` = 1). The teacher here is the CFG
teacher; a conditional-only student (`student_guidance` = 1) then approximates the very trajectories
the chain follows at one UNet call per jump, as Hyper-SD's CFG-free LoRAs do, but must learn what
guidance adds, which is slow (docs/distill.md). `student_guidance` > 1 trains a CFG student instead (two
calls per jump; ShortFT then needs `shortcut_guidance` at the same scale; the world's shortcut is one).

Modules: config (DistillConfig, DISTILL_PRESETS), pool (teacher trajectories), loss, loop (`distill`),
fidelity (`shortft distill --eval`). Importing this package stays light (no torch): the CLI imports it
to register the command.
"""

from __future__ import annotations

from shortft.config import add_arguments, build, overrides_from_args
from shortft.distill.config import DISTILL_PRESETS, STUDENT, DistillConfig, validate
from shortft.distill.fidelity import evaluate_shortcut, fidelity
from shortft.distill.loop import distill
from shortft.distill.loss import segment_layout
from shortft.errors import ConfigError

__all__ = ["DISTILL_PRESETS", "STUDENT", "DistillConfig", "distill", "evaluate_shortcut", "fidelity", "register",
           "segment_layout"]

EVAL_ONLY = ("shortcut", "count", "json", "grid")  # flags that only mean something with --eval


def register(sub) -> None:
    """Add `shortft distill` (train a shortcut) and `shortft distill --eval` (measure one)."""
    p = sub.add_parser("distill", help="make a trajectory-preserving shortcut LoRA for a model (or --eval one)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default",
                   help=f"named recipe, one of {', '.join(DISTILL_PRESETS)}; 'world' made the shipped world shortcut, "
                        "'world-flow' the flow world's (default: %(default)s)")
    p.add_argument("--config", help="YAML file of config keys (over the preset, under the flags)")
    add_arguments(p, DistillConfig)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the work dir")
    p.add_argument("--eval", action="store_true", help="measure the fidelity of --shortcut instead of training "
                   "(on --prompts; '' = the model's held-out prompts)")
    p.add_argument("--shortcut", help="--eval: the shortcut LoRA file")
    p.add_argument("--count", type=int, help="--eval: prompts x noises measured (default 32)")
    p.add_argument("--json", help="--eval: write the figures here")
    p.add_argument("--grid", help="--eval: write teacher / shortcut / naive sample rows here")
    p.set_defaults(func=run)


def run(args) -> int:
    """`shortft distill [--eval]`: preset < --config file < flags and key=value overrides."""
    cfg = build(DistillConfig, DISTILL_PRESETS, args.preset, args.config, overrides_from_args(DistillConfig, args))
    if not args.eval:
        given = [f"--{k}" for k in EVAL_ONLY if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --eval")
        distill(cfg, fresh=args.fresh)
        return 0
    validate(cfg, training=False)
    count = 32 if args.count is None else args.count
    if not args.shortcut:
        raise ConfigError("--eval needs --shortcut FILE")
    if count < 1:
        raise ConfigError(f"--count={count} is out of range; valid: --count >= 1")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    evaluate_shortcut(cfg.model, args.shortcut, cfg.prompts, count, cfg.segments, cfg.num_steps, cfg.guidance,
                      cfg.device, args.json or "", args.grid or "", cfg.student_guidance)
    return 0

"""The loss of segmented trajectory distillation, and the segments it is measured on.

Segments. [0, T] is cut into k segments with edges T*j/k, snapped to the DDIM grid that ShortFT samples
on (SD 1.5, 50 steps, k = 4: lower edges 761, 501, 261, 1), so the shortcut lands exactly where ShortFT
asks it to (741->501, 481->261, 241->1, and 981->761). Segment j holds the grid timesteps t with
edge_j < t <= edge_{j-1} (the first segment: every timestep above edge_1).

Student. The base UNet plus the LoRA being trained (adapter "shortcut"), in the parametrisation ShortFT
uses: one DDIM jump from its ε̂ straight to the segment's lower edge,
    f_θ(x_t, t) = √ᾱ_e x̂0 + √(1-ᾱ_e) ε̂,   x̂0 = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t,   ε̂ = ε_θ(x_t, t, c).

Target. The frozen CFG teacher's own point at the segment's edge (trajectory distillation, as Hyper-SD's
TSCD does within a segment): on-trajectory rows read it from the pool, where the teacher already ran
exactly these steps from exactly this x_t; re-noised rows (`noised_fraction`) run the teacher live to
the edge. Loss: MSE between the student's landing point and the target, in latent space at the edge
(what ShortFT consumes), divided per segment by the MSE of the naive one-step CFG jump over that
segment, so that the high-noise segments (whose errors can be 10x larger) do not drown the others and
the loss reads as (error / naive error)^2.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from shortft.chain import batch_repeat, batch_rows, batch_to
from shortft.distill.config import STUDENT, DistillConfig
from shortft.errors import ConfigError

if TYPE_CHECKING:
    import torch


def segment_layout(timesteps: list[int], k: int) -> list[dict]:
    """Per segment (high noise first): the grid indices it trains on, its lower edge, and where ShortFT
    starts its jump. 50 steps, k = 4: edges 761, 501, 261, 1; starts 981, 741, 481, 241."""
    from shortft.methods.shortft import segment_bounds

    b = segment_bounds(len(timesteps), k)
    out = []
    for j in range(1, k + 1):
        edge = b[j] - 1  # grid index of the segment's last timestep (ShortFT's landing point)
        first = b[j - 1] - 1 if j > 1 else 0  # the previous edge belongs here too: k-step sampling starts there
        if edge - first < 1:
            raise ConfigError(f"segments={k} with num_steps={len(timesteps)} leaves segment {j} without an "
                              "inner step; use fewer segments or more steps")
        out.append({"train": list(range(first, edge)), "edge": edge, "start": b[j - 1],
                    "anchors": sorted({first, b[j - 1]})})
    return out


class SegmentLoss:
    """Segmented trajectory distillation of a shortcut LoRA (see the module docstring)."""

    def __init__(self, backend, timesteps: list[int], layout: list[dict], contexts: dict,
                 uncond: dict, pool: torch.Tensor, pool_prompts: torch.Tensor, cfg: DistillConfig,
                 guidance: float):
        self.b, self.ts, self.layout, self.cfg, self.guidance = backend, timesteps, layout, cfg, guidance
        self.contexts, self.uncond, self.pool, self.pool_prompts = contexts, uncond, pool, pool_prompts
        self.naive_mse = self.naive_errors()  # per segment: the loss is measured relative to these

    def _uncond(self, x: torch.Tensor) -> dict:
        return batch_repeat(self.uncond, len(x))

    def _cond(self, rows: torch.Tensor) -> dict:
        """The conditioning of the pool rows `rows` (each row's prompt), on the model's device."""
        return batch_to(batch_rows(self.contexts, self.pool_prompts[rows]), self.b.device)

    def naive_errors(self, rows: int = 64) -> list[float]:
        """Per segment, the MSE of the base model's naive one-step CFG jump from the segment's start to its
        edge on pool trajectories. Dividing by it puts the segments on one scale (the far-from-data
        segments' errors are far larger) and makes the loss read as (error / naive error)^2."""
        import torch

        from shortft.chain import Step, run_plan

        traj = self.pool[:rows].to(self.b.device)
        cond = self._cond(torch.arange(len(traj)))
        out = []
        with torch.no_grad():
            for seg in self.layout:
                s, e = seg["start"], seg["edge"]
                y = run_plan(self.b, [Step(self.ts[s], self.ts[e], (), "none", self.guidance)], traj[:, s], cond,
                             self._uncond(traj))
                out.append(max(float(((y - traj[:, e]) ** 2).mean()), 1e-12))
        return out

    def draw(self, rng: random.Random, generator: torch.Generator) -> list[dict]:
        """One group of rows per segment: a grid index n, pool rows, which rows are re-noised, fresh noise.
        The order of the draws is part of the recipe: the same seed gives the same shortcut."""
        import torch

        groups = []
        for seg in self.layout:
            # no extra draw when anchor_fraction = 0: earlier runs' random streams (and files) reproduce
            anchored = self.cfg.anchor_fraction > 0 and rng.random() < self.cfg.anchor_fraction
            n = rng.choice(seg["anchors"] if anchored else seg["train"])
            rows = torch.randint(len(self.pool), (self.cfg.batch_size,), generator=generator)
            noised = torch.rand(self.cfg.batch_size, generator=generator) < self.cfg.noised_fraction
            noise = torch.randn((self.cfg.batch_size, *self.pool.shape[2:]), generator=generator)
            groups.append({"n": n, "edge": seg["edge"], "rows": rows, "noised": noised, "noise": noise})
        return groups

    def x_t(self, g: dict) -> torch.Tensor:
        """(B, C, h, w) states at grid index n: on a stored trajectory, or a clean sample re-noised."""
        import torch

        on_traj = self.pool[g["rows"], g["n"]]  # (B, C, h, w)
        a, b = self.b.coefficients(self.ts[g["n"]])
        renoised = a * self.pool[g["rows"], -1] + b * g["noise"]  # x_t = a x0 + b ε
        return torch.where(g["noised"][:, None, None, None], renoised, on_traj).to(self.b.device)

    def target(self, x: torch.Tensor, g: dict, cond: dict) -> torch.Tensor:
        """The CFG teacher's state at the edge from x (no graph: every step has grad="none"). On-trajectory
        rows read it from the pool; re-noised rows run the teacher's grid steps n -> edge live."""
        from shortft.chain import Step, run_plan

        n, e, ts, live = g["n"], g["edge"], self.ts, g["noised"]
        y = self.pool[g["rows"], e].to(self.b.device)  # (B, C, h, w); indexing copies, so the pool is untouched
        if live.any():
            y[live] = run_plan(self.b, [Step(ts[i], ts[i + 1], (), "none", self.guidance) for i in range(n, e)],
                               x[live], batch_rows(cond, live), batch_repeat(self.uncond, int(live.sum())))
        return y

    def loss(self, groups: list[dict]) -> tuple[torch.Tensor, list[float]]:
        """Mean over segments of the MSE between the student's jump to the edge and the target, each
        relative to the segment's naive-jump MSE (so ~ (error / naive error)^2)."""
        import torch

        from shortft.chain import Step, run_plan

        losses = []
        for g in groups:
            x = self.x_t(g)
            cond = self._cond(g["rows"])
            target = self.target(x, g, cond)
            step = Step(self.ts[g["n"]], self.ts[g["edge"]], (STUDENT,), "full", self.cfg.student_guidance)
            pred = run_plan(self.b, [step], x, cond, self._uncond(x))
            losses.append(torch.nn.functional.mse_loss(pred, target) / self.naive_mse[len(losses)])
        return torch.stack(losses).mean(), [float(v.detach()) for v in losses]

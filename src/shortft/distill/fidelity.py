"""How faithful a shortcut is (`shortft distill --eval`).

On held-out prompts and fresh noises, (a) the RMSE of the shortcut's one-step jump from each segment's
first 50-step timestep to its lower edge against the 50-step CFG teacher trajectory, next to the base
model's naive one-step DDIM jump with the same CFG; (b) the k-step shortcut sample (jumps start ->
edge_1 -> ... -> edge_{k-1} -> end) against the 50-step teacher sample from the same noise, next to the
naive k-step DDIM sample.
"""

from __future__ import annotations

import math
import time

from shortft.distill.config import STUDENT, model_defaults
from shortft.distill.loss import segment_layout
from shortft.distill.pool import teacher_trajectories

EVAL_SEED = 1_000_000  # eval noises use seeds EVAL_SEED + i: disjoint from the training pool's seeds


def shortcut_jump(backend, adapters: tuple[str, ...] = (STUDENT,), guidance: float = 1.0):
    """The shortcut as ShortFT runs it: one DDIM jump from the adapters' ε̂ (conditional-only by default).
    With adapters=() and the chain's CFG it is the naive one-step DDIM jump of the base model."""
    from shortft.chain import Step, run_plan

    def jump(x, t_from, t_to, cond, uncond):
        return run_plan(backend, [Step(t_from, t_to, tuple(adapters), "none", guidance)], x, cond, uncond)
    return jump


def fidelity(backend, jump, prompts: list[str], seeds: list[int], num_steps: int = 50, segments: int = 4,
             guidance: float = 7.5, batch_size: int = 16) -> dict:
    """Errors of `jump(x, t_from, t_to, cond, uncond) -> x'` against the 50-step CFG teacher, next to the
    base model's naive DDIM jump with the same CFG: (a) one jump per segment, start -> lower edge;
    (b) the k-jump sample from noise. RMSE in latent space; (b) also in pixels (images in [0, 1])."""
    import torch

    from shortft.chain import END
    from shortft.sample import seeded_noise

    ts = backend.timesteps(num_steps)
    layout = segment_layout(ts, segments)
    naive_jump = shortcut_jump(backend, adapters=(), guidance=guidance)
    k_path = [0] + [s["edge"] for s in layout[:-1]]  # grid indices the k-step sampler visits
    sq = {"jump": [[0.0, 0.0] for _ in layout], "k_latent": [0.0, 0.0], "k_pixel": [0.0, 0.0]}  # [shortcut, naive]
    count = {"jump": 0, "latent": 0, "pixel": 0}
    images = {"teacher": [], "shortcut": [], "naive": []}
    per_sample = {"shortcut": [], "naive": []}  # latent RMSE of each k-step sample: shows rare mode flips
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i:i + batch_size], seeds[i:i + batch_size]
        cond, uncond = backend.encode_prompts(p), backend.encode_prompts([""] * len(p))
        noise = seeded_noise(backend.latent_shape(len(p)), s).to(backend.device)
        traj = teacher_trajectories(backend, ts, cond, uncond, noise, guidance)  # (B, S+1, C, h, w)
        for j, seg in enumerate(layout):
            x, ref = traj[:, seg["start"]], traj[:, seg["edge"]]
            for w, f in enumerate((jump, naive_jump)):
                sq["jump"][j][w] += float(((f(x, ts[seg["start"]], ts[seg["edge"]], cond, uncond) - ref) ** 2).sum())
        count["jump"] += traj[:, 0].numel()
        ref_img = backend.decode(traj[:, -1])
        images["teacher"].append(ref_img.cpu())
        for w, (name, f) in enumerate((("shortcut", jump), ("naive", naive_jump))):
            x = noise
            for a, b in zip(k_path, k_path[1:] + [None]):
                x = f(x, ts[a], ts[b] if b is not None else END, cond, uncond)
            img = backend.decode(x)
            images[name].append(img.cpu())
            sq["k_latent"][w] += float(((x - traj[:, -1]) ** 2).sum())
            per_sample[name] += ((x - traj[:, -1]) ** 2).flatten(1).mean(1).sqrt().tolist()
            sq["k_pixel"][w] += float(((img - ref_img) ** 2).sum())
        count["latent"] += traj[:, -1].numel()
        count["pixel"] += ref_img.numel()

    def row(pair, n):
        a, b = math.sqrt(pair[0] / n), math.sqrt(pair[1] / n)
        return {"shortcut_rmse": a, "naive_rmse": b, "ratio": a / b if b > 0 else float("nan")}

    result = {
        "segments": [{"from": ts[seg["start"]], "to": ts[seg["edge"]], **row(sq["jump"][j], count["jump"])}
                     for j, seg in enumerate(layout)],
        "k_step": {"timesteps": [ts[a] for a in k_path], "latent": row(sq["k_latent"], count["latent"]),
                   "pixel": row(sq["k_pixel"], count["pixel"])},
        "num_samples": len(prompts), "num_steps": num_steps, "guidance": guidance,
    }
    result["jump_ratio_max"] = max(r["ratio"] for r in result["segments"])
    med = {k: float(torch.tensor(v).median()) for k, v in per_sample.items()}
    result["k_step"]["latent_per_sample"] = {
        "shortcut_median": med["shortcut"], "naive_median": med["naive"],
        "median_ratio": med["shortcut"] / med["naive"] if med["naive"] > 0 else float("nan"),
        # a sample the shortcut sends elsewhere: further from the teacher than the naive sampler's median
        "shortcut_off": sum(e > med["naive"] for e in per_sample["shortcut"]), "shortcut": per_sample["shortcut"],
        "naive": per_sample["naive"]}
    result["images"] = {k: torch.cat(v) for k, v in images.items()}  # removed before JSON
    return result


def evaluate_shortcut(model: str, shortcut: str, prompts: str = "", count: int = 32, segments: int = 4,
                      num_steps: int = 0, guidance: float = 0.0, device: str = "", json_out: str = "",
                      grid_out: str = "", student_guidance: float = 1.0) -> dict:
    """Load `model` and the shortcut file, run `fidelity` on held-out prompts and fresh noises, print a
    table, and write JSON (and a grid: teacher 50-step / shortcut k-step / naive k-step rows)."""
    import torch

    from shortft import files, lora
    from shortft.backends import load_backend
    from shortft.prompts import load_prompts

    defaults = model_defaults(model)
    guidance, num_steps = guidance or defaults["guidance"], num_steps or defaults["num_steps"]
    backend = load_backend(model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lora.load_lora(backend.net, shortcut, STUDENT, fmt=backend.lora_format)
    names = load_prompts(prompts or defaults["eval_prompts"])
    names = [names[i % len(names)] for i in range(count)]
    t0 = time.time()
    with torch.no_grad():
        res = fidelity(backend, shortcut_jump(backend, guidance=student_guidance), names,
                       [EVAL_SEED + i for i in range(count)], num_steps, segments, guidance)
    images = res.pop("images")
    res.update({"model": model, "shortcut": str(shortcut), "prompts": prompts or defaults["eval_prompts"],
                "seconds": time.time() - t0})
    print(format_table(res))
    if json_out:
        files.write_json(json_out, res)
    if grid_out:
        from shortft.images import save_grid

        n = min(8, count)
        rows = torch.cat([images["teacher"][:n], images["shortcut"][:n], images["naive"][:n]])
        save_grid(rows, grid_out, nrow=n, scale=2 if backend.image_size < 256 else 1)
    return res


def format_table(res: dict) -> str:
    """The fidelity figures as a markdown table."""
    lines = [f"fidelity vs the {res['num_steps']}-step CFG {res['guidance']} teacher, {res['num_samples']} samples",
             "| jump | shortcut RMSE | naive one-step jump RMSE | ratio (target <= 0.3) |", "|---|---|---|---|"]
    for r in res["segments"]:  # times: DDIM integers, or flow times (1000 sigma) to one decimal
        lines.append(f"| {r['from']:g}->{r['to']:g} | {r['shortcut_rmse']:.4f} | {r['naive_rmse']:.4f} | {r['ratio']:.3f} |")
    k = res["k_step"]
    lines += ["", f"| {len(k['timesteps'])}-step sample ({', '.join(f'{t:g}' for t in k['timesteps'])}) | shortcut RMSE | "
              "naive one-step jumps RMSE | ratio (target <= 0.5) |", "|---|---|---|---|"]
    for space in ("latent", "pixel"):
        r = k[space]
        lines.append(f"| {space} | {r['shortcut_rmse']:.4f} | {r['naive_rmse']:.4f} | {r['ratio']:.3f} |")
    m = k["latent_per_sample"]
    lines += ["", f"per-sample latent RMSE, median: shortcut {m['shortcut_median']:.4f}, naive {m['naive_median']:.4f} "
              f"(ratio {m['median_ratio']:.3f}); shortcut samples further off than the naive median: "
              f"{m['shortcut_off']} of {len(m['shortcut'])}"]
    return "\n".join(lines)

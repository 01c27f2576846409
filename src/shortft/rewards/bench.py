"""Cost of one reward forward + backward at its real input size.

    python -m shortft.rewards.bench                      # every built-in reward, batch 1, 512x512 images
    python -m shortft.rewards.bench --rewards hpsv2 pickscore --batch 2 --device cuda

Each reward runs in its own subprocess so that peak RSS (ru_maxrss) is its own. A reward whose weights
are not available (offline, not downloaded) is benchmarked on a random-weight model of the real
architecture and size (ViT-H-14 for HPS v2 and PickScore, ViT-L/14 + MLP for aesthetic): the cost is the
same, the score is meaningless. The table says which. Timings: the median of `--repeats` runs after
one warm-up; memory: peak process RSS and, on CUDA, peak allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REWARD_NAMES = ("hpsv2", "hpsv2.1", "pickscore", "aesthetic", "world_clip", "symmetry", "compressibility")


def _random_clip(vision: dict, text: dict, projection_dim: int, image_cfg: dict, name: str):
    """A random-weight transformers CLIPModel of the given size in a CLIPPreference wrapper."""
    import tempfile
    from pathlib import Path

    from transformers import CLIPConfig, CLIPModel

    from shortft.rewards.clip_pref import CLIPPreference
    from shortft.rewards.common import freeze
    from shortft.rewards.testing import byte_tokenizer

    cfg = CLIPConfig(text_config=dict(text, bos_token_id=512, eos_token_id=513, pad_token_id=513),
                     vision_config=vision, projection_dim=projection_dim)
    tok = byte_tokenizer(Path(tempfile.mkdtemp()), max_length=text.get("max_position_embeddings", 77))
    return CLIPPreference(freeze(CLIPModel(cfg)), tok, image_cfg, "cpu", name)


def random_reward(name: str):
    """The reward's real architecture with random weights (for timing only)."""
    from shortft.rewards.common import OPENAI_MEAN, OPENAI_STD

    openai = {"size": 224, "crop": (224, 224), "mean": OPENAI_MEAN, "std": OPENAI_STD}
    vit_h = dict(image_size=224, patch_size=14, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=16, hidden_act="gelu")
    text_h = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu")
    if name.startswith("hpsv2"):
        import open_clip

        from shortft.rewards.common import freeze
        from shortft.rewards.hps import HPS_ARCH, HPSReward

        return HPSReward(freeze(open_clip.create_model(HPS_ARCH, pretrained=None)), open_clip.get_tokenizer(HPS_ARCH),
                         name=name)
    if name == "pickscore":
        return _random_clip(vit_h, text_h, 1024, openai, name)
    if name == "aesthetic":
        from shortft.rewards.aesthetic import AestheticMLP, AestheticReward
        from shortft.rewards.common import freeze

        vit_l = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16)
        text_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77)
        clip = _random_clip(vit_l, text_l, 768, openai, name)
        return AestheticReward(clip.model, freeze(AestheticMLP()), openai)
    if name == "world_clip":  # the shipped model's architecture and processor, random weights
        from transformers import CLIPConfig

        from shortft.rewards.clip_pref import image_settings
        from shortft.world import WORLD_CLIP

        cfg = CLIPConfig.from_pretrained(WORLD_CLIP)
        return _random_clip(cfg.vision_config.to_dict(), cfg.text_config.to_dict(), cfg.projection_dim,
                            image_settings(str(WORLD_CLIP), name), name)
    raise ValueError(f"no random stand-in for {name!r}")


def bench_one(name: str, batch: int, size: int, repeats: int, device: str) -> dict:
    """Build `name`, then time forward + backward of a (batch, 3, size, size) image batch."""
    import torch

    from shortft.rewards import RewardSettings, RewardWeightsError, build_reward

    t0 = time.perf_counter()
    try:
        reward = build_reward(name, RewardSettings(device=device))
        weights = "real" if any(isinstance(m, torch.nn.Module) for m in vars(reward).values()) else "none needed"
    except RewardWeightsError:
        reward, weights = random_reward(name), "random (real size)"
        for attr in ("model", "clip", "mlp"):
            if isinstance(getattr(reward, attr, None), torch.nn.Module):
                getattr(reward, attr).to(device)
        if hasattr(reward, "device"):
            reward.device = torch.device(device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for m in vars(reward).values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    if name == "world_clip":
        size = 64  # the world's images
    prompts = ["a photograph of an astronaut riding a horse"] * batch
    times = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):
        x = torch.rand(batch, 3, size, size, device=device, requires_grad=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        reward(x, prompts).sum().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # first run is warm-up
            times.append(time.perf_counter() - t)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    out = {"reward": name, "weights": weights, "params_M": params / 1e6, "input": f"{batch}x3x{size}x{size}",
           "build_s": build_s, "fwd_bwd_s": statistics.median(times),
           "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    if device.startswith("cuda"):
        out["peak_cuda_GB"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def format_table(rows: list[dict]) -> str:
    cuda = any("peak_cuda_GB" in r for r in rows)
    head = "| reward | weights | params (M) | input | build (s) | fwd+bwd (s) | peak RSS (GB) |" + (
        " peak CUDA (GB) |" if cuda else "")
    lines = [head, "|" + "---|" * (7 + cuda)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['reward']} | error: {r['error']} |" + " |" * (5 + cuda))
            continue
        line = (f"| {r['reward']} | {r['weights']} | {r['params_M']:.1f} | {r['input']} | {r['build_s']:.1f} | "
                f"{r['fwd_bwd_s']:.3f} | {r['peak_rss_GB']:.2f} |")
        lines.append(line + (f" {r.get('peak_cuda_GB', 0):.2f} |" if cuda else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortft.rewards.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rewards", nargs="+", default=list(REWARD_NAMES), help="rewards to time")
    p.add_argument("--batch", type=int, default=1, help="images per forward")
    p.add_argument("--size", type=int, default=512, help="image side (SD 1.5: 512; world_clip always 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--online", action="store_true", help="allow hub downloads (default: local files/cache only)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one reward, print JSON
    args = p.parse_args(argv)
    if args.one:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print("BENCH " + json.dumps(bench_one(args.one, args.batch, args.size, args.repeats, args.device)))
        return
    env = dict(os.environ)
    if not args.online:
        env["HF_HUB_OFFLINE"] = "1"
    rows = []
    for name in args.rewards:
        cmd = [sys.executable, "-m", "shortft.rewards.bench", "--one", name, "--batch", str(args.batch),
               "--size", str(args.size), "--repeats", str(args.repeats), "--device", args.device,
               "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")]
        rows.append(json.loads(line[-1][6:]) if line else {"reward": name, "error": res.stderr.strip()[-200:]})
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Diagnostic for the overhead table (docs/efficiency.md): the bytes of live tensors at each iteration's peak
(shortft.bench.fake.Counter on real tensors), engine against hand, for one overhead row: is an RSS difference the engine's tensors or the allocator?

    python scripts/overhead-tensor-peak.py runs/eff/medium-q/overhead_side-overhead-alignprop-engine-r0.spec.json
"""
import json
import sys

from shortft import lora
from shortft.bench import set_threads
from shortft.bench.engine import build_context, train_iteration
from shortft.bench.fake import Counter
from shortft.bench.hand import hand_iteration
from shortft.bench.overhead import FP32

spec = json.load(open(sys.argv[1]))
set_threads(1)
out = {}
for side in ("engine", "hand"):
    ctx = build_context({**spec["overrides"], **FP32}, spec["preset"], prepare=side == "engine")
    if side == "hand":
        lora.set_trainable(ctx["backend"].net, ctx["method"].trainable(spec["progress"]))
    step = train_iteration if side == "engine" else hand_iteration
    peaks = []
    for i in range(spec["iters"]):
        with Counter() as count:
            x = step(ctx, i, spec["progress"])
        peaks.append(round(count.peak / 1e6, 2))
    out[side] = peaks
    print(side, "peak MB of live tensors per iteration:", peaks, flush=True)
print("largest engine / hand - 1: %+.2f%%" % (100 * (max(out["engine"]) / max(out["hand"]) - 1)))

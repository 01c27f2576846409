"""The markdown of docs/efficiency.md: one `## ` section per part of `shortft bench efficiency`. A run of
some parts (`--only`) replaces those sections in the existing file and keeps the others."""

from __future__ import annotations

import re
from pathlib import Path

from shortft import files
from shortft.bench import ModelSpec, machine, median, now
from shortft.bench.overhead import summarise_overhead

TITLE = "# Efficiency: one training iteration per method"
TARGETS = "Against the design targets"
ROWS = "Per method"
RATIO = "ShortFT's stage-1 chain vs the full checkpointed chain (same process, interleaved)"
GRADS = "Gradient norm as the chain grows (at initialisation, before clipping)"
OVERHEAD = "Engine against the same iteration written by hand"


def fmt(x: float, nd: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


def sig(x: float) -> str:
    """Three significant digits: gradient norms span orders of magnitude."""
    return "n/a" if x != x else f"{x:.3g}"


def pct(x: float) -> str:
    return "n/a" if x != x else f"{x * 100:+.1f}%"


def setup_text(spec: ModelSpec, args) -> str:
    """Model, chain, batch, reward and config of every part."""
    update = "flow (Euler)" if spec.family == "sd3" else "DDIM"
    return (f"Model: {spec.label}; {args.steps} {update} steps, batch {args.batch}, reward `{args.reward}`, the "
            f"default config otherwise" + (f" with `{spec.config}`" if spec.config else "")
            + " (same for every method).")


def targets_section(rows: dict, ratio: dict) -> list[str]:
    m = ratio["median"]
    overs = [r["engine_s"] / r["raw_s"] - 1 for r in rows.values() if r["raw_s"] > 0]
    return [f"- ShortFT's raw stage-1 chain ({ratio['short_calls']} calls) costs "
            f"**{m['short_raw'] / m['full_raw']:.2f}x** the raw checkpointed full chain ({ratio['full_calls']} calls; target: about 0.25); through the engine "
            f"**{m['short_engine'] / m['full_engine']:.2f}x**.",
            f"- Framework overhead of the chain (engine vs the same UNet calls by hand): "
            f"**{pct(m['short_engine'] / m['short_raw'] - 1)}** on ShortFT's chain and "
            f"**{pct(m['full_engine'] / m['full_raw'] - 1)}** on the full chain in the interleaved comparison "
            "(target: at most 3%, for the whole iteration: 'Engine against the same iteration written by hand' "
            f"below measures that); per method: median {pct(median(overs))}, range {pct(min(overs))} to "
            f"{pct(max(overs))} (fewer repetitions, each row in its own process: noisier)."]


def rows_section(rows: dict, args) -> list[str]:
    gpu = any("cuda_mb" in r["peak"] for r in rows.values())
    lines = [f"Each row ran in its own process: {args.warmup} warm-up iteration(s), then the median of "
             f"{args.iters}. Seconds per iteration include the whole training iteration (plan, chain, VAE "
             "decode, reward, backward, clipping, AdamW).", "",
             "Peak memory is the process's peak RSS during the iterations; 'over load' subtracts the RSS right "
             "before them (what the iterations added)." + (" CUDA: torch.cuda.max_memory_allocated." if gpu else ""),
             "", "The chain columns time the chain alone (UNet calls and DDIM updates, forward + backward of a "
             "scalar of x0, no VAE or reward): `engine` through `run_plan`, `raw` the same calls made by hand "
             "(`shortft.bench.hand.raw_chain`); overhead = engine / raw - 1 (median of interleaved repetitions).", "",
             "| method | UNet calls / it | in graph | s / it | peak RSS MB | over load MB |"
             + (" CUDA peak MB |" if gpu else "") + " grad norm median [min, max] | chain engine s | chain raw s"
             " | overhead |",
             "|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|---|---|---|"]
    for label, r in rows.items():
        g = r["grad_norm"]
        lines.append(
            f"| {label} | {r['unet_calls']} | {r['graph_calls']} | {fmt(r['seconds_median'], 2)} | "
            f"{r['peak']['rss_mb']:.0f} | {r['peak']['rss_mb'] - r['loaded']['rss_mb']:.0f} | "
            + (f"{r['peak'].get('cuda_mb', float('nan')):.0f} | " if gpu else "")
            + f"{sig(g['median'])} [{sig(g['min'])}, {sig(g['max'])}] | {fmt(r['engine_s'], 2)} | "
            f"{fmt(r['raw_s'], 2)} | {pct(r['engine_s'] / r['raw_s'] - 1 if r['raw_s'] > 0 else float('nan'))} |")
    return lines


def ratio_section(ratio: dict, args) -> list[str]:
    m = ratio["median"]
    return [f"ShortFT stage 1: {ratio['short_calls']} UNet calls, {ratio['short_graph']} in the graph; full: "
            f"{ratio['full_calls']} calls, all checkpointed. Median of {args.reps} repetitions, forward + "
            "backward of the chain only.", "",
            "| | ShortFT s | full s | ShortFT / full |", "|---|---|---|---|",
            f"| raw UNet calls | {fmt(m['short_raw'])} | {fmt(m['full_raw'])} | {m['short_raw'] / m['full_raw']:.3f} |",
            f"| chain engine | {fmt(m['short_engine'])} | {fmt(m['full_engine'])} | "
            f"{m['short_engine'] / m['full_engine']:.3f} |",
            f"| engine overhead | {pct(m['short_engine'] / m['short_raw'] - 1)} | "
            f"{pct(m['full_engine'] / m['full_raw'] - 1)} | |"]


def grads_section(grads: dict, lengths: list[int], args) -> list[str]:
    names = {"full": "full backprop", "shortft": "shortft (stage 1)", "draft-lv": "draft-lv"}
    lines = [f"Norm of the gradient of the loss (-mean reward) w.r.t. the trainable LoRA parameters, "
             f"{args.grad_rollouts} rollouts each (same prompts and noise across methods): median [min, max].",
             "", "| chain length | " + " | ".join(names.values()) + " |", "|---|---|---|---|"]
    for n in lengths:
        cells = [f"{sig(median(v))} [{sig(min(v))}, {sig(max(v))}]" if (v := grads.get(f"{name}@{n}")) else "n/a"
                 for name in names]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def overhead_section(overhead: dict, spec: ModelSpec, args, command: str) -> list[str]:
    table = summarise_overhead(overhead)
    extra = [key for key in ("tensor", "cuda") if all(key in r for r in table.values())]  # optional columns
    names = {"tensor": "live-tensor", "cuda": "CUDA"}
    lines = [f"Measured by `{command}` on {now()}. Machine: {machine()}. Torch threads per process: "
             f"{args.threads or 'default'}. {setup_text(spec, args)}", "",
             "One whole training iteration (rollout, chain, VAE decode, reward, backward, clipping, AdamW step) "
             "through the engine (`shortft.bench.engine.train_iteration`, the loop body of `train`) against the "
             "same UNet calls, decode, reward, backward and step written by hand (`shortft.bench.hand`: no "
             "Denoiser, no accelerate, no `run_plan`, no `Method.loss`; adapters switched only where they "
             f"change), both in fp32. Time: {args.rounds} round(s) of one fresh process per row that builds both "
             f"sides and alternates their iterations ({args.iters} each, engine then hand, then hand then "
             "engine, ...), so both see the same machine state; seconds are the median over the iterations "
             "after each side's first (which pays one-off costs), and the overhead is the median ratio of "
             "iterations run back to back, as wall clock and as the process's CPU time (one thread: what it "
             "computed, not the time it waited for a core). Memory: in each round also one fresh process per side "
             f"({args.iters} iterations), what the iterations added, peak RSS minus RSS before the first "
             "(the process's peak-RSS mark reset after setup), median over rounds"
             + ("; live-tensor MB: the peak bytes of the tensors one more iteration made and held at once "
                "(`shortft.bench.fake.Counter`; what `cuda.max_memory_allocated` counts on a GPU, and the same in "
                "every round: RSS adds what the allocator keeps of freed memory, which differs between processes)"
                if "tensor" in extra else "")
             + ("; CUDA: max_memory_allocated minus allocated before" if "cuda" in extra else "") + ". "
             "Overheads are engine / hand - 1. 'loss diff' is the largest relative difference of the "
             "two sides' losses over the same iterations (the hand-written iteration computes the same thing).", "",
             "| method | engine s / it | hand s / it | time overhead | engine CPU s | hand CPU s | CPU overhead | "
             "engine RSS MB | hand RSS MB | RSS overhead |"
             + "".join(f" engine {names[k]} MB | hand {names[k]} MB | {names[k]} overhead |" for k in extra)
             + " loss diff |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|---|---|" * len(extra) + "---|"]
    for label, r in table.items():
        e, h = r["engine"], r["hand"]
        lines.append(f"| {label} | {fmt(e['s'])} | {fmt(h['s'])} | {pct(r['time'])} | {fmt(e['cpu_s'])} | "
                     f"{fmt(h['cpu_s'])} | {pct(r['cpu'])} | {e['rss_mb']:.1f} | {h['rss_mb']:.1f} | {pct(r['rss'])} | "
                     + "".join(f"{e[f'{k}_mb']:.1f} | {h[f'{k}_mb']:.1f} | {pct(r[k])} | " for k in extra)
                     + f"{r['loss_diff']:.1e} |")
    return lines


def sections(spec: ModelSpec, args, results: dict, command: str) -> dict[str, list[str]]:
    """{heading: lines} of the parts in `results`."""
    out = {}
    if "rows" in results and "ratio" in results:
        out[TARGETS] = targets_section(results["rows"], results["ratio"])
    if "rows" in results:
        out[ROWS] = rows_section(results["rows"], args)
    if "ratio" in results:
        out[RATIO] = ratio_section(results["ratio"], args)
    if "grads" in results:
        out[GRADS] = grads_section(results["grads"], results["lengths"], args)
    if "overhead" in results:
        out[OVERHEAD] = overhead_section(results["overhead"], spec, args, command)
    return out


def merge(old: str, new: dict[str, list[str]]) -> str:
    """`old` markdown with each section of `new` (by its `## ` heading) replaced in place, or appended."""
    head, *parts = re.split(r"(?m)^(?=## )", old)
    body = {part.splitlines()[0][3:]: part for part in parts}
    for heading, lines in new.items():
        body[heading] = "\n".join([f"## {heading}", "", *lines, "", ""])
    return head + "".join(body.values())


def write_arch_report(out: Path, results: dict, command: str, divisor: int = 1) -> str:
    """The real-size table of one architecture, as its own section of the report (the others kept)."""
    from shortft.bench.realsize import arch_section

    heading = f"Real-size cost: {results['arch']}" + (f" at 1/{divisor} width (a check, not the real one)"
                                                      if divisor > 1 else "")
    old = out.read_text() if out.is_file() else "\n".join([TITLE, "", ""])
    text = merge(old, {heading: arch_section(results, command, now(), machine())})
    files.write_text(out, text)
    return text


def write_report(out: Path, spec: ModelSpec, args, results: dict, command: str, full: bool) -> str:
    """Write the report: the whole file after a run of every part, else the parts' sections into the existing
    file (its header and other sections kept), each then opening with the command that measured it."""
    header = "\n".join([TITLE, "", f"Written by `{command}` on {now()}.", "",
                        f"Machine: {machine()}. Torch threads per worker: {args.threads or 'default'}.", "",
                        setup_text(spec, args), "", ""])
    parts = sections(spec, args, results, command)
    if not full and out.is_file():  # the header names the run that wrote the file: say which wrote these parts
        old = out.read_text()
        parts = {h: lines if lines[0].startswith("Measured by") else [f"Measured by `{command}` on {now()}.", "", *lines]
                 for h, lines in parts.items()}
    else:
        old = header
    text = merge(old, parts)
    files.write_text(out, text)
    return text

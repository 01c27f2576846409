"""The memory and FLOP count on fake tensors (shortft.bench.fake): the counter adds up what ops allocate and
frees what dies; the fake iteration counts exactly what the same iteration on real tensors does."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from shortft.bench import efficiency
from shortft.bench.fake import Counter, estimate
from shortft.testing import make_tiny_lora, make_tiny_model


def test_the_counter_counts_new_storages_once_drops_freed_ones_and_adds_up_flops():
    with Counter() as count:
        x = torch.zeros(1000)  # 4,000 bytes
        y = x * 2  # 8,000 alive
        v = y.view(10, 100)  # a view: nothing new
        y.add_(1)  # in place: nothing new
        del x  # 4,000 alive
        z = torch.ones(500)  # 6,000 alive
        count.reset()
        w = z + 1  # 8,000 alive, a new peak since the reset
        del w
        m = torch.ones(3, 4) @ torch.ones(4, 5)  # 2 * 3 * 4 * 5 FLOPs
    assert (count.peak, count.live - m.nbytes) == (8000, 6000)
    assert count.flops == 120 and v.shape == (10, 100)


def test_attention_flops_are_counted_on_the_cpu_flash_kernel():
    """Fake tensors on a CPU dispatch attention to the CPU flash kernel, which torch's FLOP formulas do not
    know; its formulas are registered: forward 4·B·H·N²·d, backward 2.5× that."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.randn(2, 3, 64, 16, requires_grad=True)
        with Counter() as count:
            F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert count.flops == 3.5 * 4 * 2 * 3 * 64 * 64 * 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake") / "model"
    make_tiny_model(d)
    make_tiny_lora(d, d / "shortcut.safetensors")
    return d


@pytest.mark.parametrize("method", ["shortft", "full"])
def test_the_fake_iteration_counts_what_the_real_one_allocates(tiny, method):
    """Same bytes at the peak (to 1%: fake and real ops differ in a few tiny temporaries), same FLOPs, same
    weights, on ShortFT's stage 1 and on checkpointed full backprop; full backprop does more work."""
    over = dict(model=str(tiny), shortcut=str(tiny / "shortcut.safetensors"), reward="symmetry", method=method,
                batch_size=2, num_steps=8, s1_grad_steps=1)
    real = estimate("world", over, 0.0, "fp32", fake=False)
    fake = estimate("world", over, 0.0, "fp32", fake=True)
    assert fake["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.01)
    assert fake["tflop"] == real["tflop"] > 0
    assert fake["weights_bytes"] == real["weights_bytes"]
    assert real["peak_bytes"] > real["steady_bytes"] > real["weights_bytes"]  # activations, then AdamW state
    assert (fake["unet_calls"], fake["graph_calls"]) == ((8, 7) if method == "shortft" else (8, 8))


def test_half_precision_weights_halve_the_frozen_weights(tiny):
    over = dict(model=str(tiny), shortcut=str(tiny / "shortcut.safetensors"), reward="symmetry", method="draft",
                batch_size=1, num_steps=4)
    fp32, fp16 = estimate("world", over, 0.0, "fp32"), estimate("world", over, 0.0, "fp16")
    lora_bytes = 4 * fp16["trainable"]  # the LoRAs stay fp32
    assert fp16["weights_bytes"] - lora_bytes == pytest.approx((fp32["weights_bytes"] - lora_bytes) / 2, rel=0.01)
    assert fp16["peak_bytes"] < fp32["peak_bytes"]


def test_the_estimate_counts_calls_as_training_does(tiny):
    """DRaFT-LV's extra noise-and-denoise calls are in its loss's report, not its plan: both counted."""
    over = dict(model=str(tiny), shortcut=str(tiny / "shortcut.safetensors"), reward="symmetry", method="draft-lv",
                batch_size=1, num_steps=4, lv_copies=2)
    got = estimate("world", over, 0.0, "fp32")
    assert (got["unet_calls"], got["graph_calls"]) == (4 + 2, 1 + 2) and isinstance(got["unet_calls"], int)


def test_the_real_size_table_measures_each_resolution_and_estimates_the_native_one_in_half_precision(tmp_path):
    """`shortft bench efficiency --arch sd15` at 1/20 width, with the workers recorded instead of run: each row
    measured at each --resolutions on this machine, and estimated at SD 1.5's 512 px in fp16 (SD 3.5's in bf16);
    --no-estimate leaves the estimate out (the GPU script measures the native resolution itself)."""
    from shortft.bench.realsize import run_arch

    calls = []

    def runner(worker, spec, workdir, reuse=False):
        calls.append((worker, spec["overrides"]["resolution"], spec.get("half"), spec["overrides"]["method"], reuse))
        return {"worker": worker}

    rows = [r for r in efficiency.ROWS if r[0] in ("shortft (stage 1)", "full (checkpointed)")]
    args = argparse.Namespace(arch="sd15", arch_divisor=20, resolutions="64,96", reward="symmetry", warmup=0, iters=1,
                              threads=1, estimate=True, measure_rows="")
    res = run_arch(args, rows, tmp_path, runner=runner)
    assert calls == [("efficiency_method", 64, None, "shortft", True), ("efficiency_method", 64, None, "full", True),
                     ("efficiency_method", 96, None, "shortft", True), ("efficiency_method", 96, None, "full", True),
                     ("efficiency_estimate", 512, "fp16", "shortft", True), ("efficiency_estimate", 512, "fp16", "full", True)]
    assert set(res["rows"]["full (checkpointed)"]) == {"64", "96"} and set(res["estimates"]) == {r[0] for r in rows}
    nockpt = [r for r in efficiency.ARCH_ROWS if r[0] == "full (no checkpointing)"]  # DRaFT-K, K = every step
    specs = []
    for arch in ("sd15", "sd35m"):
        run_arch(argparse.Namespace(**{**vars(args), "arch": arch, "resolutions": ""}), nockpt, tmp_path,
                 runner=lambda worker, spec, workdir, reuse=False: specs.append(spec) or {})
    assert [s["overrides"]["draft_k"] for s in specs] == [50, 40]
    calls.clear()
    run_arch(argparse.Namespace(**{**vars(args), "arch": "sd35m", "resolutions": ""}), rows, tmp_path, runner=runner)
    assert calls == [("efficiency_estimate", 1024, "bf16", "shortft", True), ("efficiency_estimate", 1024, "bf16", "full", True)]
    calls.clear()
    run_arch(argparse.Namespace(**{**vars(args), "estimate": False}), rows, tmp_path, runner=runner)
    assert [c[0] for c in calls] == ["efficiency_method"] * 4
    calls.clear()  # --measure-rows: only those measured, every row estimated
    run_arch(argparse.Namespace(**{**vars(args), "measure_rows": "full (checkpointed)"}), rows, tmp_path, runner=runner)
    assert [c[:2] + c[3:4] for c in calls] == [("efficiency_method", 64, "full"), ("efficiency_method", 96, "full"),
                                              ("efficiency_estimate", 512, "shortft"), ("efficiency_estimate", 512, "full")]


def test_a_row_that_runs_out_of_memory_is_reported_and_the_others_still_run(tmp_path):
    """On a GPU, ShortFT's stage 1 on SDXL at 1024 px does not fit in 80 GB: that row reads "out of memory" and
    the rows after it are measured (a GPU session is too short to lose them)."""
    from shortft.bench.realsize import arch_section, run_arch

    def runner(worker, spec, workdir, reuse=False):
        if spec["overrides"]["method"] == "shortft":
            raise RuntimeError("bench worker efficiency_method failed with status 1; torch.OutOfMemoryError: "
                               "CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"seconds_median": 3.0, "unet_calls": 50, "graph_calls": 50,
                "peak": {"rss_mb": 900.0}, "loaded": {"rss_mb": 100.0}}

    rows = [r for r in efficiency.ROWS if r[0] in ("shortft (stage 1)", "full (checkpointed)")]
    args = argparse.Namespace(arch="sd15", arch_divisor=20, resolutions="64", reward="symmetry", warmup=0, iters=1,
                              threads=1, estimate=False, measure_rows="")
    res = run_arch(args, rows, tmp_path, runner=runner)
    assert res["rows"] == {"shortft (stage 1)": {"64": {"failed": "out of memory"}},
                           "full (checkpointed)": {"64": runner("", {"overrides": {"method": "full"}}, None)}}
    table = "\n".join(arch_section(res, "cmd", "today", "here"))
    assert "| shortft (stage 1) | n/a | n/a | out of memory | out of memory | n/a |" in table
    assert "| full (checkpointed) | 50 | 50 | 3.0 | 800 | n/a |" in table


def test_lora_inputs_kept_in_half_precision_save_memory_under_autocast(tiny, monkeypatch):
    """peft's cast of each LoRA input to fp32 (undone by autocast) keeps two more copies of every wrapped layer's
    input for backward; `build_model` turns it off under mixed precision (lora.keep_input_dtype)."""
    from shortft import lora

    over = dict(model=str(tiny), shortcut=str(tiny / "shortcut.safetensors"), reward="symmetry", method="shortft",
                batch_size=2, num_steps=8, s1_grad_steps=1)
    kept = estimate("world", over, 0.0, "fp16")
    monkeypatch.setattr(lora, "keep_input_dtype", lambda net: None)
    cast = estimate("world", over, 0.0, "fp16")
    assert cast["peak_bytes"] > 1.1 * kept["peak_bytes"] and cast["tflop"] == kept["tflop"]

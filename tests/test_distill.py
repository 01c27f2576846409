"""`shortft distill`: the TSCD loss trains only the shortcut LoRA and falls; the file loads through our
loader and stock diffusers alike; the fidelity metric measures against the right teacher trajectory."""

from __future__ import annotations

import json
import random

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from shortft import lora
from shortft.backends import SDBackend
from shortft.chain import END, Step, run_plan
from shortft.cli import main
from shortft.distill import (
    EMA,
    STUDENT,
    TSCD,
    DistillConfig,
    build_pool,
    distill,
    ema_update,
    fidelity,
    learning_rate,
    segment_layout,
)

SMALL = dict(num_steps=10, segments=2, pool=4, batch_size=2, rank=4, guidance=5.0)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads can be 10-100x slower (spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_segment_layout_matches_shortft_jumps(backend):
    ts = backend.timesteps(50)  # the tiny model's scheduler is SD 1.5's
    layout = segment_layout(ts, 4)
    assert [ts[s["start"]] for s in layout] == [981, 741, 481, 241]  # where ShortFT starts its jumps
    assert [ts[s["edge"]] for s in layout] == [761, 501, 261, 1]  # lower edges T*j/k on the grid
    assert [ts[i] for i in layout[1]["train"]] == list(range(761, 501, -20))  # (501, 761]
    assert layout[0]["train"][0] == 0 and layout[-1]["train"][-1] == 48
    # anchors: where jumps start (ShortFT at the segment start, k-step sampling at the previous edge)
    assert [[ts[i] for i in s["anchors"]] for s in layout] == [[981], [761, 741], [501, 481], [261, 241]]
    with pytest.raises(ValueError, match="segments"):
        segment_layout(ts[:4], 4)


def test_learning_rate_warms_up_then_decays_by_steps_or_time():
    flat = DistillConfig(lr=1.0, warmup=10, steps=100)
    assert learning_rate(flat, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(flat, 99, 1e9) == 1.0  # constant: time and steps do not matter
    cos = DistillConfig(lr=1.0, warmup=10, steps=100, decay="cosine")
    assert learning_rate(cos, 50, 0.0) == pytest.approx(0.5)  # half-way through the steps
    assert learning_rate(cos, 100, 0.0) == pytest.approx(0.0, abs=1e-12)
    timed = DistillConfig(lr=1.0, warmup=10, steps=1000, decay="cosine", time_budget=60.0)
    assert learning_rate(timed, 20, 30.0) == pytest.approx(0.5)  # the time budget ends first
    assert learning_rate(timed, 500, 1.0) == pytest.approx(0.5)  # the step count ends first
    with pytest.raises(ValueError, match="decay 'linear' not in"):
        distill(DistillConfig(out="x.safetensors", decay="linear"))


def _tscd(tiny, **kw):
    backend = SDBackend.load(tiny["model"])
    cfg = DistillConfig(model=tiny["model"], **{**SMALL, **kw})
    ts = backend.timesteps(cfg.num_steps)
    prompts = open(tiny["prompts"]).read().split("\n")[:3]
    contexts, uncond = backend.encode_prompts(prompts), backend.encode_prompts([""])
    torch.manual_seed(0)
    lora.add_lora(backend.unet, STUDENT, cfg.rank)
    lora.add_lora(backend.unet, EMA, cfg.rank)
    pool, which = build_pool(backend, ts, contexts, uncond, cfg, cfg.guidance)
    return backend, TSCD(backend, ts, segment_layout(ts, cfg.segments), contexts, uncond, pool, which, cfg,
                         cfg.guidance)


@pytest.mark.parametrize("teacher_steps", [4, 0])  # EMA bridge / teacher straight to the edge
def test_loss_falls_and_only_the_shortcut_trains(tiny, teacher_steps):
    backend, tscd = _tscd(tiny, teacher_steps=teacher_steps)
    unet = backend.unet
    params = lora.set_trainable(unet, [STUDENT])
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if ".lora_" not in n}
    student0 = [p.detach().clone() for p in params]
    ema0 = [p.detach().clone() for p in lora.adapter_parameters(unet, EMA)]
    groups = tscd.draw(random.Random(0), torch.Generator().manual_seed(0))  # one fixed batch
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(8):
        loss, per_segment = tscd.loss(groups)
        assert len(per_segment) == 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(unet, 0.5)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all((p - p0).abs().max() > 0 for p, p0 in zip(params, student0))  # every trainable one changed
    assert any((p - p0).abs().max() > 0 for p, p0 in zip(lora.adapter_parameters(unet, EMA), ema0))
    assert all(not p.requires_grad for p in lora.adapter_parameters(unet, EMA))
    for n, p in unet.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base[n]), n  # base UNet untouched


def test_anchor_fraction_draws_jump_starts(tiny):
    """anchor_fraction=1: every row starts at an anchor (where a jump is taken); 0: any grid point of
    the segment."""
    _, anchored = _tscd(tiny, anchor_fraction=1.0)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    starts = {(j, g["n"]) for _ in range(30) for j, g in enumerate(anchored.draw(rng, gen))}
    assert starts == {(j, n) for j, s in enumerate(anchored.layout) for n in s["anchors"]}
    _, plain = _tscd(tiny)
    rng = random.Random(0)
    starts = {(j, g["n"]) for _ in range(30) for j, g in enumerate(plain.draw(rng, gen))}
    assert starts == {(j, n) for j, s in enumerate(plain.layout) for n in s["train"]}
    with pytest.raises(ValueError, match="anchor_fraction=1.5"):
        distill(DistillConfig(out="x.safetensors", anchor_fraction=1.5))


def test_live_teacher_lands_on_the_stored_trajectory(tiny):
    """With m up to the edge the target is the CFG teacher's own trajectory point (no bridge), and the live
    teacher (re-noised rows) computes exactly what the pool caches for on-trajectory rows."""
    _, tscd = _tscd(tiny, noised_fraction=0.0)
    g = tscd.draw(random.Random(1), torch.Generator().manual_seed(1))[1]
    g["m"] = g["edge"] - g["n"]
    x = tscd.x_t(g)  # on-trajectory states
    cond = tscd.contexts[tscd.pool_prompts[g["rows"]]]
    live = {**g, "noised": torch.ones_like(g["noised"])}  # force the live teacher from the same states
    torch.testing.assert_close(tscd.target(x, live, cond), tscd.pool[g["rows"], g["edge"]], atol=1e-5, rtol=1e-5)


def _stock(b: SDBackend) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                   scheduler=DDIMScheduler.from_config(b.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("targets", ["attn_ff", "all"])
def test_cli_writes_a_shortcut_that_loads_both_ways_and_resumes(tiny, tmp_path, capsys, targets):
    out, work = tmp_path / "sc.safetensors", tmp_path / "work"
    args = ["distill", "--model", tiny["model"], "--prompts", tiny["prompts"], "--out", str(out),
            "--work-dir", str(work), "--steps", "2", "--checkpoint-every", "1", "--lr", "5e-2", "--targets", targets,
            *[a for k, v in SMALL.items() for a in (f"--{k.replace('_', '-')}", str(v))]]
    assert main(args) == 0
    assert out.is_file() and (work / "checkpoint.pt").is_file()
    log = json.loads((work / "distill.json").read_text())
    assert log["steps_done"] == 2 and log["edges"] == [501, 1]
    # an interrupted run resumes: the same command with more steps continues at step 2
    assert main([*args[:args.index("--steps") + 1], "3", *args[args.index("--steps") + 2:]]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [h["step"] for h in json.loads((work / "distill.json").read_text())["history"]] == [1, 2, 3]
    assert main([*args, "--rank", "2"]) == 2  # a different config does not silently resume
    half = tmp_path / "sc16.safetensors"  # resuming a finished run only rewrites the file, here in fp16
    assert main([*args[:args.index("--out") + 1], str(half), *args[args.index("--out") + 2:], "--steps", "3",
                 "--save-dtype", "fp16"]) == 0
    full16, full32 = load_file(half), load_file(out)
    assert full16.keys() == full32.keys() and {v.dtype for v in full16.values()} == {torch.float16}
    for k in full32:
        torch.testing.assert_close(full16[k].float(), full32[k], atol=1e-3, rtol=1e-3)

    ours = SDBackend.load(tiny["model"])
    lora.load_lora(ours.unet, out, STUDENT)
    lora.activate(ours.unet, [STUDENT])
    pipe = _stock(SDBackend.load(tiny["model"]))
    pipe.load_lora_weights(str(out), adapter_name=STUDENT)
    x, ctx = torch.randn(2, 4, 8, 8), ours.encode_prompts(["a red circle", "a blue square"])
    t = torch.tensor(741)
    with torch.no_grad():
        a = ours.unet(x, t, encoder_hidden_states=ctx).sample
        b = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        lora.activate(ours.unet, [])
        base = ours.unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (a - base).abs().max() > 1e-4  # the trained LoRA does something


def test_fidelity_of_the_teachers_exact_solver_is_zero(backend):
    """A 'student' that is the teacher's own 50-step solver lands exactly on the teacher trajectory."""
    g, ts = 5.0, backend.timesteps(20)

    def exact(x, t_from, t_to, cond, uncond):
        i, j = ts.index(t_from), len(ts) if t_to == END else ts.index(t_to)
        steps = [Step(ts[n], ts[n + 1] if n + 1 < len(ts) else END, (), "none", g) for n in range(i, j)]
        return run_plan(backend, steps, x, cond, uncond)

    with torch.no_grad():
        res = fidelity(backend, exact, ["a red circle", "a blue square", "a green triangle"], [1, 2, 3],
                       num_steps=20, segments=4, guidance=g, batch_size=3)
    assert [(r["from"], r["to"]) for r in res["segments"]] == [(951, 751), (701, 501), (451, 251), (201, 1)]
    for r in res["segments"]:
        assert r["shortcut_rmse"] < 1e-5 and r["naive_rmse"] > 1e-3
    assert res["k_step"]["latent"]["shortcut_rmse"] < 1e-5 and res["k_step"]["latent"]["naive_rmse"] > 1e-3
    m = res["k_step"]["latent_per_sample"]
    assert len(m["shortcut"]) == 3 and max(m["shortcut"]) < 1e-5 and m["shortcut_off"] == 0
    assert m["naive_median"] == sorted(m["naive"])[1] > 1e-3
    # the per-sample RMSEs make up the pooled one (equal-sized samples)
    pooled = (sum(e ** 2 for e in m["naive"]) / 3) ** 0.5
    assert abs(pooled - res["k_step"]["latent"]["naive_rmse"]) < 1e-4 * pooled
    assert res["k_step"]["timesteps"] == [951, 751, 501, 251]
    assert res["images"]["teacher"].shape == (3, 3, 16, 16)


def test_eval_cli_writes_json(tiny, tmp_path):
    out = tmp_path / "fid.json"
    assert main(["distill", "--eval", "--model", tiny["model"], "--shortcut", tiny["shortcut"], "--prompts",
                 tiny["prompts"], "--count", "2", "--num-steps", "10", "--segments", "2", "--json", str(out),
                 "--grid", str(tmp_path / "grid.png")]) == 0
    res = json.loads(out.read_text())
    assert len(res["segments"]) == 2 and {"ratio", "shortcut_rmse", "naive_rmse"} <= set(res["segments"][0])
    assert (tmp_path / "grid.png").is_file()

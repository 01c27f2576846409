"""`shortft distill`: the segmented loss trains only the shortcut LoRA and falls; the file loads through our
loader and stock diffusers alike; runs resume exactly, refuse a changed config and never unpickle a
file from the work dir; the fidelity metric measures against the right teacher trajectory."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from shortft import lora
from shortft.backends import SDBackend
from shortft.chain import END, Step, run_plan
from shortft.cli import main
from shortft.config import build
from shortft.distill import (
    DISTILL_PRESETS,
    STUDENT,
    DistillConfig,
    distill,
    evaluate_shortcut,
    fidelity,
    segment_layout,
)
from shortft.distill.config import model_defaults
from shortft.distill.loop import learning_rate
from shortft.distill.loss import SegmentLoss
from shortft.distill.pool import build_pool

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
    with pytest.raises(ValueError, match="decay='linear' is not one of none, cosine"):
        distill(DistillConfig(out="x.safetensors", decay="linear"))


def test_world_preset_is_the_shipped_recipe():
    """The recipe that made src/shortft/world/assets/shortcut.safetensors, field by field; the asset factory
    builds it by name and shrinks it for its tiny run."""
    cfg = build(DistillConfig, DISTILL_PRESETS, "world")
    assert (cfg.model, cfg.prompts, cfg.guidance, cfg.student_guidance) == ("world", "world-train", 5.0, 5.0)
    assert (cfg.steps, cfg.time_budget, cfg.pool, cfg.decay) == (10000, 3000.0, 1024, "cosine")
    assert (cfg.noised_fraction, cfg.anchor_fraction, cfg.save_dtype) == (0.0, 0.5, "fp16")
    assert (cfg.segments, cfg.num_steps, cfg.rank, cfg.targets, cfg.batch_size, cfg.lr, cfg.warmup, cfg.seed) == (
        4, 0, 8, "attn_ff", 8, 1e-3, 50, 0)
    assert model_defaults("world")["num_steps"] == 50  # num_steps 0: the grid of the model's ShortFT chain
    tiny = build(DistillConfig, DISTILL_PRESETS, "world", overrides=dict(
        num_steps=10, segments=2, batch_size=2, rank=4, pool=4, steps=3, time_budget=0))
    assert (tiny.decay, tiny.anchor_fraction, tiny.steps, tiny.time_budget) == ("cosine", 0.5, 3, 0.0)


def _loss(tiny, **kw) -> tuple[SDBackend, SegmentLoss]:
    backend = SDBackend.load(tiny["model"])
    cfg = DistillConfig(model=tiny["model"], **{**SMALL, **kw})
    ts = backend.timesteps(cfg.num_steps)
    prompts = open(tiny["prompts"]).read().split("\n")[:3]
    contexts, uncond = backend.encode_prompts(prompts), backend.encode_prompts([""])
    torch.manual_seed(0)
    lora.add_lora(backend.net, STUDENT, cfg.rank)
    pool, which = build_pool(backend, ts, contexts, uncond, cfg, cfg.guidance)
    return backend, SegmentLoss(backend, ts, segment_layout(ts, cfg.segments), contexts, uncond, pool, which, cfg,
                                cfg.guidance)


@pytest.mark.parametrize("noised_fraction", [0.0, 1.0])  # targets read from the pool / the live teacher
def test_loss_falls_and_only_the_shortcut_trains(tiny, noised_fraction):
    backend, objective = _loss(tiny, noised_fraction=noised_fraction)
    unet = backend.net
    params = lora.set_trainable(unet, [STUDENT])
    assert len(params) == len(lora.adapter_parameters(unet, STUDENT)) > 0
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if ".lora_" not in n}
    student0 = [p.detach().clone() for p in params]
    groups = objective.draw(random.Random(0), torch.Generator().manual_seed(0))  # one fixed batch
    assert all(bool(g["noised"].all()) == (noised_fraction == 1.0) for g in groups)
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    losses = []
    for _ in range(8):
        loss, per_segment = objective.loss(groups)
        assert len(per_segment) == 2
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all((p - p0).abs().max() > 0 for p, p0 in zip(params, student0))  # every trainable one changed
    for n, p in unet.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base[n]), n  # base UNet bit-identical


def test_anchor_fraction_draws_jump_starts(tiny):
    """anchor_fraction=1: every row starts at an anchor (where a jump is taken); 0: any grid point of
    the segment."""
    _, anchored = _loss(tiny, anchor_fraction=1.0)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    starts = {(j, g["n"]) for _ in range(30) for j, g in enumerate(anchored.draw(rng, gen))}
    assert starts == {(j, n) for j, s in enumerate(anchored.layout) for n in s["anchors"]}
    _, plain = _loss(tiny)
    rng = random.Random(0)
    starts = {(j, g["n"]) for _ in range(30) for j, g in enumerate(plain.draw(rng, gen))}
    assert starts == {(j, n) for j, s in enumerate(plain.layout) for n in s["train"]}
    with pytest.raises(ValueError, match=r"anchor_fraction=1.5 is out of range; valid: 0 <= anchor_fraction <= 1"):
        distill(DistillConfig(out="x.safetensors", anchor_fraction=1.5))


def test_world_recipe_random_stream_is_unchanged(backend):
    """The draws of the shipped recipe's settings (50 steps, k = 4, anchor_fraction 0.5, no re-noising,
    a 1,024-trajectory pool), pinned to what the code that made the shipped file drew (with the bridge
    off it took no draw for the teacher's step count): the same seed gives the same shortcut."""
    cfg = DistillConfig(batch_size=2, anchor_fraction=0.5, noised_fraction=0.0)
    ts = backend.timesteps(50)
    ctx = backend.encode_prompts(["a red circle"])
    objective = SegmentLoss(backend, ts, segment_layout(ts, 4), ctx, backend.encode_prompts([""]),
                            torch.zeros(1024, 51, 4, 8, 8), torch.zeros(1024, dtype=torch.long), cfg, 5.0)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    groups = [objective.draw(rng, gen) for _ in range(3)]
    assert [[(g["n"], g["rows"].tolist()) for g in gs] for gs in groups] == [
        [(6, [684, 559]), (12, [636, 163]), (25, [225, 652]), (41, [752, 194])],
        [(3, [416, 270]), (15, [834, 521]), (24, [840, 698]), (40, [175, 172])],
        [(8, [662, 671]), (23, [287, 506]), (26, [30, 425]), (36, [52, 576])]]
    assert [round(float(g["noise"].sum()), 4) for g in groups[-1]] == [-24.4167, -33.8111, -29.9901, -14.1918]
    assert not any(bool(g["noised"].any()) for gs in groups for g in gs)


def test_live_teacher_lands_on_the_stored_trajectory(tiny):
    """The target is the CFG teacher's own trajectory point at the segment edge: the live teacher
    (re-noised rows) computes from an on-trajectory state exactly what the pool stores there."""
    _, objective = _loss(tiny, noised_fraction=0.0)
    for g in objective.draw(random.Random(1), torch.Generator().manual_seed(1)):
        x = objective.x_t(g)  # on-trajectory states
        cond = objective._cond(g["rows"])
        stored = objective.pool[g["rows"], g["edge"]]
        assert torch.equal(objective.target(x, g, cond), stored)  # read from the pool
        live = {**g, "noised": torch.ones_like(g["noised"])}  # force the live teacher from the same states
        assert g["edge"] - g["n"] >= 1
        torch.testing.assert_close(objective.target(x, live, cond), stored, atol=1e-5, rtol=1e-5)


def _stock(b: SDBackend) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.net,
                                   scheduler=DDIMScheduler.from_config(b.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _error(capsys) -> str:
    """The CLI's error: the last line on stderr, one line starting `shortft: error: `, no traceback."""
    err = capsys.readouterr().err
    line = err.rstrip("\n").splitlines()[-1]
    assert line.startswith("shortft: error: ") and "Traceback" not in err, err
    return line


def _args(tiny, out: Path, work: Path, *extra: str) -> list[str]:
    return ["distill", "--model", tiny["model"], "--prompts", tiny["prompts"], "--out", str(out), "--work-dir",
            str(work), "--checkpoint-every", "1", "--lr", "5e-2", "--noised-fraction", "0.5",
            *[a for k, v in SMALL.items() for a in (f"--{k.replace('_', '-')}", str(v))], *extra]


@pytest.mark.parametrize("targets", ["attn_ff", "all"])
def test_cli_writes_a_shortcut_that_loads_both_ways_and_resumes(tiny, tmp_path, capsys, targets):
    out, work = tmp_path / "sc.safetensors", tmp_path / "work"
    assert main(_args(tiny, out, work, "--steps", "2", "--targets", targets)) == 0
    assert (work / "checkpoint" / "manifest.json").is_file() and not list(work.glob("*.pt"))
    log = json.loads((work / "distill.json").read_text())
    assert log["steps_done"] == 2 and log["edges"] == [501, 1] and log["config"]["targets"] == targets
    # an interrupted run resumes: the same command with more steps continues at step 2 ...
    assert main(_args(tiny, out, work, "--steps", "3", "--targets", targets)) == 0
    assert "resuming" in capsys.readouterr().out
    assert [h["step"] for h in json.loads((work / "distill.json").read_text())["history"]] == [1, 2, 3]
    # ... exactly where it stopped: the file equals that of an uninterrupted 3-step run
    straight = tmp_path / "straight.safetensors"
    assert main(_args(tiny, straight, tmp_path / "w2", "--steps", "3", "--targets", targets)) == 0
    assert all(torch.equal(a, b) for a, b in zip(load_file(out).values(), load_file(straight).values()))
    # a different config does not silently resume: exit 2, one line naming the change
    capsys.readouterr()
    assert main(_args(tiny, out, work, "--steps", "3", "--targets", targets, "--rank", "2")) == 2
    err = _error(capsys)
    assert "'rank': (4, 2)" in err and "--fresh" in err
    half = tmp_path / "sc16.safetensors"  # resuming a finished run only rewrites the file, here in fp16
    assert main(_args(tiny, half, work, "--steps", "3", "--targets", targets, "--save-dtype", "fp16")) == 0
    full16, full32 = load_file(half), load_file(out)
    assert full16.keys() == full32.keys() and {v.dtype for v in full16.values()} == {torch.float16}
    for k in full32:
        torch.testing.assert_close(full16[k].float(), full32[k], atol=1e-3, rtol=1e-3)

    ours = SDBackend.load(tiny["model"])
    lora.load_lora(ours.net, out, STUDENT)
    lora.activate(ours.net, [STUDENT])
    pipe = _stock(SDBackend.load(tiny["model"]))
    pipe.load_lora_weights(str(out), adapter_name=STUDENT)
    x, ctx = torch.randn(2, 4, 8, 8), ours.encode_prompts(["a red circle", "a blue square"])["hidden"]
    t = torch.tensor(741)
    with torch.no_grad():
        a = ours.net(x, t, encoder_hidden_states=ctx).sample
        b = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        lora.activate(ours.net, [])
        base = ours.net(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (a - base).abs().max() > 1e-4  # the trained LoRA does something


@pytest.mark.parametrize("argv, message", [
    (["--decay", "linear"], "decay='linear' is not one of none, cosine"),
    (["--noised-fraction", "2"], "noised_fraction=2.0 is out of range; valid: 0 <= noised_fraction <= 1"),
    (["--pool", "0"], "pool=0 is out of range; valid: pool >= 1"),
    (["--lr", "nan"], "needs a finite number"),
    (["--preset", "world", "ema=0.9"], "unknown config key 'ema'"),
    (["--count", "3"], "--count: only with --eval"),
    (["--eval", "--count", "2"], "--eval needs --shortcut FILE"),
    (["--config", "no-such.yaml"], "config file 'no-such.yaml' does not exist"),
    (["--prompts", "no-such.txt"], "no-such.txt"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, argv, message):
    assert main(["distill", "--model", tiny["model"], "--out", str(tmp_path / "x.safetensors"), *argv]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "x.safetensors").exists()


class _Payload:
    """A pickle that creates `marker` when it is unpickled: what loading an untrusted work dir must never do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _evil(marker: Path) -> bytes:
    data = pickle.dumps(_Payload(marker))
    pickle.loads(data).close()  # the payload is live: plain unpickling runs it ...
    assert marker.is_file()
    marker.unlink()  # ... and the code under test must not
    return data


def _rewrite_manifest(folder: Path) -> None:
    """Make the manifest match the files again, as someone who planted a file could."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest:
        data = (folder / name).read_bytes()
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_work_dir_pickles_are_refused_without_running(tiny, tmp_path, capsys):
    out, work, marker = tmp_path / "sc.safetensors", tmp_path / "work", tmp_path / "PWNED"
    assert main(_args(tiny, out, work, "--steps", "1")) == 0
    # files of the old pickle format (checkpoint.pt, pool.pt) are never read
    for name in ("checkpoint.pt", "pool.pt"):
        (work / name).write_bytes(_evil(marker))
    assert main(_args(tiny, out, work, "--steps", "2")) == 0 and not marker.exists()
    # a pickle planted as the checkpoint's optimizer state: refused (its manifest matching or not)
    (work / "checkpoint" / "optimizer.pt").write_bytes(_evil(marker))
    for fix_manifest, message in ((False, "does not match its manifest"), (True, "optimizer.pt holds objects")):
        if fix_manifest:
            _rewrite_manifest(work / "checkpoint")
        capsys.readouterr()
        assert main(_args(tiny, out, work, "--steps", "3")) == 2
        assert message in _error(capsys) and not marker.exists()
    # a pickle planted as the pool: refused by name
    (work / "pool.safetensors").write_bytes(_evil(marker))
    assert main(_args(tiny, out, work, "--steps", "3", "--fresh")) == 2
    assert "pool.safetensors is not a teacher pool" in _error(capsys) and not marker.exists()


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
    """The JSON holds the figures `evaluate_shortcut` computes (same prompts, seeds, guidance), and the
    grid has the teacher / shortcut / naive rows."""
    from PIL import Image

    out = tmp_path / "fid.json"
    assert main(["distill", "--eval", "--model", tiny["model"], "--shortcut", tiny["shortcut"], "--prompts",
                 tiny["prompts"], "--count", "2", "--num-steps", "10", "--segments", "2", "--guidance", "5",
                 "--json", str(out), "--grid", str(tmp_path / "grid.png")]) == 0
    res = json.loads(out.read_text())
    direct = evaluate_shortcut(tiny["model"], tiny["shortcut"], tiny["prompts"], count=2, segments=2, num_steps=10,
                               guidance=5.0)
    for key in ("segments", "k_step", "jump_ratio_max", "num_samples", "guidance"):
        assert res[key] == direct[key], key
    assert [(r["from"], r["to"]) for r in res["segments"]] == [(901, 501), (401, 1)] and res["num_samples"] == 2
    for r in res["segments"]:
        assert r["naive_rmse"] > 0 and r["ratio"] == pytest.approx(r["shortcut_rmse"] / r["naive_rmse"])
    # 3 rows (teacher, shortcut, naive) x 2 samples of 16 px with 2 px padding, enlarged 2x
    assert Image.open(tmp_path / "grid.png").size == (2 * (2 * 18 + 2), 2 * (3 * 18 + 2))

"""Runs that survive faults: signals end training at a safe point with a checkpoint and a resume command,
SIGKILL at any instant (checkpoint writing included) leaves a resumable folder, and the resumed weights equal
an uninterrupted run's; damaged checkpoints are named and skipped; bad numbers and rewards are caught."""

from __future__ import annotations

import json
import pickle

import pytest

from conftest import train_overrides
from shortft import files
from shortft.bench import faults
from shortft.cli import main
from shortft.config import build_config
from shortft.errors import RewardError, TrainingStopped, UserError
from shortft.train import train


def _args(overrides: dict) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]


def test_signals_and_kills_at_random_instants_then_resume_give_the_uninterrupted_weights(tiny, tmp_path):
    over = train_overrides(tiny, tmp_path / "ref", max_steps=12, method="shortft")
    ref = faults.launch(_args(over), tmp_path / "ref.log")
    assert ref.wait(timeout=600) == 0
    run = tmp_path / "faulty"
    report = faults.run_with_faults(_args({**over, "run_dir": run}), run,
                                    ["SIGKILL during checkpoint", "SIGTERM", "SIGKILL", "SIGINT"], seed=0, max_delay=0.5)
    assert report["final_status"] == 0, (tmp_path / "faulty.log").read_text()[-2000:]
    landed = {f: n for f, n in report["injected"].items() if n}
    assert landed.get("SIGTERM") == 1 and landed.get("SIGKILL during checkpoint") == 1
    assert report["statuses"]["SIGTERM"] == [143] and set(report["statuses"]["SIGINT"]) <= {130}
    assert all(s == -9 for s in report["statuses"]["SIGKILL"] + report["statuses"]["SIGKILL during checkpoint"])
    log = (tmp_path / "faulty.log").read_text()
    assert f"resume with: shortft train --resume {run}" in log
    assert faults.max_difference(faults.lora_weights(tmp_path / "ref"), faults.lora_weights(run)) < 1e-6
    assert json.loads((run / "summary.json").read_text())["steps"] == 12


def _steps(run):
    return [int(p.name.split("-")[1]) for p in sorted((run / "checkpoints").glob("step-*"))]


def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    over = train_overrides(tiny, run, max_steps=3, method="draft")
    train(build_config("world", overrides=over))
    assert _steps(run) == [2, 3]
    newest = run / "checkpoints" / "step-0000003"
    data = (newest / "tensors.safetensors").read_bytes()
    (newest / "tensors.safetensors").write_bytes(data[: len(data) // 2])  # truncated after the fact
    (run / "checkpoints" / "step-0000004.tmp").mkdir()  # and a half-written one from a killed process
    resumed = train(build_config("world", overrides={**over, "max_steps": 4, "resume": str(run)}))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest}: tensors.safetensors is missing or does not match" in out
    assert "resuming" in out and "at step 2" in out
    assert resumed.summary["steps"] == 4  # steps 3 and 4 were redone from the intact step-2 checkpoint


def test_resume_without_any_checkpoint_starts_at_step_zero(tiny, tmp_path):
    run = tmp_path / "run"
    over = train_overrides(tiny, run, max_steps=2, method="draft")
    a = train(build_config("world", overrides=over))
    b_dir = tmp_path / "killed-early"
    b_dir.mkdir()  # a folder a process was killed in before its first checkpoint
    b = train(build_config("world", overrides={**over, "run_dir": str(b_dir), "resume": str(b_dir)}))
    assert faults.max_difference(faults.lora_weights(a.dir), faults.lora_weights(b.dir)) == 0


def test_a_failing_checkpoint_write_names_the_error_and_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    over = train_overrides(tiny, run, max_steps=4, method="draft")
    real, calls = files.save_checkpoint, []

    def disk_full_on_third(folder, *a, **k):
        calls.append(folder)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(folder, *a, **k)

    monkeypatch.setattr(files, "save_checkpoint", disk_full_on_third)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*step-0000003 \(No space left on device\); "
                                        r"the previous one, .*step-0000002, is intact"):
        train(build_config("world", overrides=over))
    assert _steps(run) == [1, 2] and not list((run / "checkpoints").glob("*.tmp"))
    files.load_checkpoint(run / "checkpoints" / "step-0000002")  # complete and matching its manifest


class Payload:
    """Unpickling this would create the marker file: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_optimizer_pickle_is_refused_on_resume(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    over = train_overrides(tiny, run, max_steps=1, method="draft")
    train(build_config("world", overrides=over))
    ckpt = run / "checkpoints" / "step-0000001"
    marker = tmp_path / "pwned"
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"state": Payload(marker)}))
    manifest = json.loads((ckpt / "manifest.json").read_text())  # the attacker also fixes the manifest
    manifest["optimizer.pt"] = {"bytes": (ckpt / "optimizer.pt").stat().st_size,
                                "sha256": files._digest(ckpt / "optimizer.pt")}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    pickle.loads((ckpt / "optimizer.pt").read_bytes())["state"].close()  # the payload runs when unpickled plainly ...
    assert marker.exists()
    marker.unlink()
    train(build_config("world", overrides={**over, "max_steps": 2, "resume": str(run)}))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {ckpt}: optimizer.pt holds objects other than tensors" in out  # ... not on resume
    assert "starting at step 0" in out and not marker.exists()


def flaky_reward(images, prompts):
    """Symmetry on the evaluation images; NaN on every training rollout after the first two."""
    flaky_reward.calls += images.requires_grad
    score = -(images - images.flip(-1)).abs().mean(dim=(1, 2, 3))
    return score * float("nan") if flaky_reward.calls > 2 else score


def test_a_run_of_non_finite_steps_stops_and_keeps_the_checkpoint_before_them(tiny, tmp_path):
    flaky_reward.calls = 0
    run = tmp_path / "run"
    over = train_overrides(tiny, run, max_steps=10, method="draft", reward="test_faults:flaky_reward",
                           max_skipped_steps=3, eval_count=1)
    with pytest.raises(TrainingStopped, match=r"3 steps in a row had a non-finite reward or gradient "
                                              r"\(reward 'test_faults:flaky_reward', first at step 3\)") as stop:
        train(build_config("world", overrides=over))
    assert stop.value.status == 1
    assert _steps(run) == [1, 2]  # no checkpoint written during the bad streak


def no_gradient(images, prompts):
    return images.detach().mean(dim=(1, 2, 3))


def wrong_shape(images, prompts):
    return images.mean()


@pytest.mark.parametrize("reward, message", [
    ("test_faults:no_gradient", "returned scores without a gradient"),
    ("test_faults:wrong_shape", r"must return a float tensor of shape \(2,\) \(one score per image\), got a "
                                r"torch.float32 tensor of shape \(\)"),
])
def test_rewards_that_cannot_train_are_named(tiny, tmp_path, reward, message):
    over = train_overrides(tiny, tmp_path / "run", max_steps=1, method="draft", reward=reward, eval_count=2)
    with pytest.raises(RewardError, match=rf"reward '{reward}' {message}"):
        train(build_config("world", overrides=over))


@pytest.mark.parametrize("args, message", [
    (["--guidance", "nan"], "config key 'guidance' needs a finite number, got 'nan'"),
    (["lr=inf"], "config key 'lr' needs a finite number, got 'inf'"),
    (["--reward", "world_clip=nan"], "reward weight 'nan' in 'world_clip=nan' is not a number"),
    (["--max-steps", "0"], "max_steps must be >= 1, got 0"),
])
def test_non_finite_and_impossible_numbers_are_errors(tiny, tmp_path, capsys, args, message):
    rc = main(["train", *args, f"model={tiny['model']}", f"run_dir={tmp_path / 'never'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "never").exists()


def test_a_copied_run_folder_samples_evaluates_and_resumes(tiny, tmp_path):
    import shutil

    over = train_overrides(tiny, tmp_path / "a", max_steps=2, method="shortft")
    train(build_config("world", overrides=over))
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(tmp_path / "a", moved)
    shutil.rmtree(tmp_path / "a")
    assert main(["sample", str(moved), "--count", "2"]) == 0
    assert len(list((moved / "samples").glob("0*.png"))) == 2
    assert main(["train", "--resume", str(moved), "max_steps=3"]) == 0
    assert json.loads((moved / "summary.json").read_text())["steps"] == 3
    assert files.load_checkpoint(sorted((moved / "checkpoints").glob("step-*"))[-1])[1]["step"] == 3
    assert main(["eval", "--run", str(moved), "--prompts", tiny["prompts"], "--metrics", "asymmetry"]) == 0
    scores = (moved / "eval" / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 3 and scores[0].startswith("file,prompt")  # one row per prompt of the file


def test_offline_missing_model_shortcut_and_reward_fail_at_once_naming_what_to_get(tiny, tmp_path, monkeypatch,
                                                                                    capsys):
    import time

    from shortft import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub.hub_reachable.cache_clear()
    try:
        cases = [(["--model", "someorg/some-model"], "model 'someorg/some-model' is not in the local hub cache and "
                  "the hub cannot be reached (offline); download it"),
                 ([f"model={tiny['model']}", "shortcut=ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors"],
                  "LoRA file 'ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors' (file "
                  "'Hyper-SD15-4steps-lora.safetensors' of hub repo 'ByteDance/Hyper-SD') is not in the local hub cache"),
                 ([f"model={tiny['model']}", f"shortcut={tiny['shortcut']}", "reward=hpsv2"],
                  "reward 'hpsv2': the HPS checkpoint")]
        for args, message in cases:
            t0 = time.monotonic()
            rc = main(["train", *args, f"run_dir={tmp_path / 'never'}"])
            err = capsys.readouterr().err
            ours = [line for line in err.splitlines() if "shortft: error:" in line]
            assert rc == 2 and len(ours) == 1 and message in ours[0] and "Traceback" not in err, err
            assert time.monotonic() - t0 < 30 and not (tmp_path / "never").exists()
    finally:
        hub.hub_reachable.cache_clear()


def test_a_model_in_the_hub_cache_loads_without_touching_the_network(tiny, tmp_path, monkeypatch):
    import shutil
    import socket

    from shortft import hub
    from shortft.backends import SDBackend

    cache = tmp_path / "cache"
    snapshot = cache / "models--someorg--tiny-sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny["model"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))  # read at call time
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise AssertionError("the network was reached for a cached model")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    hub.hub_reachable.cache_clear()
    try:
        backend = SDBackend.load("someorg/tiny-sd")
    finally:
        hub.hub_reachable.cache_clear()
    assert backend.timesteps(10)[0] == 901 and backend.latent_shape(1) == (1, 4, 8, 8)

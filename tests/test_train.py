"""The training loop end to end on the tiny model: trainable changed / frozen did not, exact resume,
non-finite steps skipped, LoRA files loadable by stock diffusers, sampling parity, CLI errors."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from conftest import train_overrides
from shortft import files
from shortft.backends import SDBackend
from shortft.bench import chain_scaled
from shortft.cli import main
from shortft.config import build_config
from shortft.errors import TrainingStopped
from shortft.methods import METHODS
from shortft.sample import TimestepLoRASwitch, generate, load_run
from shortft.train import build_model, train, training_loop


def _adapters(ckpt_dir):
    return files.load_checkpoint(ckpt_dir)[0]


class StopBeforeStep:
    """Stands in for StopSignal: a SIGINT "arrives" during step `n` - 1, so the loop ends before step `n`."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def agreed(self, accelerator) -> int:
        self.calls += 1  # the loop asks once before every step and once after the loop
        return signal.SIGINT if self.calls > self.n else 0


def _latest_ckpt(run):
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def nan_reward(images, prompts):
    return images.mean(dim=(1, 2, 3)) * float("nan")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A 4-step ShortFT run (one step per stage), its in-memory model, and every UNet parameter's value
    before training (the same seeded build as train's)."""
    cfg = build_config("world", overrides=train_overrides(tiny, tmp_path_factory.mktemp("runs") / "shortft",
                                                          max_steps=4))
    torch.manual_seed(cfg.seed)
    backend, _ = build_model(cfg, "cpu")
    before = {n: p.detach().clone() for n, p in backend.net.named_parameters()}
    return train(cfg), before


@pytest.fixture(scope="module")
def shortft_run(trained):
    return trained[0].dir


def test_run_folder_contents(shortft_run):
    for name in ["config.yaml", "summary.json", "reward_curve.png", "before_after.png", "lora/shortft.json",
                 "lora/lora1.safetensors", "lora/lora4.safetensors"]:
        assert (shortft_run / name).is_file(), name
    summary = json.loads((shortft_run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["before"]["reward"]) and math.isfinite(summary["after"]["reward"])
    assert any((shortft_run / "tb").iterdir())


def test_trainable_changed_frozen_did_not(trained):
    """On the trained in-memory UNet: every parameter of lora1..lora4 moved from its initial value (each
    adapter's B matrices from zero), every base and shortcut weight is bit-identical to before training."""
    run, before = trained
    now = dict(run.backend.net.named_parameters())
    assert now.keys() == before.keys()
    adapters = run.method.adapter_names()
    assert adapters == ["lora1", "lora2", "lora3", "lora4"]
    for name, p in now.items():
        if any(f".{a}." in name for a in adapters):
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert sum(".shortcut." in n for n in now) > 0  # the shortcut's weights were among the frozen ones
    for a in adapters:
        assert all(before[n].abs().sum() == 0 < now[n].abs().sum() for n in now if f".{a}." in n and "lora_B" in n)
    saved = _adapters(_latest_ckpt(run.dir))  # and the last checkpoint holds exactly the trained values
    assert all(torch.equal(saved[n], now[n].detach()) for n in saved)


@pytest.mark.parametrize("family, method", [("sd", m) for m in METHODS] + [("sd3", "shortft"), ("sd3", "draft-lv")])
def test_resume_is_exact(tiny, tiny_sd3, tmp_path, family, method):
    """Every method (and the flow family): a 4-step run stopped (as by SIGINT) after step 2 and resumed equals
    4 uninterrupted steps: same LR schedule, same progressive stages, same random streams."""
    tiny = tiny if family == "sd" else tiny_sd3
    kw = dict(max_steps=4, method=method, **chain_scaled(10))
    full = tmp_path / "full"
    train(build_config("world", overrides=train_overrides(tiny, full, **kw)))
    part = tmp_path / "part"
    with pytest.raises(TrainingStopped) as stopped:
        training_loop(build_config("world", overrides=train_overrides(tiny, part, **kw)), StopBeforeStep(2))
    assert stopped.value.status == 130 and _latest_ckpt(part).name == "step-0000002"
    train(build_config("world", overrides=train_overrides(tiny, part, **kw, resume=str(part))))
    a, b = _adapters(_latest_ckpt(full)), _adapters(_latest_ckpt(part))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


def test_nonfinite_steps_are_skipped(tiny, tmp_path):
    run = tmp_path / "nan"
    train(build_config("world", overrides=train_overrides(tiny, run, method="draft", reward="test_train:nan_reward",
                                                 eval_count=1)))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_steps"] == 2
    assert all(v.abs().sum() == 0 for k, v in _adapters(_latest_ckpt(run)).items() if "lora_B" in k)


def test_lora_files_load_in_stock_diffusers_and_sampling_matches(tiny, shortft_run):
    """`shortft sample` (engine, per-timestep stacks) == stock pipeline + TimestepLoRASwitch callback."""
    backend, method, cfg = load_run(shortft_run)
    prompts, seeds = ["a red circle on the left", "a small green triangle"], [0, 1]
    ours = generate(backend, method.sample_plan(), prompts, seeds)
    b = SDBackend.load(tiny["model"])
    pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.net,
                                   scheduler=DDIMScheduler.from_config(b.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    switch = TimestepLoRASwitch.from_run(shortft_run, pipe)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    stock = pipe(prompts, num_inference_steps=cfg.num_steps, guidance_scale=cfg.guidance, generator=gens,
                 output_type="pt", callback_on_step_end=switch).images
    assert (ours - stock).abs().max() < 1e-4
    # and the LoRAs matter: the base model gives other images
    base = generate(backend, type(method.sample_plan())(
        [s.__class__(s.t_from, s.t_to, (), s.grad, s.guidance) for s in method.sample_plan().steps]), prompts, seeds)
    assert (ours - base).abs().max() > 1e-4


def test_sample_cli(shortft_run, tmp_path):
    assert main(["sample", str(shortft_run), "--count", "3", "--out", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == ["0000.png", "0001.png", "0002.png", "grid.png"]


@pytest.mark.parametrize("args, message", [
    (["train", "learning_rate=1"], "unknown config key 'learning_rate'"),
    (["train", "lr=fast"], "config key 'lr' expects float"),
    (["train", "--method", "ppo"], "unknown method 'ppo'; choose from shortft, draft"),
    (["train", "--reward", "beauty"], "unknown reward 'beauty'"),
    (["train", "--model", "/no/such/model"], "model '/no/such/model' does not exist"),
    (["train", "--prompts", "/no/prompts.txt"], "prompt file '/no/prompts.txt' does not exist"),
    (["train", "--inner-weights", "all"], "inner_weights='all' is not one of base, prev, stack"),
])
def test_cli_errors(tiny, tmp_path, capsys, args, message):
    run = tmp_path / "never"
    extra = [f"model={tiny['model']}"] if "--model" not in args else []
    rc = main(args + extra + [f"shortcut={tiny['shortcut']}", f"run_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not run.exists()  # nothing written


def test_snapshots_hold_the_loras_at_their_fraction_of_the_budget(tiny, tmp_path):
    """snapshots=[0.5] on a 4-step run: snapshots/0.5/ holds the LoRA files as they were after step 2 (the
    checkpoint of step 2 has the same tensors), loadable as a run of their own."""
    run = train(build_config("world", overrides=train_overrides(tiny, tmp_path / "run", max_steps=4, method="draft",
                                                                snapshots=[0.5], checkpoint_every=2)))
    half = run.dir / "snapshots" / "0.5"
    backend, method, _ = load_run(half)
    step2 = _adapters(run.dir / "checkpoints" / "step-0000002")  # checkpoints at 2 and 4 ...
    now = {n: p.detach() for n, p in backend.net.named_parameters() if n in step2}
    assert now and all(torch.equal(now[n], step2[n]) for n in now)
    final = dict(run.backend.net.named_parameters())
    assert any(not torch.equal(now[n], final[n].detach()) for n in now)  # ... and the run moved on after it

"""Shared fixtures: a tiny random-weight SD-format model (and shortcut LoRAs) written to disk once per
session and loaded back through the real loading code."""

from __future__ import annotations

import pytest

from shortft.testing import make_tiny_lora, make_tiny_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """dict with the model folder, a shortcut LoRA file (diffusers keys) and the same in kohya keys."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\na small green triangle\n")
    return {
        "model": str(model),
        "shortcut": str(make_tiny_lora(model, root / "shortcut.safetensors")),
        "shortcut_kohya": str(make_tiny_lora(model, root / "shortcut_kohya.safetensors", kohya=True)),
        "prompts": str(prompts),
        "root": root,
    }


@pytest.fixture
def backend(tiny):
    from shortft.backends import SDBackend

    return SDBackend.load(tiny["model"])


def train_overrides(tiny, run_dir, **kw) -> dict:
    """A small, fast training config on the tiny model."""
    base = dict(model=tiny["model"], shortcut=tiny["shortcut"], reward="symmetry", prompts=tiny["prompts"],
                eval_prompts=tiny["prompts"], eval_count=2, num_steps=10, batch_size=2, max_steps=2, lr=5e-2,
                run_dir=str(run_dir), checkpoint_every=1, lora_rank=4, lora_alpha=4.0)
    base.update(kw)
    return base

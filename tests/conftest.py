"""Shared fixtures: tiny random-weight models of both families (SD 1.5 format; SD 3 format with and
without T5), their shortcut LoRAs, written to disk once per session and loaded back through the real
loading code."""

from __future__ import annotations

import pytest

from shortft.testing import make_tiny_lora, make_tiny_model, make_tiny_sd3

PROMPTS = "a red circle on the left\na blue square at the top\na small green triangle\n"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """dict with the model folder, a shortcut LoRA file (diffusers keys) and the same in kohya keys."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS)
    return {
        "model": str(model),
        "shortcut": str(make_tiny_lora(model, root / "shortcut.safetensors")),
        "shortcut_kohya": str(make_tiny_lora(model, root / "shortcut_kohya.safetensors", kohya=True)),
        "prompts": str(prompts),
        "root": root,
    }


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """dict with a tiny SD 3-format model folder (with T5), the same without T5, a shortcut LoRA for its
    transformer (SD 3 diffusers keys) and the prompt file."""
    root = tmp_path_factory.mktemp("tiny-sd3")
    model = make_tiny_sd3(root / "model")
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS)
    return {"model": str(model), "model_no_t5": str(make_tiny_sd3(root / "model-no-t5", t5=False)),
            "shortcut": str(make_tiny_lora(model, root / "shortcut.safetensors")), "prompts": str(prompts), "root": root}


@pytest.fixture(params=["sd", "sd3"])
def tiny_any(request, tiny, tiny_sd3):
    """The tiny model of each family in turn."""
    return tiny if request.param == "sd" else tiny_sd3


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

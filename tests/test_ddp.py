"""Two real processes (torchrun, gloo on the CPU): DDP keeps the LoRA weights identical on both ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_overrides


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_process_training_keeps_ranks_in_sync(tiny_any, tmp_path):
    """Both families (the SD UNet and the SD 3 transformer)."""
    overrides = train_overrides(tiny_any, tmp_path / "run", max_steps=2, cpu=True)
    out = tmp_path / "out"
    out.mkdir()
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29517 + ("sd3" in str(tiny_any["model"]))),
           str(Path(__file__).with_name("ddp_worker.py")), json.dumps(overrides), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(out / "rank-0.safetensors"), load_file(out / "rank-1.safetensors")
    after = [k for k in r0 if k.startswith("after/")]
    assert after and set(r0) == set(r1)
    for k in after:  # identical on both ranks ...
        assert torch.equal(r0[k], r1[k]), k
    changed = sum(not torch.equal(r0[k], r0["init/" + k[6:]]) for k in after)
    assert changed > 0  # ... and trained
    assert all(torch.equal(r0["init/" + k[6:]], r1["init/" + k[6:]]) for k in after)  # same init

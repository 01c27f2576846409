"""Run by tests/test_ddp.py under `torchrun --nproc_per_node 2`: trains 2 steps on the CPU (gloo) and
writes this rank's LoRA parameters, before and after, to OUT/rank-<r>.safetensors."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

import shortft.train as train_mod
from shortft.config import build_config

torch.set_num_threads(1)
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
captured = {}
original = train_mod.build_model


def build_model_and_keep(cfg, device):
    backend, method = original(cfg, device)
    names = method.adapter_names()
    captured["params"] = {n: p for n, p in backend.net.named_parameters()
                          if ".lora_" in n and any(f".{a}." in n for a in names)}
    captured["init"] = {k: v.detach().clone() for k, v in captured["params"].items()}
    return backend, method


train_mod.build_model = build_model_and_keep
train_mod.train(build_config("world", overrides=overrides))
rank = int(os.environ["RANK"])
tensors = {f"after/{k}": v.detach().contiguous() for k, v in captured["params"].items()}
tensors.update({f"init/{k}": v.contiguous() for k, v in captured["init"].items()})
save_file(tensors, os.path.join(out, f"rank-{rank}.safetensors"))

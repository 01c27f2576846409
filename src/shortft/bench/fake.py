"""What one training iteration needs at any resolution, counted on a CPU without doing its arithmetic.

The iteration runs on fake tensors (torch's FakeTensorMode: shapes, dtypes and strides, no values, no
arithmetic), so SD 1.5 at 512 px or SDXL at 1024 px costs seconds to minutes of Python on any machine. It
runs as it would on a GPU: the frozen weights in the family's half precision (`train.HALF`), the LoRAs and
their AdamW state in fp32, the denoiser's forward under autocast (what accelerate's mixed precision does).
Two counters watch it:

- `LivePeak` adds up the bytes of every tensor storage an op creates until it is freed (views and in-place
  results share their input's storage and are not counted again); its peak over the iteration, plus the
  weights loaded before it, is what the tensors need at once. A GPU needs its CUDA context (about 0.5-1 GB)
  and the caching allocator's slack on top.
- torch's `FlopCounterMode` counts the matrix multiplications, convolutions and attention (the CPU
  flash-attention kernel that fake tensors dispatch to is registered below: like CUDA's flash attention it
  saves the log-sum-exp, not the attention matrix).

The iteration is `train.optimizer_step`'s without the checks that need values (a finite loss, the gradient
norm as a float): rollout, plan, chain, decode, reward, backward, clipping, AdamW. The FLOPs are counted on a
first iteration, which also makes AdamW's state; the memory on the same iteration run again (torch's FLOP
counter decomposes some ops into several, which would count temporaries the real kernels never make).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or shared weights count once)."""
    return sum({id(s): s.nbytes() for s in (t.untyped_storage() for t in tensors)}.values())


class LivePeak(TorchDispatchMode):
    """Bytes of tensor storage that ops made while the mode is on: alive now (`live`) and at most (`peak`).
    An output that shares a storage with one of the op's inputs (a view, an in-place result) is not new."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()  # ids of the storages counted in `live`

    def reset_peak(self) -> None:
        self.peak = self.live

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)  # torch keeps one Python object per live storage, so the id is stable until it dies
            if key in inputs or key in self._alive:
                continue
            self._alive.add(key)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def fake_weights(module: torch.nn.Module, mode) -> None:
    """Replace every parameter and buffer of `module` by a fake tensor of the same shape, dtype and
    requires_grad (the real weights are freed)."""
    from torch._subclasses.fake_tensor import is_fake

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not is_fake(p):
                sub._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and not is_fake(b):
                sub._buffers[name] = mode.from_tensor(b)


def modules_of(backend, reward) -> list[torch.nn.Module]:
    """The networks an iteration runs: the backend's (denoiser, VAE, text encoders) and the reward's."""
    found = [v for v in vars(backend).values() if isinstance(v, torch.nn.Module)]
    inner = getattr(reward, "fn", reward)
    found += [v for v in vars(inner).values() if isinstance(v, torch.nn.Module)] if hasattr(inner, "__dict__") else []
    return list({id(m): m for m in found}.values())


def estimate(preset: str | None, overrides: dict, progress: float, half: str, fake: bool = True) -> dict:
    """One method's iteration at the config's resolution with the frozen weights in `half` ("fp16", "bf16" or
    "fp32"; autocast to it unless fp32), on fake tensors (or, `fake=False`, on real ones: the same count, for
    the tests). Returns the weights' bytes, the peak and steady bytes with them, TFLOP and call counts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from shortft import lora
    from shortft.config import build_config
    from shortft.prompts import load_prompts
    from shortft.train import DTYPES, build_model, build_reward_fn, make_rollout

    cfg = build_config(preset, overrides={**overrides, "dtype": half, "mixed_precision": "no"})
    backend, method = build_model(cfg, torch.device("cpu"))
    reward = build_reward_fn(cfg, torch.device("cpu"))
    if half != "fp32":  # accelerate's mixed precision: the prepared denoiser's forward runs under autocast
        backend.denoiser.forward = torch.autocast("cpu", dtype=DTYPES[half])(backend.denoiser.forward)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    nets = modules_of(backend, reward)
    for net in nets if fake else ():
        fake_weights(net, mode)
    params = lora.set_trainable(backend.net, method.trainable(progress))
    weights = storage_bytes([t for net in nets for t in (*net.parameters(), *net.buffers())])
    prompts = load_prompts(cfg.prompts)

    def iteration(step: int, opt):
        ro, rng = make_rollout(cfg, backend, prompts, reward, step)
        plan = method.plan(progress, rng)
        loss, _, _ = method.loss(ro, plan)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return plan

    with mode, LivePeak() as mem:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        with FlopCounterMode(display=False) as flops:  # it decomposes some ops: not while memory is counted
            plan = iteration(0, opt)  # also makes AdamW's state
        mem.reset_peak()
        iteration(0, opt)  # the same draws again, with the state
    return {"weights_bytes": weights, "peak_bytes": weights + mem.peak, "steady_bytes": weights + mem.live,
            "tflop": flops.get_total_flops() / 1e12, "unet_calls": len(plan.steps), "graph_calls": plan.graph_calls,
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def worker_estimate(spec: dict) -> dict:
    """`estimate` of one row in this (fresh) process. spec: preset, overrides, progress, half."""
    return estimate(spec["preset"], spec["overrides"], spec["progress"], spec["half"])

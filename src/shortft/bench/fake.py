"""What one training iteration needs at any resolution, counted on a CPU without doing its arithmetic.

The iteration runs on fake tensors (torch's FakeTensorMode: shapes, dtypes and strides, no values, no
arithmetic), so SD 1.5 at 512 px or SDXL at 1024 px costs minutes of Python on any machine. It runs as it
would on a GPU: the frozen weights in the family's half precision (`train.HALF`), the LoRAs and their AdamW
state in fp32, the denoiser's forward under autocast (what accelerate's mixed precision does). `Counter`
watches every op:

- memory: the bytes of every tensor storage an op creates, until it is freed (views and in-place results share
  their input's storage and are not counted again). The peak over the iteration, plus the weights loaded
  before it, is what the tensors need at once: what CUDA max_memory_allocated counts. A GPU process holds its
  CUDA context (about 0.5-1 GB) and the caching allocator's slack on top.
- FLOPs: torch's formulas (`torch.utils.flop_counter`) for the matrix products, convolutions and attention; the
  CPU flash-attention kernel that fake tensors dispatch to is registered below (like CUDA's flash attention it
  saves the log-sum-exp, not the attention matrix).

The iteration is `train.optimizer_step`'s without the checks that need values (a finite loss, the gradient norm
as a float): rollout, plan, chain, decode, reward, backward, clipping, AdamW, counted after a step on zero
gradients has made AdamW's state (as a first iteration would).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

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


def _tensors(value):
    """The tensors in an op's arguments or outputs: a tensor, or a (nested) tuple / list of them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _tensors(v)


class Counter(TorchDispatchMode):
    """What the ops run while the mode is on make: bytes of tensor storage alive now (`live`) and at most
    (`peak`), and FLOPs (`flops`, by torch's formulas for matrix products, convolutions and attention). An output
    that shares a storage with one of the op's inputs (a view, an in-place result) is not new memory."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.flops = 0
        self._alive: set[int] = set()  # ids of the storages counted in `live`

    def reset(self) -> None:
        """Count from here: the peak from what is alive now, the FLOPs from zero."""
        self.peak, self.flops = self.live, 0

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        inputs = None
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = id(storage)  # torch keeps one Python object per live storage, so the id is stable until it dies
            if key in self._alive:
                continue
            if inputs is None:
                inputs = {id(x.untyped_storage()) for x in _tensors((args, tuple(kwargs.values())))}
            if key in inputs:
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
    """The networks an iteration runs: the backend's (denoiser, VAE, text encoders, also in a list as SD 3 keeps
    them) and the reward's."""
    inner = getattr(reward, "fn", reward)
    values = [*vars(backend).values(), *(vars(inner).values() if hasattr(inner, "__dict__") else ())]
    found = [m for v in values for m in (v if isinstance(v, list | tuple) else [v]) if isinstance(m, torch.nn.Module)]
    return list({id(m): m for m in found}.values())


def estimate(preset: str | None, overrides: dict, progress: float, half: str, fake: bool = True) -> dict:
    """One method's iteration at the config's resolution with the frozen weights in `half` ("fp16", "bf16" or
    "fp32"; autocast to it unless fp32), on fake tensors (or, `fake=False`, on real ones: the same count, for
    the tests). Returns the weights' bytes, the peak and steady bytes with them, TFLOP and call counts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from shortft import lora
    from shortft.config import build_config
    from shortft.prompts import load_prompts
    from shortft.train import DTYPES, build_model, build_reward_fn, make_rollout, step_info

    cfg = build_config(preset, overrides={**overrides, "dtype": half, "mixed_precision": "no" if half == "fp32" else half})
    backend, method = build_model(cfg, torch.device("cpu"))
    reward = build_reward_fn(cfg, torch.device("cpu"))
    if half != "fp32":  # accelerate's mixed precision (no accelerator here): the denoiser's forward under autocast
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
        loss, _, extra = method.loss(ro, plan)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        info = step_info(plan, extra)  # counted as training counts them
        return {k: info[k] for k in ("unet_calls", "graph_calls")}

    with mode, Counter() as count:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        for p in params:  # AdamW's state, made by a step on zero gradients (what a first iteration leaves)
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        count.reset()
        calls = iteration(0, opt)
    return {"weights_bytes": weights, "peak_bytes": weights + count.peak, "steady_bytes": weights + count.live,
            "tflop": count.flops / 1e12, **calls,
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def worker_estimate(spec: dict) -> dict:
    """`estimate` of one row in this (fresh) process. spec: preset, overrides, progress, half."""
    return estimate(spec["preset"], spec["overrides"], spec["progress"], spec["half"])

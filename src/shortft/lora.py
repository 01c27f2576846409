"""LoRA adapters on one denoising network (a UNet or a transformer): add, stack, switch, freeze, save, load.

All adapters live on the same network (peft, through diffusers' `add_adapter` / `load_lora_into_*`):
the shortcut is a frozen adapter, ShortFT's timestep-aware LoRAs are further adapters, and *stacking*
means several adapters active at once (their low-rank updates add up).

peft's own `set_adapter` also flips `requires_grad` on the adapters it (de)activates, which would make
the frozen shortcut trainable whenever it runs. `activate` therefore switches adapters without
touching `requires_grad`: which parameters train is decided once by `set_trainable`.

Files are written in each family's diffusers LoRA format (`LoraFormat`: keys `unet.<module>.lora_A.weight`
or `transformer.<module>...`, LoraConfig in the safetensors metadata), so a stock
`pipe.load_lora_weights(path, adapter_name=...)` of that family loads them. Only safetensors files are read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from shortft import files
from shortft.errors import ConfigError
from shortft.hub import hub_file

# "Attention and feed-forward layers" of the SD UNet's transformer blocks (paper, sec. 3.2).
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
ATTN_FF_TARGETS = ATTENTION + ("ff.net.0.proj", "ff.net.2")
# The same in SD 3's joint blocks, both branches: the image stream and the context (text) stream.
SD3_ATTENTION = ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SD3_TARGETS = SD3_ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


@dataclass(frozen=True)
class LoraFormat:
    """One model family's diffusers LoRA files and the loader mixin that reads and writes them."""

    component: str  # "unet" or "transformer": the key prefix in the files and the name in the loader's API
    pipeline: str  # the diffusers pipeline class whose lora_state_dict / load_lora_into_* / save_lora_weights apply
    targets: tuple[str, ...]  # the layers a fresh adapter goes on: attention + feed-forward (the paper's)
    attention: tuple[str, ...]  # the attention projections alone (TrainConfig.lora_layers="attn")

    def layers(self, which: str) -> tuple[str, ...]:
        """The target layers of TrainConfig.lora_layers: "attn_ff" or "attn"."""
        return self.attention if which == "attn" else self.targets


SD_LORA = LoraFormat("unet", "StableDiffusionPipeline", ATTN_FF_TARGETS, ATTENTION)
SDXL_LORA = LoraFormat("unet", "StableDiffusionXLPipeline", ATTN_FF_TARGETS, ATTENTION)
SD3_LORA = LoraFormat("transformer", "StableDiffusion3Pipeline", SD3_TARGETS, SD3_ATTENTION)


def _loader(fmt: LoraFormat):
    import diffusers

    return getattr(diffusers, fmt.pipeline)


def add_lora(unet: torch.nn.Module, name: str, rank: int, alpha: float | None = None,
             targets: Sequence[str] = ATTN_FF_TARGETS) -> None:
    """Add a fresh LoRA adapter `name` (B = 0, so the model is unchanged) with fp32 parameters."""
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        init_lora_weights="gaussian", target_modules=live_targets(unet, targets))
    unet.add_adapter(config, adapter_name=name)
    for p in adapter_parameters(unet, name):
        p.data = p.data.float()  # trainable weights stay fp32 under mixed precision


def live_targets(net: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """The full names of the layers `targets` name, less those no output depends on: the context queries
    (`add_q_proj`) of a joint-attention block whose context stream ends there (SD 3's last block drops its
    context output). An adapter there would never get a gradient: its zero B would stay zero, dead weight in
    every file and optimiser step."""
    dead = {f"{n}.add_q_proj" for n, m in net.named_modules() if getattr(m, "context_pre_only", False)}
    return [n for n, _ in net.named_modules()
            if n not in dead and any(n == t or n.endswith("." + t) for t in targets)]


def lora_layers(unet: torch.nn.Module) -> list[BaseTunerLayer]:
    """Every peft-wrapped layer of the UNet. peft adds layers only when an adapter is added, so the walk over
    the module tree runs once per set of loaded adapters; the list is kept on the module under their names."""
    key = tuple(adapter_names(unet))
    cached = unet.__dict__.get("_shortft_lora_layers")
    if cached is None or cached[0] != key:
        cached = (key, [m for m in unet.modules() if isinstance(m, BaseTunerLayer)])
        unet.__dict__["_shortft_lora_layers"] = cached  # a plain attribute: not a submodule, not in state_dict
    return cached[1]


def keep_input_dtype(unet: torch.nn.Module) -> None:
    """Let every LoRA branch take its layer's input in the dtype it comes in, for training under autocast. peft
    casts the input to the LoRA weights' dtype (fp32) first; under autocast, whose matmuls run in half precision
    anyway, that round trip changes no value but saves an fp32 and a half copy of every wrapped layer's input per
    call for backward (and a half copy per further stacked adapter). Not without autocast: a half input would
    then meet fp32 LoRA weights."""
    for layer in lora_layers(unet):
        layer.cast_input_dtype_enabled = False


def adapter_names(unet: torch.nn.Module) -> list[str]:
    """Names of the adapters loaded on the UNet, in insertion order."""
    return list(getattr(unet, "peft_config", {}).keys())


def activate(unet: torch.nn.Module, names: Sequence[str]) -> None:
    """Make exactly `names` active on every LoRA layer (empty = base model). requires_grad is untouched.
    O(1) when they already are (every layer is always switched together, so the first one tells)."""
    names = list(names)
    layers = lora_layers(unet)
    if not layers or (layers[0]._active_adapter == names and not layers[0]._disable_adapters):
        return
    for layer in layers:  # peft reads these plain attributes in forward (set_adapter would flip requires_grad);
        # written to __dict__ directly: nn.Module.__setattr__ costs ~20x more, and this runs per UNet call
        layer.__dict__["_active_adapter"] = names
        layer.__dict__["_disable_adapters"] = False


def active(unet: torch.nn.Module) -> list[str]:
    """The adapters currently active (read from the first LoRA layer)."""
    for layer in lora_layers(unet):
        return list(layer.active_adapters)
    return []


def adapter_parameters(unet: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The parameters of adapter `name` (peft names them `...lora_A.<name>.weight`)."""
    return [p for n, p in unet.named_parameters() if f".{name}." in n and ".lora_" in n]


def set_trainable(unet: torch.nn.Module, names: Iterable[str]) -> list[torch.nn.Parameter]:
    """Freeze every parameter of the UNet except the adapters `names`; return the trainable ones in the order
    the names are given (the optimizer's state is saved and restored by that order: it must not depend on
    the process, as a set's iteration order does)."""
    names = list(dict.fromkeys(names))
    for p in unet.parameters():
        p.requires_grad_(False)
    trainable = []
    for name in names:
        for p in adapter_parameters(unet, name):
            p.requires_grad_(True)
            trainable.append(p)
    return trainable


def set_scale(unet: torch.nn.Module, name: str, scale: float) -> None:
    """Multiply adapter `name`'s update by `scale` (on top of its alpha / rank)."""
    for layer in lora_layers(unet):
        if name in getattr(layer, "scaling", {}):
            layer.set_scale(name, scale)


def resolve_file(spec: str | os.PathLike) -> Path:
    """A local LoRA file, or `repo_id/filename` (e.g. `ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors`)
    from the hub cache (downloaded when online). A clear error when neither works."""
    return hub_file(spec, "LoRA file", "pass the local .safetensors path")


def load_lora(unet: torch.nn.Module, spec: str | os.PathLike, name: str, trainable: bool = False,
              fmt: LoraFormat = SD_LORA) -> None:
    """Load a LoRA file (diffusers or kohya keys, e.g. Hyper-SD) of format `fmt` onto the network as `name`."""
    path = resolve_file(spec)
    loader = _loader(fmt)  # the mixin that understands every LoRA key layout of the family
    loaded = loader.lora_state_dict(str(path), return_lora_metadata=True, use_safetensors=True)
    state_dict, metadata = loaded[0], loaded[-1]
    if not any(k.startswith(f"{fmt.component}.") for k in state_dict):
        raise ConfigError(f"{path} holds no {fmt.component} LoRA weights for {fmt.pipeline} (keys start with "
                          f"{next(iter(state_dict), None)!r})")
    if name in adapter_names(unet):
        raise ValueError(f"an adapter named {name!r} is already loaded")  # a bug, not bad input
    alphas = {"network_alphas": loaded[1]} if fmt.component == "unet" else {}
    getattr(loader, f"load_lora_into_{fmt.component}")(state_dict, **alphas, **{fmt.component: unet},
                                                         adapter_name=name, metadata=metadata)
    for p in adapter_parameters(unet, name):
        p.requires_grad_(trainable)
        if trainable:
            p.data = p.data.float()
    activate(unet, [])  # loading activates the new adapter; the chain decides what runs


def lora_state_dict(unet: torch.nn.Module, name: str, fmt: LoraFormat = SD_LORA) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights with diffusers keys (`unet.` / `transformer.` prefix, no adapter name)."""
    sd = get_peft_model_state_dict(unet, adapter_name=name)
    return {f"{fmt.component}.{k}": v.detach().clone() for k, v in sd.items()}


def save_lora(unet: torch.nn.Module, name: str, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              fmt: LoraFormat = SD_LORA) -> Path:
    """Write adapter `name` as a diffusers LoRA safetensors file of format `fmt` with its LoraConfig as
    metadata, its tensors in `dtype` (fp16 halves the file; loaders cast to the network's dtype)."""
    path = Path(path)
    prefix = f"{fmt.component}."
    layers = {k[len(prefix):]: v.to(dtype) for k, v in lora_state_dict(unet, name, fmt).items()}
    config = unet.peft_config[name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    with files.atomic_path(path) as tmp:  # a reader never sees half a file
        _loader(fmt).save_lora_weights(tmp.parent, weight_name=tmp.name, **{f"{fmt.component}_lora_layers": layers,
                                       f"{fmt.component}_lora_adapter_metadata": config})
    return path

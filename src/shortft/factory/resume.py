"""Resuming the long parts (VAE, decoder refinement, UNet): one checkpoint folder per part, written
through shortft.files every `checkpoint_every` steps and read back on the next run.

A checkpoint holds the modules' weights and extra tensors such as the EMA (safetensors), the optimiser
state (loaded with `weights_only=True`: a file holding anything but tensors and numbers is refused, no
pickled code runs) and, in state.json, the step and the part's settings. Every draw of a step derives
from (seed, step), so a resumed run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from shortft import files
from shortft.errors import ConfigError

# Settings that may change between an interrupted run and its resume.
RESUMABLE = {"steps", "checkpoint_every", "readback_every"}


class Checkpointer:
    """Save and restore one part's training state in `folder`.

    modules: name -> module whose state_dict is saved (keys "name.<param>");
    extra: name -> list of tensors saved as "name.<i>" and restored in place (the UNet's EMA);
    settings: the part's config section (and seed) as a dict: a resume with other values is refused."""

    def __init__(self, folder: Path, every: int, settings: dict, modules: dict[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer, extra: dict[str, list[torch.Tensor]] | None = None):
        self.folder, self.every, self.settings = Path(folder), every, settings
        self.modules, self.optimizer, self.extra = modules, optimizer, extra or {}

    def resume(self) -> int:
        """Restore the checkpoint if there is one; the number of steps already done (0 without one)."""
        if not self.folder.exists():
            return 0
        tensors, state, optimizer = files.load_checkpoint(self.folder)  # an unsafe pickle: CorruptCheckpoint
        changed = {k: (v, self.settings.get(k)) for k, v in state["settings"].items()
                   if k not in RESUMABLE and self.settings.get(k) != v}
        if changed:
            raise ConfigError(f"checkpoint {self.folder} was made with other settings {changed} (old, new); "
                              "use those or another work_dir")
        for name, module in self.modules.items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        with torch.no_grad():
            for name, tensor_list in self.extra.items():
                for i, t in enumerate(tensor_list):
                    t.copy_(tensors[f"{name}.{i}"])
        self.optimizer.load_state_dict(optimizer)
        tqdm.write(f"{self.folder.name}: resumed at step {state['step']} from {self.folder}")
        return state["step"]

    def step_done(self, step: int) -> bool:
        """Called after `step` steps are done: save when it is a multiple of `every`; True when it saved."""
        if not self.every or step % self.every:
            return False
        tensors = {f"{name}.{k}": v for name, module in self.modules.items() for k, v in module.state_dict().items()}
        tensors.update({f"{name}.{i}": t for name, ts in self.extra.items() for i, t in enumerate(ts)})
        files.save_checkpoint(self.folder, tensors, {"step": step, "settings": self.settings},
                              self.optimizer.state_dict())
        return True

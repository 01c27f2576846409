"""Stopping a training run at a safe point: SIGINT / SIGTERM set a flag that the loop reads between
optimiser steps, so the run ends after the step in progress with a checkpoint of it; on several
processes the ranks agree (a max over the flags) so every rank stops at the same step."""

from __future__ import annotations

import signal
import threading

import torch

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number


class StopSignal:
    """Context manager that catches SIGINT and SIGTERM while training runs. A second signal of either kind
    restores the default behaviour (a second Ctrl-C ends the process at once)."""

    def __init__(self):
        self.received: int = 0  # the signal number caught, 0 for none
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received:  # the second one: give up on the safe point
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"\nshortft: {signal.Signals(signum).name} received; stopping after the current step "
              "(send it again to stop at once)", flush=True)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in EXIT_STATUS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, accelerator) -> int:
        """The signal any rank received (0 for none), the same on every rank."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([float(self.received)], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())

"""Save-and-exit on a signal: SIGTERM (what SLURM, Kubernetes and torchrun send before killing)
and one configurable signal (`train.exit_signal`, e.g. SIGUSR1 with sbatch's `--signal`).

The handler only records that the signal came; the training loop reads the flag after each step,
all-reduces it so every rank stops at the same step, saves a checkpoint and returns. This follows
Megatron-LM's `dist_signal_handler.DistributedSignalHandler` and `training.py`'s
`checkpoint_and_decide_exit` (--exit-signal-handler, --exit-signal).
"""

from __future__ import annotations

import signal


class ExitSignalHandler:
    """Records SIGTERM and `name` while installed; `restore()` puts the previous handlers back."""

    def __init__(self, name: str = "SIGTERM"):
        self.signals = sorted({signal.SIGTERM, signal.Signals[name]})
        self.name: str | None = None
        self._previous = {}
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.name = self.name or signal.Signals(signum).name

    @property
    def received(self) -> bool:
        return self.name is not None

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

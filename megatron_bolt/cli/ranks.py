"""Where a distributed command's ranks run (`bolt train`, `bolt score`, `bolt generate`)."""

from __future__ import annotations

import argparse
import signal


def relaunch_if_needed(args: argparse.Namespace, nproc: int, forward: list[signal.Signals] = ()) -> int | None:
    """Outside torchrun / srun with nproc > 1: run the full command line again as nproc local ranks
    (`runtime.relaunch`) and return their exit code. Otherwise None: this process is a rank (under
    a launcher) or the only one; go on and run, on `runtime.rank_env()`."""
    from megatron_bolt import runtime

    if runtime.under_launcher() or nproc <= 1:
        return None
    return runtime.relaunch(args._argv, nproc, forward_signals=forward)

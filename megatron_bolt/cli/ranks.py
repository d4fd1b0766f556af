"""Where a distributed command's ranks run (`bolt train`, `bolt score`, `bolt generate`)."""

from __future__ import annotations

import argparse
import os
import signal


def relaunch_or_become_rank(args: argparse.Namespace, nproc: int,
                            forward: list[signal.Signals] = ()) -> int | None:
    """Under torchrun or srun this process is a rank already: None. Otherwise, with nproc > 1, run the
    full command line again as nproc local ranks (`runtime.relaunch`) and return their exit code;
    with nproc 1 this process declares itself the only rank (the entry point owns its
    environment) and None is returned: go on and run."""
    from megatron_bolt import runtime

    if runtime.under_launcher():
        return None
    if nproc > 1:
        return runtime.relaunch(args._argv, nproc, forward_signals=forward)
    os.environ.update(runtime.single_rank_env())
    return None

"""`bolt train CONFIG.yaml key=value ... [--nproc-per-node N]`.

Under torchrun or srun (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS set) this process is one rank
and trains. Otherwise it validates the config, then either trains in-process (N = 1) or launches
`torchrun --nproc-per-node N -m megatron_bolt train ...` on this machine.
"""

from __future__ import annotations

import argparse
import signal

from megatron_bolt.cli.ranks import relaunch_if_needed
from megatron_bolt.config import load_config, validate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=20 parallel.tp=2")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="launch this many local processes with torchrun (ignored when already under torchrun/srun)",
    )


def run(args: argparse.Namespace) -> int:
    from megatron_bolt import runtime

    cfg = load_config(args.config, args.overrides)
    if not runtime.under_launcher():
        nproc = args.nproc_per_node or 1
        from megatron_bolt.models.gpt import check_requirements

        check_requirements(cfg.model, cfg.parallel)  # what this machine lacks (TE for cp/fp8) comes first
        validate(cfg, nproc)  # fail here, in one line, rather than in N ranks' tracebacks
        from megatron_bolt.training.data import parse_blend  # imports megatron: only once the config is valid

        if not cfg.data.uses_mock:
            parse_blend(cfg.data.prefixes)
        # The save-and-exit signals go to the training ranks themselves (see runtime.relaunch).
        code = relaunch_if_needed(args, nproc, forward=[signal.SIGTERM, signal.Signals[cfg.train.exit_signal]])
        if code is not None:
            return code
    from megatron_bolt.compat import cpu as cpu_compat
    from megatron_bolt.training.loop import train

    cpu_compat.install()  # without CUDA: Megatron-Core on CPU + gloo (changes devices only)
    train(cfg, runtime.rank_env())
    runtime.shutdown()
    return 0

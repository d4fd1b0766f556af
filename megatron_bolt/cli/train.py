"""`bolt train CONFIG.yaml key=value ... [--nproc-per-node N]`.

Under torchrun or srun (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS set) this process is one rank
and trains. Otherwise it validates the config, then either trains in-process (N = 1) or launches
`torchrun --nproc-per-node N -m megatron_bolt train ...` on this machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings

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


def _under_launcher() -> bool:
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or (
        "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "SLURM_STEP_ID" in os.environ
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if _under_launcher():
        quiet_warnings()
        from megatron_bolt.training.loop import train

        train(cfg)
        from megatron_bolt import runtime

        runtime.shutdown()
        return 0
    nproc = args.nproc_per_node or 1
    from megatron_bolt.models.gpt import check_requirements

    check_requirements(cfg.model, cfg.parallel)  # what this machine lacks (TE for cp/fp8) comes first
    validate(cfg, nproc)  # fail here, in one line, rather than in N ranks' tracebacks
    from megatron_bolt.training.data import parse_blend  # imports megatron: only once the config is valid

    parse_blend(cfg.data.prefixes)
    if nproc == 1:
        from megatron_bolt.runtime import _free_port

        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        return run(args)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "megatron_bolt", "train", args.config, *args.overrides,
    ]
    return subprocess.call(cmd)


def quiet_warnings() -> None:
    """Megatron-Core warns about missing apex/TE on every import; on CPU that is expected."""
    for pattern in ("Apex is not installed", "Transformer Engine", "apex", "TE "):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

"""`bolt train CONFIG.yaml key=value ... [--nproc-per-node N] [--export-hf DIR [--export-tokenizer DIR]]`.

Under torchrun or srun (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS set) this process is one rank
and trains. Otherwise it validates the config, then either trains in-process (N = 1) or launches
`torchrun --nproc-per-node N -m megatron_bolt train ...` on this machine. With --export-hf, a
training that reaches its last step is converted to HF by rank 0 once the ranks' process group is
gone (what `bolt convert mcore-to-hf` does, without starting a second interpreter).
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from megatron_bolt.cli.ranks import relaunch_if_needed
from megatron_bolt.config import load_config, validate
from megatron_bolt.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=20 parallel.tp=2")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="launch this many local processes with torchrun (ignored when already under torchrun/srun)",
    )
    p.add_argument("--export-hf", default=None, metavar="DIR",
                   help="when training reaches train.steps (not after a save-and-exit stop), convert the last "
                        "checkpoint to an HF model in DIR, as `bolt convert mcore-to-hf --ckpt CHECKPOINTS "
                        "--out DIR` would; CHECKPOINTS is checkpoint.dir (default output_dir/checkpoints), DIR must not exist or be empty")
    p.add_argument("--export-tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory copied into the export (default: the checkpoints' tokenizer/)")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt import runtime

    cfg = load_config(args.config, args.overrides)
    if args.export_tokenizer and not args.export_hf:
        raise UserError("--export-tokenizer needs --export-hf")
    if args.export_hf and Path(args.export_hf).is_dir() and any(Path(args.export_hf).iterdir()):
        raise UserError(f"--export-hf {args.export_hf}: directory exists and is not empty")  # before, not after, training
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
    env = runtime.rank_env()
    record = train(cfg, env)
    runtime.shutdown()
    if args.export_hf and env.rank == 0 and not record.get("stopped"):
        from megatron_bolt.convert.mcore_to_hf import convert_mcore_to_hf

        out = convert_mcore_to_hf(cfg.checkpoint_dir, args.export_hf, tokenizer=args.export_tokenizer)
        print(f"exported {out}", flush=True)
    return 0

"""`bolt score --ckpt DIR --input FILE.jsonl --output OUT.jsonl [--nproc-per-node N]`.

Input lines are `{"tokens": [...]}`; output lines `{"logprob": sum log p(t_2..n), "num_tokens": n-1}`.
With N > 1 (or under torchrun) the model runs tensor-parallel over N ranks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True,
                   help="a megatron-bolt checkpoint directory (training output or `bolt convert`), or an HF "
                        "export (`bolt convert mcore-to-hf`, gpt or ponder), scored with transformers")
    p.add_argument("--input", required=True, help='JSONL, one {"tokens": [...]} per line')
    p.add_argument("--output", required=True, help="JSONL of per-line summed log-probs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--nproc-per-node", type=int, default=1, help="tensor-parallel ranks to launch locally")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.cli.train import quiet_warnings

    if "RANK" not in os.environ and args.nproc_per_node > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
            "-m", "megatron_bolt", "score", "--ckpt", args.ckpt, "--input", args.input, "--output", args.output,
            "--batch-size", str(args.batch_size),
        ]
        return subprocess.call(cmd)
    if "RANK" not in os.environ:
        from megatron_bolt.runtime import _free_port

        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    quiet_warnings()
    from megatron_bolt import runtime
    from megatron_bolt.training.score import score_file

    summary = score_file(args.ckpt, args.input, args.output, args.batch_size)
    runtime.print0(
        f"scored {summary['sequences']} sequences, {summary['tokens']} tokens: "
        f"mean NLL {summary['mean_nll']:.4f}, perplexity {summary['perplexity']:.3f} -> {args.output}"
    )
    runtime.shutdown()
    return 0

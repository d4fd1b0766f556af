"""`bolt score --ckpt DIR --input FILE.jsonl --output OUT.jsonl [--nproc-per-node N]`.

Input lines are `{"tokens": [...]}`; output lines `{"logprob": sum log p(t_2..n), "num_tokens": n-1}`.
With N > 1 (or under torchrun) the model runs tensor-parallel over N ranks.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True,
                   help="a megatron-bolt checkpoint directory (training output or `bolt convert`), or an HF "
                        "export (`bolt convert mcore-to-hf`, gpt or ponder), scored with transformers")
    p.add_argument("--input", required=True, help='JSONL, one {"tokens": [...]} per line')
    p.add_argument("--output", required=True, help="JSONL of per-line summed log-probs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--nproc-per-node", type=int, default=1, help="tensor-parallel ranks to launch locally")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.cli.ranks import relaunch_if_needed

    code = relaunch_if_needed(args, args.nproc_per_node)
    if code is not None:
        return code
    from megatron_bolt import runtime
    from megatron_bolt.compat import cpu as cpu_compat
    from megatron_bolt.training.score import is_hf_directory, score_file

    if not is_hf_directory(args.ckpt):  # an HF export is scored with transformers, no Megatron-Core
        cpu_compat.install()
    summary = score_file(args.ckpt, args.input, args.output, args.batch_size, runtime.rank_env())
    runtime.print0(
        f"scored {summary['sequences']} sequences, {summary['tokens']} tokens: "
        f"mean NLL {summary['mean_nll']:.4f}, perplexity {summary['perplexity']:.3f} -> {args.output}"
    )
    runtime.shutdown()
    return 0

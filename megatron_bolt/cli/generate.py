"""`bolt generate --ckpt DIR --input PROMPTS.jsonl --output OUT.jsonl [--max-new-tokens N] [--nproc-per-node N]`.

Continues token prompts (`{"tokens": [...]}` per line) under a megatron-bolt checkpoint of either
model type with KV-cached decoding: one position per token for `gpt`, K+1 positions per token for
`ponder` (after a Jacobi prefill of the prompt). Output lines: `{"prompt": [...], "generated": [...]}`.
Greedy by default; `--temperature T --seed S` samples (the same draws on every TP rank).
With N > 1 (or under torchrun) the model runs tensor-parallel over N ranks.
"""

from __future__ import annotations

import argparse
import sys

from megatron_bolt.atomic import atomic_write_jsonl
from megatron_bolt.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a megatron-bolt checkpoint directory (gpt or ponder)")
    p.add_argument("--input", required=True, help='JSONL, one {"tokens": [...]} prompt per line')
    p.add_argument("--output", required=True, help='JSONL of {"prompt": [...], "generated": [...]}')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: seed + line index)")
    p.add_argument("--eos-id", type=int, default=None, help="stop a prompt's continuation at this token")
    p.add_argument("--jacobi-iters", type=int, default=None,
                   help="ponder prefill Jacobi iterations (default: ponder.eval_jacobi_iters; K*prompt length is exact)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="tensor-parallel ranks to launch locally")


def read_prompts(path: str) -> list[list[int]]:
    from megatron_bolt.training.score import read_token_lines

    return read_token_lines(path, min_tokens=1, purpose="generate from")


def generate_file(args: argparse.Namespace) -> int:
    """Collective: every rank runs the same prompts; rank 0 writes the output. Returns #prompts."""
    from tqdm import tqdm

    from megatron_bolt import runtime
    from megatron_bolt.models.generation import generate
    from megatron_bolt.training.score import load_for_inference

    prompts = read_prompts(args.input)
    model, cfg = load_for_inference(args.ckpt, runtime.rank_env())
    V = cfg.model.vocab_size
    for lineno, p in enumerate(prompts, 1):
        if not all(0 <= t < V for t in p):
            raise UserError(f"{args.input}: prompt {lineno} has a token id outside the vocabulary [0, {V})")
    results = []
    for i, prompt in enumerate(tqdm(prompts, desc="generate", disable=not runtime.is_main(), file=sys.stderr)):
        new = generate(model, prompt, args.max_new_tokens, V, args.temperature, args.seed + i, args.eos_id,
                       args.jacobi_iters)
        results.append({"prompt": prompt, "generated": new})
    if runtime.is_main():
        atomic_write_jsonl(args.output, results)
    return len(results)


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.cli.ranks import relaunch_if_needed

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    code = relaunch_if_needed(args, args.nproc_per_node)
    if code is not None:
        return code
    from megatron_bolt import runtime
    from megatron_bolt.compat import cpu as cpu_compat

    cpu_compat.install()  # without CUDA: Megatron-Core on CPU + gloo (changes devices only)

    n = generate_file(args)
    runtime.print0(f"generated continuations of {n} prompts -> {args.output}")
    runtime.shutdown()
    return 0

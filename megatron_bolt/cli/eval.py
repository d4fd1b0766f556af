"""`bolt eval --model HF_DIR --task toy|gsm8k|math|mmlu_stem [--data FILE.jsonl] [--out DIR] ...`.

Few-shot greedy evaluation of an HF export, as the BoLT reference evaluates: in latent space
(`--format latent`: the exemplars' reasoning sits inside `SoL PRIOR ... EoL`, the model writes its
own latent, then the answer), or on plain text (`--format raw`, for baselines trained without latents).
A thin wrapper over `megatron_bolt.evaluation.evaluate.evaluate`.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Exemplars are the first N items of --exemplars, else the task's fixed exemplars (gsm8k 8-shot, math and "
        "mmlu_stem 4-shot, in latent form, as the reference), else (toy) the first N items of --data, which are "
        "then not scored. Every item is scored unless --limit. Writes DIR/predictions.jsonl (per item: index, line, question, answer, generation, "
        "extracted, correct) and DIR/accuracy.json. Example: bolt eval --model runs/demo/hf --task toy --out runs/eval"
    )
    p.add_argument("--model", required=True, help="HF model directory (config, weights and tokenizer files)")
    p.add_argument("--task", required=True, choices=("toy", "gsm8k", "math", "mmlu_stem"),
                   help="toy: question/answer[/working]; gsm8k: question/answer with '#### n'; "
                        "math: problem|question and solution|answer with \\boxed{}; mmlu_stem: question, "
                        "choices (list), answer (index); rows of non-STEM subjects are skipped")
    p.add_argument("--data", default=None,
                   help="JSONL in the task's format; for --task toy it may be omitted: held-out problems are generated")
    p.add_argument("--format", dest="fmt", default="latent", choices=("latent", "raw"),
                   help="latent (default): reasoning inside SoL PRIOR ... EoL; raw: plain text, no special tokens")
    p.add_argument("--shots", type=int, default=None,
                   help="number of exemplars in each prompt (default: 8 for gsm8k, 4 for the others)")
    p.add_argument("--exemplars", default=None, help="JSONL (same format as --data) to take the exemplars from")
    p.add_argument("--limit", type=int, default=None,
                   help="score at most N items (toy without --data: generate N, default 200)")
    p.add_argument("--out", default=None, help="directory for predictions.jsonl and accuracy.json")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="generation budget per item (default 1024, the reference's); clamped, with a message, so "
                        "that half the model's context stays for the prompt")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated toy items (default 0)")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.evaluation.evaluate import evaluate, summary_line

    result = evaluate(
        args.model, args.task, args.data, shots=args.shots, limit=args.limit, out_dir=args.out, fmt=args.fmt,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, exemplars=args.exemplars, seed=args.seed,
    )
    print(f"exemplars: {result['exemplars']}")
    print(summary_line(result))
    return 0

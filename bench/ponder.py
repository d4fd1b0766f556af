"""Continuous latent thoughts vs vanilla at equal training tokens (PonderLM-2's claim, CPU scale).

    .venv/bin/python bench/ponder.py --data /work/shared/data [--layers 2 --hidden 64 --steps 150]

Corpus: GSM8K train (question + answer) as bytes (vocab 257, id 0 = end of document), held-out
validation on the first --val-docs GSM8K test documents. Three models, same seed, same batches:
(a) vanilla with L layers, (b) ponder K=1 with L layers (J from {2,3} in training, 3 at eval),
(c) vanilla with 2L layers (about the inference FLOPs of b). Each is trained with `bolt train` and
scored with `bolt score` (mean NLL per byte on validation). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _docs(path: Path) -> list[bytes]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out.append(f"{row['question']}\n{row['answer']}".encode())
    return out


def write_bytes_corpus(docs: list[bytes], prefix: Path) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for d in docs:
        arr = np.frombuffer(d, dtype=np.uint8).astype(np.int64) + 1
        arr = np.append(arr, 0)
        builder.add_document(arr, [len(arr)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def bolt(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "megatron_bolt", *args], check=True, cwd=REPO, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with gsm8k_train.jsonl and gsm8k_test.jsonl")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--val-docs", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ponder-"))
    work.mkdir(parents=True, exist_ok=True)
    prefix = write_bytes_corpus(_docs(Path(args.data) / "gsm8k_train.jsonl"), work / "gsm8k_bytes")
    val = work / "val.jsonl"
    with open(val, "w") as f:
        for d in _docs(Path(args.data) / "gsm8k_test.jsonl")[: args.val_docs]:
            f.write(json.dumps({"tokens": [b + 1 for b in d[: args.seq]]}) + "\n")

    common = [
        f"data.prefixes=[{prefix}]", "data.split=100,0,0", f"data.cache_dir={work / 'cache'}",
        "model.vocab_size=257", f"model.hidden_size={args.hidden}", "model.num_attention_heads=4",
        f"model.seq_len={args.seq}", f"train.steps={args.steps}", f"train.global_batch={args.global_batch}",
        f"train.micro_batch={args.global_batch}", "train.warmup=10", f"train.log_interval={args.steps}",
    ]
    runs = {
        f"(a) vanilla, {args.layers} layers": ["model.type=gpt", f"model.num_layers={args.layers}"],
        f"(b) ponder K=1, {args.layers} layers": ["model.type=ponder", f"model.num_layers={args.layers}",
                                                  "ponder.latents_per_token=1", "ponder.jacobi_iters=[2,3]"],
        f"(c) vanilla, {2 * args.layers} layers": ["model.type=gpt", f"model.num_layers={2 * args.layers}"],
    }
    print("| model | val NLL/byte | s/step (train) | wall s | steps x tokens |\n|---|---|---|---|---|")
    for i, (name, extra) in enumerate(runs.items()):
        out = work / f"run{i}"
        started = time.time()
        bolt("train", str(REPO / "examples/tiny/config.yaml"), *common, *extra, f"output_dir={out}")
        wall = time.time() - started
        steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        tokens_per_step = args.global_batch * args.seq
        # median step time after the first few (startup, allocator warm-up)
        per_step = sorted(tokens_per_step / s["tokens_per_s"] for s in steps[min(5, len(steps) // 2):])
        bolt("score", "--ckpt", str(out / "checkpoints"), "--input", str(val), "--output", str(out / "val.jsonl"))
        scores = [json.loads(x) for x in (out / "val.jsonl").read_text().splitlines()]
        nll = -sum(s["logprob"] for s in scores) / sum(s["num_tokens"] for s in scores)
        print(f"| {name} | {nll:.4f} | {per_step[len(per_step) // 2]:.3f} | {wall:.0f} | "
              f"{args.steps} x {tokens_per_step} |", flush=True)


if __name__ == "__main__":
    main()

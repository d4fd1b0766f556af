"""`bolt demo`: what `make demo` runs on a fresh machine.

Until the BoLT EM loop lands (issue 7), the demo is the training engine on the embedded default:
it writes the tiny synthetic corpus, trains examples/tiny with Megatron-Core on CPU (or GPU), and
prints progress and the final loss. Outputs go to runs/demo/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_bolt.cli import main as bolt_main

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="runs/demo", help="where data, checkpoints and metrics go")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--nproc-per-node", type=int, default=1, help="e.g. 2 to train data-parallel on 2 processes")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.data.synthetic import write_synthetic_dataset

    out = Path(args.output_dir)
    prefix = write_synthetic_dataset(out / "data" / "synthetic")
    print(f"demo: wrote a synthetic corpus to {prefix}.bin/.idx; training examples/tiny for {args.steps} steps", flush=True)
    code = bolt_main([
        "train", str(REPO / "examples" / "tiny" / "config.yaml"), f"output_dir={out}", f"data.prefixes=[{prefix}]",
        f"train.steps={args.steps}", f"checkpoint.dir={out / 'checkpoints'}",
        "--nproc-per-node", str(args.nproc_per_node),
    ])
    metrics = out / "metrics.jsonl"
    if code == 0 and metrics.exists():
        import json

        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        print(f"demo: loss {rows[0]['loss']:.3f} at step 1 -> {rows[-1]['loss']:.3f} at step {rows[-1]['step']} "
              f"(uniform guess: 6.238); checkpoint in {out / 'checkpoints'}; metrics in {metrics}")
    return code

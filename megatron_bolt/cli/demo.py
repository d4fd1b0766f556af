"""`bolt demo`: what `make demo` runs on a fresh machine: the BoLT EM loop on the toy math world.

Raw baseline, warm start from the toy teacher's latents, three EM iterations with K=4 and a K=1
ablation of the last one, each a Megatron-Core training run on this machine (CPU or GPU), then a
table of accuracy and IWAE bound, runs/demo/summary.json and accuracy/IWAE plots. Re-running
resumes where it stopped; `--fresh` starts over. The config is examples/toy/em.yaml.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="runs/demo", help="where everything goes (default runs/demo)")
    p.add_argument("--fresh", action="store_true", help="delete the output directory first")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of examples/toy/em.yaml")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.config import load_em_config
    from megatron_bolt.em.driver import EMDriver

    if args.fresh:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    cfg = load_em_config(REPO / "examples" / "toy" / "em.yaml", [f"output_dir={args.output_dir}", *args.overrides])
    cfg.train_config = str(REPO / cfg.train_config)
    start = time.perf_counter()
    print(f"demo: the BoLT EM loop on the toy math world -> {args.output_dir} (config examples/toy/em.yaml)", flush=True)
    EMDriver(cfg).run()
    print(f"demo: done in {(time.perf_counter() - start) / 60:.1f} min; {args.output_dir}/summary.json, "
          f"{args.output_dir}/accuracy.png, {args.output_dir}/iwae.png", flush=True)
    return 0

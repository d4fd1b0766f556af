"""`bolt em CONFIG.yaml [key=value ...]`: run (or resume) the BoLT EM loop."""

from __future__ import annotations

import argparse

from megatron_bolt.cli import set_torch_threads
from megatron_bolt.config import load_em_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The BoLT EM loop (method.md): warm start from teacher latents, then per iteration export the "
        "model, E-step on the rest of the corpus with K samples per chunk, merge, train, evaluate (accuracy "
        "and IWAE). Every step's outputs live under output_dir/<stage>/; re-running resumes at the first "
        "unfinished step. Ends with a table, output_dir/summary.json and accuracy/IWAE plots."
    )
    p.add_argument("config", help="EM config YAML (see examples/toy/em.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. iterations=2 estep.samples=8")
    p.add_argument("--plan", action="store_true",
                   help="print what every stage trains (start, steps, batch, tokens, FLOPs, data) and exit; the "
                   "token-matched raw baseline is known once the data of the run it matches is merged")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.em.driver import EMDriver

    cfg = load_em_config(args.config, args.overrides)
    set_torch_threads(cfg.engine.threads)  # for the E-step and IWAE, which run in this process
    driver = EMDriver(cfg)
    if args.plan:
        print(driver.plan_table())
        return 0
    driver.run()
    return 0

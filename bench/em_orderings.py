"""The paper's orderings on the toy demo, over seeds: does BoLT's EM loop behave as the paper reports?

    .venv/bin/python bench/em_orderings.py [--seeds 0 1 2] [--out-dir runs/orderings] [key=value ...]
    .venv/bin/python bench/em_orderings.py --report-only --out-dir runs/orderings   # re-read finished runs

Runs `bolt em examples/toy/em.yaml` (the demo: the paper's protocol, every stage from the base
model, each iteration on its own E-step latents, raw baselines token- and FLOPs-matched, evaluation
on held-out (COUNT, START) pairs) once per seed, each in `OUT_DIR/seed<s>/` (resumable: a finished
seed is only re-read), with `seed=<s>` and any `key=value` overrides. Then checks, per seed, on the
accuracy of each stage's summary row:

- latent > raw (tokens):  the last iteration beats the token-matched raw baseline;
- latent > raw (FLOPs):   ... and the FLOPs-matched one;
- iterations rise:        each iteration's accuracy >= the one before, the last > the warm start;
- K > 1 helps:            the last iteration at K = estep.samples beats its K = 1 ablation;
- IWAE rises:             the IWAE bound (largest n) of the last iteration > the warm start's.

Prints a table per seed, how many seeds each ordering holds on, and writes OUT_DIR/orderings.json.
One seed is a whole `make demo` (about its wall time on 2 cores); three take three times that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
ORDERINGS = ("latent > raw (tokens)", "latent > raw (FLOPs)", "iterations rise", "K > 1 helps", "IWAE rises")


def run_seed(config: str, out: Path, seed: int, overrides: list[str]) -> dict:
    """The summary of one seed's `bolt em` run (run or resumed here, in this process)."""
    from megatron_bolt.config import load_em_config
    from megatron_bolt.em.driver import EMDriver

    summary = out / "summary.json"
    cfg = load_em_config(config, [f"output_dir={out}", f"seed={seed}", *overrides])
    if not summary.exists():
        start = time.perf_counter()
        EMDriver(cfg).run()
        print(f"[orderings] seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(summary.read_text())


def orderings(summary: dict) -> dict[str, bool | None]:
    """Each ordering of the module docstring on one run's summary rows (None: not in this run)."""
    rows = {r["stage"]: r for r in summary["rows"]}
    acc = {stage: r["accuracy"] for stage, r in rows.items()}
    iters = sorted((s for s in rows if s.startswith("iter") and "_k" not in s), key=lambda s: int(s[4:]))
    last = iters[-1] if iters else None
    out: dict[str, bool | None] = dict.fromkeys(ORDERINGS)
    if last is None:
        return out
    for kind, name in (("tokens", "latent > raw (tokens)"), ("flops", "latent > raw (FLOPs)")):
        if f"raw_{kind}" in acc:
            out[name] = acc[last] > acc[f"raw_{kind}"]
    if "warmstart" in acc:
        chain = [acc[s] for s in iters]
        out["iterations rise"] = all(b >= a for a, b in zip(chain, chain[1:])) and chain[-1] > acc["warmstart"]
        iw_last, iw_warm = rows[last].get("iwae_per_chunk") or {}, rows["warmstart"].get("iwae_per_chunk") or {}
        common = sorted(set(iw_last) & set(iw_warm), key=int)
        if common:
            out["IWAE rises"] = iw_last[common[-1]] > iw_warm[common[-1]]
    k1 = f"{last}_k1"
    if k1 in acc:
        out["K > 1 helps"] = acc[last] > acc[k1]
    return out


def format_report(per_seed: dict[int, dict]) -> str:
    stages: list[str] = []
    for summary in per_seed.values():
        stages += [r["stage"] for r in summary["rows"] if r["stage"] not in stages]
    head = f"{'stage':<12}" + "".join(f"{'seed ' + str(s):>10}" for s in per_seed)
    lines = [head, "-" * len(head)]
    for stage in stages:
        cells = []
        for summary in per_seed.values():
            row = next((r for r in summary["rows"] if r["stage"] == stage), None)
            cells.append(f"{row['accuracy']:>10.3f}" if row and row["accuracy"] is not None else f"{'-':>10}")
        lines.append(f"{stage:<12}" + "".join(cells))
    lines.append("")
    checks = {s: orderings(summary) for s, summary in per_seed.items()}
    for name in ORDERINGS:
        held = [s for s, c in checks.items() if c[name]]
        known = [s for s, c in checks.items() if c[name] is not None]
        lines.append(f"{name:<24} holds on {len(held)} of {len(known)} seed(s)"
                     + (f" (fails on {', '.join(map(str, sorted(set(known) - set(held))))})" if len(held) < len(known) else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "examples" / "toy" / "em.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out-dir", default="runs/orderings")
    ap.add_argument("--report-only", action="store_true", help="only re-read the seeds already finished")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="EM config overrides for every seed")
    args = ap.parse_args()
    out = Path(args.out_dir)
    per_seed = {}
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}"
        if args.report_only:
            if (seed_dir / "summary.json").exists():
                per_seed[seed] = json.loads((seed_dir / "summary.json").read_text())
            continue
        per_seed[seed] = run_seed(args.config, seed_dir, seed, args.overrides)
    if not per_seed:
        sys.exit(f"no finished seed under {out}")
    print(format_report(per_seed))
    result = {"config": args.config, "overrides": args.overrides,
              "seeds": {s: {"rows": summary["rows"], "orderings": orderings(summary)} for s, summary in per_seed.items()}}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "orderings.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "orderings.json")


if __name__ == "__main__":
    main()

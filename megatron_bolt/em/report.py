"""The EM run's results: one row per stage from the files the stage wrote, summary.json, a table and
accuracy/IWAE plots. Reads outputs only, so it can be rerun on a finished (or half-finished) run."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_bolt.atomic import atomic_path, atomic_write_json


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def stage_row(label: str, name: str, stage_dir: Path) -> dict:
    """Accuracy (eval/accuracy.json), IWAE bounds (iwae.json) and the last training loss of a stage."""
    acc = _read_json(stage_dir / "eval" / "accuracy.json")
    iwae = _read_json(stage_dir / "iwae.json")
    metrics = stage_dir / "train" / "metrics.jsonl"
    last = json.loads(metrics.read_text().splitlines()[-1]) if metrics.exists() else {}
    return {
        "method": label, "stage": name, "accuracy": acc.get("accuracy"), "correct": acc.get("correct"),
        "n": acc.get("n"), "iwae_per_chunk": iwae.get("iwae_per_chunk"),
        "iwae_per_token": iwae.get("iwae_per_token"), "final_train_loss": last.get("loss"),
    }


def write_report(root: Path, task: str, stages: list[tuple[str, str, Path]], ns: list[int]) -> dict:
    """summary.json, accuracy.png and iwae.png under `root` for `stages` = [(label, name, dir)]."""
    rows = [stage_row(label, name, d) for label, name, d in stages]
    summary = {"output_dir": str(root), "task": task, "rows": rows}
    atomic_write_json(root / "summary.json", summary)
    plot(rows, root, ns)
    return summary


def format_table(rows: list[dict], ns: list[int]) -> str:
    head = f"{'method':<18} {'accuracy':>9} " + " ".join(f"{'IWAE n=' + str(n):>11}" for n in ns)
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        iw = r["iwae_per_chunk"] or {}
        cells = " ".join(f"{iw[str(n)]:>11.2f}" if str(n) in iw else f"{'-':>11}" for n in ns)
        lines.append(f"{r['method']:<18} {acc:>9} {cells}")
    lines.append("IWAE: nats per validation chunk (higher is better); accuracy: few-shot, greedy, latent space "
                 "(raw baseline: plain few-shot).")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, ns: list[int]) -> None:
    """accuracy.png and iwae.png: one point per stage, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["method"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(len(rows)), [r["accuracy"] or 0.0 for r in rows], marker="o")
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_title("BoLT EM: evaluation accuracy per stage")
    _save(fig, out / "accuracy.png")
    latent_rows = [(i, r) for i, r in enumerate(rows) if r["iwae_per_chunk"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for n in ns:
        ax.plot([i for i, _ in latent_rows], [r["iwae_per_chunk"][str(n)] for _, r in latent_rows], marker="o",
                label=f"n={n}")
    ax.set_xticks([i for i, _ in latent_rows], [r["method"] for _, r in latent_rows], rotation=20, ha="right")
    ax.set_ylabel("IWAE bound (nats / chunk)")
    ax.set_title("BoLT EM: IWAE bound on validation chunks")
    ax.legend()
    _save(fig, out / "iwae.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)

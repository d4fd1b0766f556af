"""`bolt em CONFIG.yaml [key=value ...]`: the BoLT EM loop of method.md, end to end and resumable.

    data/        corpus (warm / rest / valid documents), tokenizer, raw .bin/.idx, chunk stores
    raw/         (optional) baseline: the same documents without latents, the same training budget
    warmstart/   teacher latents for the warm documents -> merge -> train -> export -> eval, IWAE
    iter{n}/     E-step on the rest with iteration n-1's model (n = 1: the warm-start model) ->
                 merge -> train on warm + rest latents -> export -> eval, IWAE
    iter{N}_k{K}/  (ablation) the last iteration again with K samples per chunk
    summary.json, accuracy.png, iwae.png

Every step is a `bolt` command run as a subprocess (its output goes to `<stage>/logs/<step>.log`)
and leaves `<stage>/.done/<step>` when it succeeds; re-running the command skips finished steps and
resumes the first unfinished one (training and the E-step resume inside themselves; steps whose
outputs are not resumable are cleaned and redone).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from megatron_bolt.config import EMConfig
from megatron_bolt.errors import UserError

TEXT_KEY = "text"
# Commands that set up torch.distributed / Megatron's global state run in their own process; the
# others run in this one, which saves a few seconds of imports per step.
SUBPROCESS_COMMANDS = ("train", "convert")


def _call_in_process(args: list[str], out) -> int:
    from megatron_bolt.cli import main

    argv = sys.argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return main(args)
    except SystemExit as exc:  # argparse errors
        return int(exc.code or 0)
    finally:
        sys.argv = argv


class Stage:
    """One directory of the run (raw, warmstart, iter1, ...) and its step markers."""

    def __init__(self, root: Path, name: str):
        self.name, self.dir = name, root / name
        self.hf = self.dir / "hf"
        self.checkpoints = self.dir / "train" / "checkpoints"
        self.latents = self.dir / "latents.zarr"
        self.merged = self.dir / "data" / "merged"

    def done(self, step: str) -> bool:
        return (self.dir / ".done" / step).exists()

    def mark(self, step: str) -> None:
        (self.dir / ".done").mkdir(parents=True, exist_ok=True)
        (self.dir / ".done" / step).touch()

    def log(self, step: str) -> Path:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        return self.dir / "logs" / f"{step}.log"


class EMDriver:
    def __init__(self, cfg: EMConfig):
        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        self.data = self.root / "data"
        self.tokenizer_dir = self.data / "tokenizer"
        self.repo = Path(__file__).resolve().parents[2]

    # ------------------------------------------------------------------ running steps
    def bolt(self, stage: Stage, step: str, args: list[str], clean: tuple[Path, ...] = ()) -> str:
        """Run `bolt <args>` once: skipped when marked done; returns the log's last line."""
        log = stage.log(step)
        if stage.done(step):
            return ""
        for path in clean:
            shutil.rmtree(path, ignore_errors=True)
        print(f"[em] {stage.name:<10} {step:<10} ... (log: {log})", flush=True)
        start = time.perf_counter()
        with open(log, "a") as out:
            out.write(f"$ bolt {' '.join(args)}\n")
            out.flush()
            if args[0] in SUBPROCESS_COMMANDS:
                code = subprocess.call([sys.executable, "-m", "megatron_bolt", *args], stdout=out, stderr=subprocess.STDOUT)
            else:
                code = _call_in_process(args, out)
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip() and "\r" not in x]
        if code != 0:
            tail = "\n".join("    " + x for x in lines[-8:])
            raise UserError(f"{stage.name}/{step} failed with exit code {code}; last lines of {log}:\n{tail}")
        stage.mark(step)
        last = lines[-1] if lines else ""
        print(f"[em] {stage.name:<10} {step:<10} done in {time.perf_counter() - start:5.1f}s | {last[:110]}", flush=True)
        return last

    # ------------------------------------------------------------------ data
    def prepare(self) -> None:
        stage = Stage(self.root, "data")
        if stage.done("prepare"):
            return
        c = self.cfg.corpus
        self.data.mkdir(parents=True, exist_ok=True)
        if c.source == "toy":
            from megatron_bolt.toy.world import make_documents, write_jsonl

            s = self.cfg.seed
            sets = {"warm": (c.toy_warm_docs, 1), "rest": (c.toy_rest_docs, 2), "valid": (c.toy_valid_docs, 3)}
            inputs = {}
            for name, (n, offset) in sets.items():
                docs = make_documents(n, seed=1000 * s + offset)
                inputs[name] = [str(write_jsonl(self.data / f"{name}.jsonl", [{TEXT_KEY: d} for d in docs]))]
            key = TEXT_KEY
        else:
            inputs = {"warm": c.warm, "rest": c.rest, "valid": c.valid or c.rest[:1]}
            key = c.json_key
        if c.tokenizer:
            tokenizer = c.tokenizer
        else:
            all_files = [f for files in inputs.values() for f in files]
            self.bolt(stage, "tokenizer", ["tokenizer", "train", "--input", *all_files, "--vocab-size",
                                           str(c.tokenizer_vocab_size), "--out", str(self.tokenizer_dir)],
                      clean=(self.tokenizer_dir,))
            tokenizer = str(self.tokenizer_dir)
        for name, files in inputs.items():
            self.bolt(stage, f"preprocess-{name}", [
                "preprocess", "--input", *files, "--json-keys", key, "--output-prefix", str(self.data / name),
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
                "--chunk-store", str(self.data / f"{name}_chunks.zarr"), "--no-progress",
                "--chunk-poisson-mean", str(c.chunk_poisson_mean),
            ], clean=(self.data / f"{name}_chunks.zarr",))
        (self.data / "tokenizer_path").write_text(tokenizer)
        stage.mark("prepare")

    @property
    def tokenizer(self) -> str:
        return (self.data / "tokenizer_path").read_text().strip()

    def chunks(self, name: str) -> str:
        return str(self.data / f"{name}_chunks.zarr")

    # ------------------------------------------------------------------ the pieces of a stage
    def merge(self, stage: Stage, chunks: str, latents: Path | None, prefix: Path) -> None:
        m = self.cfg.merge
        args = ["merge", "--chunks", chunks, "--output-prefix", str(prefix), "--epochs", str(m.epochs),
                "--posterior-prob", str(m.posterior_prob), "--raw-mix", str(m.raw_mix),
                "--empty-latents", m.empty_latents,
                "--seed", str(self.cfg.seed), "--quiet"]
        if latents is not None:
            args += ["--latents", str(latents)]
        self.bolt(stage, f"merge-{prefix.name}", args)

    @property
    def train_config_path(self) -> str:
        config = self.cfg.train_config
        if not Path(config).is_file() and (self.repo / config).is_file():
            config = str(self.repo / config)
        return config

    @property
    def base_steps(self) -> int:
        from megatron_bolt.config import load_config

        return load_config(self.train_config_path, self.cfg.train_overrides).train.steps

    @property
    def warm_steps(self) -> int:
        return self.cfg.warmstart.train_steps or self.base_steps

    def train(self, stage: Stage, prefixes: list[Path], start: Stage | None, steps: int | None = None) -> None:
        """Train on the blend of `prefixes`, from `start`'s weights (or train_config's start), for
        `steps` steps (None: train_config's)."""
        from megatron_bolt.tokenizer import load_tokenizer

        config = self.train_config_path
        blend = []
        for p in prefixes:  # Megatron blend weights: each dataset in proportion to its size
            blend += [os.path.getsize(f"{p}_text_document.bin"), f"{p}_text_document"]
        overrides = [
            f"output_dir={stage.dir / 'train'}", f"checkpoint.dir={stage.checkpoints}",
            f"data.prefixes={json.dumps(blend)}", "data.split=100,0,0",
            f"data.cache_dir={stage.dir / 'train' / 'data_cache'}",
            f"model.vocab_size={load_tokenizer(self.tokenizer).vocab_size}",
        ]
        if start is not None:  # restart = continue: weights of the previous model, fresh optimizer
            overrides += [f"checkpoint.load={start.checkpoints}", "checkpoint.finetune=true"]
        if steps is not None:
            overrides.append(f"train.steps={steps}")
        self.bolt(stage, "train", ["train", config, *self.cfg.train_overrides, *overrides,
                                   "--nproc-per-node", str(self.cfg.nproc_per_node)])

    def export(self, stage: Stage) -> None:
        self.bolt(stage, "export", ["convert", "mcore-to-hf", "--ckpt", str(stage.checkpoints), "--out",
                                    str(stage.hf), "--tokenizer", self.tokenizer], clean=(stage.hf,))

    def evaluate(self, stage: Stage, fmt: str) -> None:
        e = self.cfg.eval
        args = ["eval", "--model", str(stage.hf), "--task", e.task, "--format", fmt,
                "--out", str(stage.dir / "eval"), "--max-new-tokens", str(e.max_new_tokens)]
        if e.shots is not None:
            args += ["--shots", str(e.shots)]
        if e.data:
            args += ["--data", e.data]
        if e.limit:
            args += ["--limit", str(e.limit)]
        self.bolt(stage, "eval", args, clean=(stage.dir / "eval",))

    def iwae(self, stage: Stage) -> None:
        s = self.cfg.estep
        self.bolt(stage, "iwae", [
            "iwae", "--model", str(stage.hf), "--chunks", self.chunks("valid"),
            "--samples", ",".join(str(n) for n in self.cfg.iwae_samples), "--prefix-chunks", str(s.prefix_chunks),
            "--max-latent-tokens", str(s.max_latent_tokens), "--seed", str(self.cfg.seed), "--quiet",
            "--json", str(stage.dir / "iwae.json"), *s.args,
        ])

    def finish(self, stage: Stage, fmt: str = "latent") -> None:
        self.export(stage)
        self.evaluate(stage, fmt)
        if fmt == "latent":
            self.iwae(stage)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg = self.cfg
        self.root.mkdir(parents=True, exist_ok=True)
        self.record_config()
        self.prepare()
        stages: list[tuple[str, Stage]] = []
        if cfg.raw_baseline:
            raw = Stage(self.root, "raw")
            self.merge(raw, self.chunks("warm"), None, raw.dir / "data" / "warm")
            self.merge(raw, self.chunks("rest"), None, raw.dir / "data" / "rest")
            # Equal compute: with restart=continue the last model has trained warm start + every iteration.
            steps = self.warm_steps + cfg.iterations * self.base_steps if cfg.restart == "continue" else None
            self.train(raw, [raw.dir / "data" / "warm", raw.dir / "data" / "rest"], None, steps)
            self.finish(raw, fmt="raw")
            stages.append(("raw", raw))

        warm = Stage(self.root, "warmstart")
        w = cfg.warmstart
        self.bolt(warm, "teacher", [
            "warmstart", "--chunks", self.chunks("warm"), "--out", str(warm.latents), "--teacher", w.teacher,
            "--tokenizer", self.tokenizer, "--prefix-chunks", str(w.prefix_chunks), *w.args,
        ])
        self.merge(warm, self.chunks("warm"), warm.latents, warm.merged)
        self.train(warm, [warm.merged], None, w.train_steps)
        self.finish(warm)
        stages.append(("warmstart", warm))

        previous = warm
        for n in range(1, cfg.iterations + 1):
            it = Stage(self.root, f"iter{n}")
            self.iteration(it, previous, warm, cfg.estep.samples, n)
            stages.append((f"iter{n} (K={cfg.estep.samples})", it))
            if n == cfg.iterations:
                for k in cfg.ablation_samples:
                    ab = Stage(self.root, f"iter{n}_k{k}")
                    self.iteration(ab, previous, warm, k, n)
                    stages.append((f"iter{n} (K={k})", ab))
            previous = it
        return self.summarize(stages)

    def record_config(self) -> None:
        """Keep the config the run started with; on resume, say which keys changed since."""
        path, now = self.root / "em_config.json", asdict(self.cfg)
        if path.exists():
            before = json.loads(path.read_text())
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if changed:
                print(f"[em] note: {', '.join(changed)} changed since this run started ({path}); finished steps "
                      "are kept as they are", flush=True)
            return
        path.write_text(json.dumps(now, indent=2))

    def iteration(self, it: Stage, previous: Stage, warm: Stage, samples: int, n: int) -> None:
        s = self.cfg.estep
        self.bolt(it, "estep", [
            "estep", "--model", str(previous.hf), "--chunks", self.chunks("rest"), "--out", str(it.latents),
            "--samples", str(samples), "--prefix-chunks", str(s.prefix_chunks),
            "--max-latent-tokens", str(s.max_latent_tokens), "--seed", str(1000 * self.cfg.seed + n), "--quiet",
            *s.args,
        ])
        self.merge(it, self.chunks("rest"), it.latents, it.merged)
        self.train(it, [warm.merged, it.merged], previous if self.cfg.restart == "continue" else None)
        self.finish(it)

    # ------------------------------------------------------------------ results
    def summarize(self, stages: list[tuple[str, Stage]]) -> dict:
        rows = []
        for label, stage in stages:
            acc = _read_json(stage.dir / "eval" / "accuracy.json")
            iwae = _read_json(stage.dir / "iwae.json")
            metrics = stage.dir / "train" / "metrics.jsonl"
            last = json.loads(metrics.read_text().splitlines()[-1]) if metrics.exists() else {}
            rows.append({
                "method": label, "stage": stage.name, "accuracy": acc.get("accuracy"), "correct": acc.get("correct"),
                "n": acc.get("n"), "iwae_per_chunk": iwae.get("iwae_per_chunk"),
                "iwae_per_token": iwae.get("iwae_per_token"), "final_train_loss": last.get("loss"),
            })
        summary = {"output_dir": str(self.root), "task": self.cfg.eval.task, "rows": rows}
        tmp = self.root / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.root / "summary.json")
        print(format_table(rows, self.cfg.iwae_samples))
        plot(rows, self.root, self.cfg.iwae_samples)
        return summary


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


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
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
    latent_rows = [(i, r) for i, r in enumerate(rows) if r["iwae_per_chunk"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for n in ns:
        ax.plot([i for i, _ in latent_rows], [r["iwae_per_chunk"][str(n)] for _, r in latent_rows], marker="o",
                label=f"n={n}")
    ax.set_xticks([i for i, _ in latent_rows], [r["method"] for _, r in latent_rows], rotation=20, ha="right")
    ax.set_ylabel("IWAE bound (nats / chunk)")
    ax.set_title("BoLT EM: IWAE bound on validation chunks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "iwae.png", dpi=100)
    plt.close(fig)

"""`bolt em CONFIG.yaml [key=value ...]`: the BoLT EM loop of method.md, end to end and resumable.

    data/        corpus (warm / rest / valid documents), tokenizer, raw .bin/.idx, chunk stores
    raw/         (optional) baseline: the same documents without latents, the same training budget
    warmstart/   teacher latents for the warm documents -> merge -> train -> export -> eval, IWAE
    iter{n}/     E-step on the rest with iteration n-1's model (n = 1: the warm-start model) ->
                 merge -> train on warm + rest latents -> export -> eval, IWAE
    iter{N}_k{K}/  (ablation) the last iteration again with K samples per chunk
    summary.json, accuracy.png, iwae.png   (em/report.py)

Each step is a library call with typed options (preprocess, warmstart, estep, merge, eval, iwae),
logged to `<stage>/logs/<step>.log` through the `megatron_bolt` logger. The two steps that need a
process group of their own, training and the HF export, run as child processes through
`runtime.relaunch`, their output going to the same log. A step that succeeds leaves
`<stage>/.done/<step>`; re-running the command skips finished steps and resumes the first
unfinished one (training and the E-step resume inside themselves; steps whose outputs are not
resumable are cleaned and redone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from megatron_bolt import runtime
from megatron_bolt.atomic import atomic_write_json, atomic_write_text
from megatron_bolt.config import EMConfig, EStepConfig, load_config
from megatron_bolt.em import report
from megatron_bolt.errors import UserError

TEXT_KEY = "text"
log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def step_log(path: Path) -> Iterator[None]:
    """Records of the `megatron_bolt` loggers go (also) to `path` while a step runs in this process."""
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("megatron_bolt")
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _tail(path: Path, n: int = 8) -> str:
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip() and "\r" not in x]
    return "\n".join("    " + x for x in lines[-n:])


class EMDriver:
    def __init__(self, cfg: EMConfig):
        self.cfg = cfg
        self.root = Path(cfg.output_dir)
        self.data = self.root / "data"
        self.tokenizer_dir = self.data / "tokenizer"
        self.repo = Path(__file__).resolve().parents[2]

    # ------------------------------------------------------------------ running steps
    def step(self, stage: Stage, step: str, fn: Callable[[], str], clean: tuple[Path, ...] = ()) -> None:
        """Run `fn` (in this process; it returns a one-line summary) once: skipped when marked done."""
        if stage.done(step):
            return
        for path in clean:
            shutil.rmtree(path, ignore_errors=True)
        path = stage.log(step)
        print(f"[em] {stage.name:<10} {step:<10} ... (log: {path})", flush=True)
        start = time.perf_counter()
        with step_log(path):
            log.info("%s/%s: start", stage.name, step)
            try:
                summary = fn()
            except Exception as exc:
                log.exception("%s/%s failed", stage.name, step)
                if isinstance(exc, UserError):
                    raise UserError(f"{stage.name}/{step} failed: {exc} (log: {path})") from None
                raise
            log.info("%s/%s: %s", stage.name, step, summary)
        stage.mark(step)
        print(f"[em] {stage.name:<10} {step:<10} done in {time.perf_counter() - start:5.1f}s | {summary[:110]}",
              flush=True)

    def launch(self, stage: Stage, step: str, argv: list[str], nproc: int = 1, clean: tuple[Path, ...] = ()) -> None:
        """Run `bolt <argv>` as `nproc` child ranks (runtime.relaunch), output to the step's log."""

        def child() -> str:
            path = stage.log(step)
            with open(path, "a") as out:
                out.write(f"$ bolt {' '.join(argv)}\n")
                out.flush()
                code = runtime.relaunch(argv, nproc, log=out)
            if code != 0:
                raise UserError(f"exit code {code}; last lines of the log:\n{_tail(path)}")
            lines = _tail(path, 1).strip()
            return lines

        self.step(stage, step, child, clean)

    # ------------------------------------------------------------------ data
    def prepare(self) -> None:
        from megatron_bolt.data.preprocess import PreprocessConfig, preprocess

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
            from megatron_bolt.tokenizer import train_bpe_tokenizer

            files = [f for group in inputs.values() for f in group]

            def train_tokenizer() -> str:
                tok = train_bpe_tokenizer(files, c.tokenizer_vocab_size, str(self.tokenizer_dir), key=key)
                return f"wrote {self.tokenizer_dir} (vocab {tok.vocab_size})"

            self.step(stage, "tokenizer", train_tokenizer, clean=(self.tokenizer_dir,))
            tokenizer = str(self.tokenizer_dir)
        for name, files in inputs.items():
            pcfg = PreprocessConfig(
                inputs=files, output_prefix=str(self.data / name), tokenizer_model=tokenizer,
                tokenizer_type="HuggingFaceTokenizer", json_keys=[key], chunk_store=self.chunks(name),
                progress=False, chunk_poisson_mean=c.chunk_poisson_mean,
            )

            def run_preprocess(pcfg: PreprocessConfig = pcfg) -> str:
                result = preprocess(pcfg)
                for line in result.skipped_lines():
                    log.warning(line.strip())
                return f"{result.summary()}; dtype {result.dtype}"

            self.step(stage, f"preprocess-{name}", run_preprocess, clean=(Path(self.chunks(name)),))
        atomic_write_text(self.data / "tokenizer_path", tokenizer)
        stage.mark("prepare")

    @property
    def tokenizer(self) -> str:
        return (self.data / "tokenizer_path").read_text().strip()

    def chunks(self, name: str) -> str:
        return str(self.data / f"{name}_chunks.zarr")

    # ------------------------------------------------------------------ the pieces of a stage
    def merge(self, stage: Stage, chunks: str, latents: Path | None, prefix: Path) -> None:
        from megatron_bolt.data.merge import merge_latents

        m = self.cfg.merge

        def run_merge() -> str:
            return merge_latents(
                chunks, None if latents is None else str(latents), str(prefix), epochs=m.epochs,
                posterior_prob=m.posterior_prob, raw_mix=m.raw_mix, seed=self.cfg.seed,
                empty_latents=m.empty_latents, progress=False,
            ).format()

        self.step(stage, f"merge-{prefix.name}", run_merge)

    @property
    def train_config_path(self) -> str:
        config = self.cfg.train_config
        if not Path(config).is_file() and (self.repo / config).is_file():
            config = str(self.repo / config)
        return config

    @property
    def base_steps(self) -> int:
        return load_config(self.train_config_path, self.cfg.train_overrides).train.steps

    @property
    def warm_steps(self) -> int:
        return self.cfg.warmstart.train_steps or self.base_steps

    def train(self, stage: Stage, prefixes: list[Path], start: Stage | None, steps: int | None = None) -> None:
        """Train on the blend of `prefixes`, from `start`'s weights (or train_config's start), for
        `steps` steps (None: train_config's). The resolved run config is written to
        `<stage>/train/config.yaml` and trained by `bolt train` in child ranks."""
        if stage.done("train"):
            return
        from megatron_bolt.tokenizer import load_tokenizer

        cfg = load_config(self.train_config_path, self.cfg.train_overrides)
        blend: list = []
        for p in prefixes:  # Megatron blend weights: each dataset in proportion to its size
            blend += [os.path.getsize(f"{p}_text_document.bin"), f"{p}_text_document"]
        cfg.output_dir = str(stage.dir / "train")
        cfg.checkpoint.dir = str(stage.checkpoints)
        cfg.data.prefixes = blend
        cfg.data.split = "100,0,0"
        cfg.data.cache_dir = str(stage.dir / "train" / "data_cache")
        cfg.model.vocab_size = load_tokenizer(self.tokenizer).vocab_size
        if start is not None:  # restart = continue: weights of the previous model, fresh optimizer
            cfg.checkpoint.load = str(start.checkpoints)
            cfg.checkpoint.finetune = True
        if steps is not None:
            cfg.train.steps = steps
        config = stage.dir / "train" / "config.yaml"
        atomic_write_text(config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.launch(stage, "train", ["train", str(config), "--nproc-per-node", str(self.cfg.nproc_per_node)],
                    nproc=self.cfg.nproc_per_node)

    def export(self, stage: Stage) -> None:
        self.launch(stage, "export", ["convert", "mcore-to-hf", "--ckpt", str(stage.checkpoints), "--out",
                                      str(stage.hf), "--tokenizer", self.tokenizer], clean=(stage.hf,))

    def evaluate(self, stage: Stage, fmt: str) -> None:
        from megatron_bolt.evaluation.evaluate import evaluate, summary_line

        e = self.cfg.eval

        def run_eval() -> str:
            result = evaluate(str(stage.hf), e.task, e.data, shots=e.shots, limit=e.limit or None,
                              out_dir=str(stage.dir / "eval"), fmt=fmt, max_new_tokens=e.max_new_tokens)
            return summary_line(result)

        self.step(stage, "eval", run_eval, clean=(stage.dir / "eval",))

    def iwae(self, stage: Stage) -> None:
        from megatron_bolt.latents.estep import open_engine, run_iwae
        from megatron_bolt.stores.chunk_store import open_chunk_store

        ns = sorted(set(self.cfg.iwae_samples))
        settings = dataclasses.replace(self.cfg.estep, samples=max(ns), seed=self.cfg.seed)

        def run() -> str:
            chunks = open_chunk_store(self.chunks("valid"))
            engine = open_engine(str(stage.hf), self.cfg.engine)
            try:
                result = run_iwae(engine, chunks, ns, settings, progress=False)
            finally:
                engine.close()
            result["model"] = os.path.abspath(stage.hf)
            atomic_write_json(stage.dir / "iwae.json", result)
            return ", ".join(f"n={n} {result['iwae_per_chunk'][str(n)]:.4f}" for n in ns) + " nats/chunk"

        self.step(stage, "iwae", run)

    def finish(self, stage: Stage, fmt: str = "latent") -> None:
        self.export(stage)
        self.evaluate(stage, fmt)
        if fmt == "latent":
            self.iwae(stage)

    def warm_start(self, warm: Stage) -> None:
        from megatron_bolt.latents.teachers import make_teacher
        from megatron_bolt.latents.warmstart import run_warmstart
        from megatron_bolt.stores.latent_store import existing_block_size

        w = self.cfg.warmstart

        def run() -> str:
            teacher = make_teacher(w.teacher, w.openai)
            try:
                return run_warmstart(
                    self.chunks("warm"), str(warm.latents), teacher, tokenizer_path=self.tokenizer,
                    prefix_chunks=w.prefix_chunks, block_size=existing_block_size(str(warm.latents)) or 256,
                    progress=False,
                ).line()
            finally:
                teacher.close()

        self.step(warm, "teacher", run)

    def estep(self, it: Stage, previous: Stage, settings: EStepConfig) -> None:
        from megatron_bolt.latents.estep import open_engine, open_or_create_store, run_estep
        from megatron_bolt.stores.chunk_store import open_chunk_store
        from megatron_bolt.stores.latent_store import existing_block_size

        def run() -> str:
            chunks = open_chunk_store(self.chunks("rest"))
            meta = {"engine": self.cfg.engine.engine, "model": os.path.abspath(previous.hf),
                    "chunks": self.chunks("rest")}
            engine = open_engine(str(previous.hf), self.cfg.engine)
            try:
                store = open_or_create_store(str(it.latents), chunks.num_chunks, settings,
                                             existing_block_size(str(it.latents)) or 256, meta)
                totals = run_estep(engine, chunks, store, settings, block_meta={"engine": self.cfg.engine.engine},
                                   progress=False)
            finally:
                engine.close()
            log.info("%s", store.status())
            return totals.line()

        self.step(it, "estep", run)

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
        self.warm_start(warm)
        self.merge(warm, self.chunks("warm"), warm.latents, warm.merged)
        self.train(warm, [warm.merged], None, cfg.warmstart.train_steps)
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
        summary = report.write_report(self.root, cfg.eval.task, [(label, s.name, s.dir) for label, s in stages],
                                      cfg.iwae_samples)
        print(report.format_table(summary["rows"], cfg.iwae_samples), flush=True)
        return summary

    def record_config(self) -> None:
        """Keep the config the run started with; on resume, say which keys changed since."""
        path, now = self.root / "em_config.json", dataclasses.asdict(self.cfg)
        if path.exists():
            before = json.loads(path.read_text())
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if changed:
                print(f"[em] note: {', '.join(changed)} changed since this run started ({path}); finished steps "
                      "are kept as they are", flush=True)
            return
        atomic_write_json(path, now)

    def iteration(self, it: Stage, previous: Stage, warm: Stage, samples: int, n: int) -> None:
        settings = dataclasses.replace(self.cfg.estep, samples=samples, seed=1000 * self.cfg.seed + n)
        self.estep(it, previous, settings)
        self.merge(it, self.chunks("rest"), it.latents, it.merged)
        self.train(it, [warm.merged, it.merged], previous if self.cfg.restart == "continue" else None)
        self.finish(it)

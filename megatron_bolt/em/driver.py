"""`bolt em CONFIG.yaml [key=value ...]`: the BoLT EM loop of method.md, end to end and resumable.

    data/        corpus (warm / rest / valid documents), tokenizer, raw .bin/.idx, chunk stores
    warmstart/   teacher latents for the warm documents -> merge -> train -> export -> eval, IWAE
    iter{n}/     E-step on the rest with iteration n-1's model (n = 1: the warm-start model) ->
                 merge -> train -> export -> eval, IWAE
    iter{N}_k{K}/  (ablation) the last iteration again with K samples per chunk
    raw/         the raw baselines' data: the same documents without latents
    raw_tokens/, raw_flops/   raw baselines, token- and FLOPs-matched to the latent run
    plan.json, summary.json, accuracy.png, iwae.png   (em/plan.py, em/report.py)

What each stage trains on, from which start and for how long is em/plan.py's plan (`bolt em
--plan` prints it): by default the reference's protocol, every stage from the base model
(`restart: base`), each iteration on its own E-step latents (`iteration_data: new`), every merge
with as many epochs of fresh prior/posterior forms as its training reads (`merge.epochs: null`).

Each step is a library call with typed options (preprocess, warmstart, estep, merge, eval, iwae),
logged to `<stage>/logs/<step>.log` through the `megatron_bolt` logger. Training, which needs a
process group of its own, runs as child ranks through `runtime.relaunch`, its output going to the
same log; its rank 0 also writes the stage's HF export when the training is done
(`bolt train --export-hf`), which marks the export step done as well. A step that succeeds leaves
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
from megatron_bolt.config import EMConfig, EStepConfig, RunConfig, load_config
from megatron_bolt.data.merge import planned_train_tokens, read_summary
from megatron_bolt.em import report
from megatron_bolt.em.plan import (
    Training,
    corpus_of,
    format_plan,
    iteration_stages,
    latent_trainings,
    matched_run,
    raw_share,
    raw_trainings,
    train_flops,
)
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


def _stopped_early(stage: Stage, steps: int) -> str | None:
    """Why the stage's training, which exited 0, is not finished: a save-and-exit signal (SIGTERM,
    train.exit_signal) ends `bolt train` with exit code 0 after saving, as Megatron-LM's does."""
    from megatron_bolt.training.checkpoint_layout import latest_step

    saved = latest_step(stage.checkpoints)
    if saved is not None and saved >= steps:
        return None
    return (f"training stopped at step {saved or 0} of {steps} (a save-and-exit signal?): "
            "run the same command again to resume it")


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

    def launch(self, stage: Stage, step: str, argv: list[str], nproc: int = 1, clean: tuple[Path, ...] = (),
               finished: Callable[[], str | None] | None = None) -> None:
        """Run `bolt <argv>` as `nproc` child ranks (runtime.relaunch), output to the step's log.
        `finished()` returns why a child that exited 0 did not finish its work (None: it did), and
        then the step is not marked done."""

        def child() -> str:
            path = stage.log(step)
            with open(path, "a") as out:
                out.write(f"$ bolt {' '.join(argv)}\n")
                out.flush()
                code = runtime.relaunch(argv, nproc, log=out)
            if code != 0:
                raise UserError(f"exit code {code}; last lines of the log:\n{_tail(path)}")
            unfinished = finished() if finished else None
            if unfinished:
                raise UserError(unfinished)
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
            inputs = {"warm": c.warm, "rest": c.rest, "valid": c.valid}
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
                # The reference's validation protocol cuts IWAE documents into uniform chunks.
                chunking="uniform" if name == "valid" else "random",
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
    def merge(self, dataset: str, min_tokens: int) -> None:
        """Merge one dataset of the plan ("stage/name", see `dataset_sources`) with as many epochs
        as `min_tokens` training tokens read (or `merge.epochs` when set)."""
        from megatron_bolt.data.merge import merge_latents

        m = self.cfg.merge
        stage_name, name = dataset.split("/")
        chunks, latents = self.dataset_sources(dataset)
        prefix = self.prefix(dataset)

        def run_merge() -> str:
            return merge_latents(
                chunks, latents, str(prefix), epochs=m.epochs, min_tokens=None if m.epochs else min_tokens,
                posterior_prob=m.posterior_prob, raw_mix=m.raw_mix, seed=self.cfg.seed,
                empty_latents=m.empty_latents, progress=False,
            ).format()

        self.step(Stage(self.root, stage_name), f"merge-{name}", run_merge)

    def prefix(self, dataset: str) -> Path:
        """Where a merged dataset of the plan lives: `stage/name` -> output_dir/stage/data/name."""
        stage_name, name = dataset.split("/")
        return self.root / stage_name / "data" / name

    def dataset_sources(self, dataset: str) -> tuple[str, str | None]:
        """(chunk store, latent store or None) of a merged dataset of the plan."""
        stage_name, name = dataset.split("/")
        corpus = corpus_of(dataset)
        if stage_name == "raw":
            return self.chunks(corpus), None
        latents = Stage(self.root, "warmstart" if corpus == "warm" else stage_name).latents
        return self.chunks(corpus), str(latents)

    @property
    def train_config_path(self) -> str:
        config = self.cfg.train_config
        if not Path(config).is_file() and (self.repo / config).is_file():
            config = str(self.repo / config)
        return config

    def run_configs(self) -> tuple[RunConfig, RunConfig]:
        """(the iterations' and baselines' training config, the warm start's): train_config with
        train_overrides, and for the warm start warmstart.train_overrides and .train_steps on top.
        The vocabulary is the tokenizer's once the data is prepared."""
        w = self.cfg.warmstart
        warm_extra = [*w.train_overrides, *([f"train.steps={w.train_steps}"] if w.train_steps else [])]
        base = load_config(self.train_config_path, self.cfg.train_overrides)
        warm = load_config(self.train_config_path, [*self.cfg.train_overrides, *warm_extra])
        if (self.data / "tokenizer_path").exists():
            from megatron_bolt.tokenizer import load_tokenizer

            base.model.vocab_size = warm.model.vocab_size = load_tokenizer(self.tokenizer).vocab_size
        return base, warm

    def plan(self) -> list[Training]:
        """Every training of the run (em/plan.py). The token-matched raw baseline appears once the
        data of the run it matches is merged (its budget depends on the raw share of that data)."""
        base, warm = self.run_configs()
        trainings = latent_trainings(self.cfg, base, warm)
        matched = matched_run(self.cfg, trainings)
        models = {t.stage: (warm if t.stage == "warmstart" else base).model for t in trainings}
        return trainings + raw_trainings(self.cfg, matched, models, base, self.raw_shares(matched))

    def raw_shares(self, matched: list[Training]) -> dict[str, float] | None:
        from megatron_bolt.data.merge import summary_path

        if not all(Path(summary_path(self.prefix(d))).exists() for t in matched for d in t.data):
            return None
        return {t.stage: raw_share([read_summary(self.prefix(d)) for d in t.data]) for t in matched}

    def plan_table(self) -> str:
        base, warm = self.run_configs()
        trainings = self.plan()
        flops = {t.stage: train_flops((warm if t.stage == "warmstart" else base).model, t.tokens) for t in trainings}
        lines = [format_plan(trainings, flops)]
        if "tokens" in self.cfg.raw_baselines and not any(t.stage == "raw_tokens" for t in trainings):
            lines.append("raw_tokens: planned once the data of the run it matches is merged (its raw share)")
        return "\n".join(lines)

    def write_plan(self, trainings: list[Training]) -> None:
        base, warm = self.run_configs()
        rows = [{**dataclasses.asdict(t), "tokens": t.tokens,
                 "train_flops": train_flops((warm if t.stage == "warmstart" else base).model, t.tokens)}
                for t in trainings]
        path, plan = self.root / "plan.json", json.loads(json.dumps({"trainings": rows}))
        if not path.exists() or json.loads(path.read_text()) != plan:  # a finished run's rerun writes nothing
            atomic_write_json(path, plan)

    def prepare_data(self, t: Training, trainings: list[Training]) -> None:
        """Merge the datasets `t` trains on, each with the epochs of the longest training using it."""
        for d in t.data:
            need = max(planned_train_tokens(u.steps, u.global_batch, u.seq_len) for u in trainings if d in u.data)
            self.merge(d, need)

    def train(self, t: Training) -> None:
        """Train one run of the plan: the blend of its merged datasets (weights: tokens per epoch, so
        every document is read equally often), from its start, for its steps. The resolved run
        config is written to `<stage>/train/config.yaml` and trained by `bolt train` in child ranks."""
        stage = Stage(self.root, t.stage)
        if stage.done("train"):
            return
        base, warm = self.run_configs()
        cfg = warm if t.stage == "warmstart" else base
        blend: list = []
        for d in t.data:
            s = read_summary(self.prefix(d))
            blend += [s.tokens / s.epochs, f"{self.prefix(d)}_text_document"]
        cfg.output_dir = str(stage.dir / "train")
        cfg.checkpoint.dir = str(stage.checkpoints)
        cfg.data.prefixes = blend
        cfg.data.split = "100,0,0"
        cfg.data.cache_dir = str(stage.dir / "train" / "data_cache")
        cfg.train.steps = t.steps
        if t.start is not None:  # restart = continue: weights of the previous model, fresh optimizer
            cfg.checkpoint.load = str(Stage(self.root, t.start).checkpoints)
            cfg.checkpoint.finetune = True
        config = stage.dir / "train" / "config.yaml"
        atomic_write_text(config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        # the HF export is made by the training's own rank 0 when it is done: one process start less
        self.launch(stage, "train", ["train", str(config), "--nproc-per-node", str(self.cfg.nproc_per_node),
                                     "--export-hf", str(stage.hf), "--export-tokenizer", self.tokenizer],
                    nproc=self.cfg.nproc_per_node, clean=(stage.hf,), finished=lambda: _stopped_early(stage, t.steps))
        if stage.hf.is_dir():
            stage.mark("export")

    def export(self, stage: Stage) -> None:
        """The HF export of a stage whose training step did not make one (a run of an older version)."""
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
        """The loop in the reference's order: warm start, the iterations (each E-step with the model
        before it), then the raw baselines, whose budgets match the finished latent run."""
        cfg = self.cfg
        self.root.mkdir(parents=True, exist_ok=True)
        self.record_config()
        self.prepare()
        trainings = {t.stage: t for t in self.plan() if not t.stage.startswith("raw_")}
        latent = list(trainings.values())
        stages: list[tuple[str, Stage]] = []

        warm = Stage(self.root, "warmstart")
        self.warm_start(warm)
        self.prepare_data(trainings["warmstart"], latent)
        self.train(trainings["warmstart"])
        self.finish(warm)
        stages.append(("warmstart", warm))

        for name, n, k in iteration_stages(cfg):
            it = Stage(self.root, name)
            previous = Stage(self.root, "warmstart" if n == 1 else f"iter{n - 1}")
            self.estep(it, previous, dataclasses.replace(cfg.estep, samples=k, seed=1000 * cfg.seed + n))
            self.prepare_data(trainings[name], latent)
            self.train(trainings[name])
            self.finish(it)
            stages.append((f"iter{n} (K={k})", it))

        plan = self.plan()  # now with the token-matched budget: the matched run's data is merged
        raw = [t for t in plan if t.stage.startswith("raw_")]
        raw_stages = []
        for t in raw:
            self.prepare_data(t, raw)
            self.train(t)
            stage = Stage(self.root, t.stage)
            self.finish(stage, fmt="raw")
            raw_stages.append(({"raw_tokens": "raw (tokens)", "raw_flops": "raw (FLOPs)"}[t.stage], stage))
        stages = raw_stages + stages
        self.write_plan(plan)
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

"""`bolt em` on a micro toy config: every stage's outputs, the summary, and resume after SIGKILLs
at several steps giving exactly the result of an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MICRO_EM_FULL, REPO, bolt, micro_em_args, scrubbed_env


def chosen_latents(store: Path) -> list[list[int]]:
    from megatron_bolt.stores.latent_store import LatentStore

    s = LatentStore.open(store, mode="r")
    return [np.asarray(s.chosen_latent(i)).tolist() for i in range(s.num_chunks)]


@pytest.mark.slow
def test_full_loop_with_baselines_and_ablation(micro_em_run):
    """The paper's protocol end to end: every training's inputs, start and length, and the merges'
    epochs, as each stage's resolved train config and merge summary record them."""
    check_paper_protocol_run(micro_em_run)


def check_paper_protocol_run(run: Path) -> None:
    import yaml

    from megatron_bolt.data.merge import planned_train_tokens, read_summary

    summary = json.loads((run / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == [
        "raw (tokens)", "raw (FLOPs)", "warmstart", "iter1 (K=2)", "iter2 (K=2)", "iter3 (K=2)", "iter3 (K=1)"]

    def trained(stage: str) -> dict:
        return yaml.safe_load((run / stage / "train" / "config.yaml").read_text())

    # every stage from train_config's start (no checkpoint.load), each on its own merged data only
    latent = ("warmstart", "iter1", "iter2", "iter3", "iter3_k1")
    data = {**{s: [f"{s}/data/merged"] for s in latent}, "raw_tokens": ["raw/data/rest"], "raw_flops": ["raw/data/rest"]}
    need: dict[str, int] = {}
    for stage, prefixes in data.items():
        cfg = trained(stage)
        assert cfg["data"]["prefixes"][1::2] == [f"{run / p}_text_document" for p in prefixes], stage
        assert cfg["checkpoint"]["load"] is None, stage
        for p in prefixes:
            t = cfg["train"]
            need[p] = max(need.get(p, 0), planned_train_tokens(t["steps"], t["global_batch"], cfg["model"]["seq_len"]))
    # each merged dataset holds what its longest training reads, in the fewest epochs of fresh forms
    for p, tokens in need.items():
        s = read_summary(run / p)
        assert s.tokens >= tokens and (s.epochs == 1 or s.tokens - 1.2 * s.tokens / s.epochs < tokens), p
    steps = {stage: trained(stage)["train"]["steps"] for stage in data}
    # warm start 6 steps, iterations train.steps (4); FLOPs-matched: one iteration's budget (same
    # model and batch); token-matched: the raw-text tokens (chunks, BOS, EOS) inside the last
    # iteration's data (each iteration restarts from the base model: one iteration is the budget)
    it = read_summary(run / "iter3" / "data" / "merged")
    share = (it.tokens - it.latent_tokens - it.special_tokens) / it.tokens
    assert 0 < share < 1
    assert steps == {"warmstart": 6, "iter1": 4, "iter2": 4, "iter3": 4, "iter3_k1": 4,
                     "raw_tokens": math.ceil(4 * share), "raw_flops": 4}
    plan = json.loads((run / "plan.json").read_text())["trainings"]
    assert [(t["stage"], t["steps"]) for t in plan] == list(steps.items())
    for row in summary["rows"]:
        preds = [json.loads(x) for x in (run / row["stage"] / "eval" / "predictions.jsonl").read_text().splitlines()]
        assert row["n"] == len(preds) and row["correct"] == sum(p["correct"] for p in preds)
        assert row["final_train_loss"] is not None
    assert summary["rows"][0]["iwae_per_chunk"] is None  # no latents in the raw baselines
    assert set(summary["rows"][2]["iwae_per_chunk"]) == {"1", "2"}
    for png in ("accuracy.png", "iwae.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    # the ablation sampled one latent per chunk, the main iteration two, from the same model
    from megatron_bolt.stores.latent_store import LatentStore

    assert LatentStore.open(run / "iter3_k1" / "latents.zarr", mode="r").samples == 1
    assert LatentStore.open(run / "iter3" / "latents.zarr", mode="r").samples == 2
    # the raw baselines' data holds no latent special tokens at all
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_bolt.tokenizer import LATENT_TOKENS, load_tokenizer

    tok = load_tokenizer(str(run / "data" / "tokenizer"))
    specials = {tok.token_to_id(t) for t in LATENT_TOKENS}
    raw = IndexedDataset(str(run / "raw" / "data" / "rest_text_document"))
    assert not specials & set(np.concatenate([raw[i] for i in range(len(raw))]).tolist())


@pytest.mark.slow
def test_rerun_of_a_finished_loop_does_nothing(micro_em_run):
    before = {p: p.stat().st_mtime_ns for p in micro_em_run.rglob("*") if p.is_file() and "summary" not in p.name
              and p.suffix != ".png"}
    cfg = micro_em_args(micro_em_run.parent, **MICRO_EM_FULL)
    proc = bolt("em", *cfg)
    assert "[em]" not in proc.stdout  # no step ran
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after


@pytest.mark.slow
def test_resume_after_kills_equals_uninterrupted(micro_em_run, tmp_path):
    """SIGKILL the whole process group while given steps run, re-run each time: the same results
    as the uninterrupted run (the shared one, whose warm start and first iteration do not depend
    on the later iterations, baselines and ablation it also runs)."""
    uninterrupted = micro_em_run
    cfg = micro_em_args(tmp_path, raw_baselines="[]", ablation_samples="[]")
    run = tmp_path / "run"
    env = scrubbed_env()
    # (step, seconds after its log appears): short in-process steps are killed at once, training
    # (child ranks, which also write the stage's HF export) well inside its run.
    kill_points = [("data/preprocess-rest", 0.0), ("warmstart/train", 3.0), ("iter1/estep", 0.3),
                   ("iter1/train", 1.5), ("iter1/eval", 0.1)]
    for point, delay in kill_points:
        stage, step = point.split("/")
        log = run / stage / "logs" / f"{step}.log"
        out_path = tmp_path / f"{stage}-{step}.out"
        with open(out_path, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "megatron_bolt", "em", *cfg], cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while not log.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, f"bolt em exited ({proc.returncode}) before the kill at {point}:\n" + \
            out_path.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if step == "train":  # it takes many seconds: the kill must have hit it mid-run
            assert not (run / stage / ".done" / step).exists(), f"{point} finished before the kill"
    bolt("em", *cfg, timeout=900)

    def rows(path: Path) -> list[dict]:
        out = json.loads((path / "summary.json").read_text())["rows"]
        for r in out:
            r.pop("stage")
        return out

    assert rows(run) == [r for r in rows(uninterrupted) if r["method"] in ("warmstart", "iter1 (K=2)")]
    for stage in ("warmstart", "iter1"):
        assert chosen_latents(run / stage / "latents.zarr") == chosen_latents(uninterrupted / stage / "latents.zarr")
        a = (run / stage / "data" / "merged_text_document.bin").read_bytes()
        assert a == (uninterrupted / stage / "data" / "merged_text_document.bin").read_bytes()
        preds = (run / stage / "eval" / "predictions.jsonl").read_text()
        assert preds == (uninterrupted / stage / "eval" / "predictions.jsonl").read_text()


def test_bad_em_config_is_one_line(tmp_path, capsys):
    from megatron_bolt.cli import main  # in-process: the same parser and checks as `bolt em`

    assert main(["em", *micro_em_args(tmp_path, **{"estep.sampels": 3})]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "bolt em: error: unknown config key 'estep.sampels' (valid: max_latent_tokens, prefix_chunks, samples, seed)"
    ]
    for key, value in (("restart", "sometimes"), ("warmstart.train_steps", 0), ("corpus.chunk_poisson_mean", -1),
                       ("iteration_data", "old"), ("raw_baselines", "[tokens, tokens]"), ("raw_baselines", "[steps]"),
                       ("merge.epochs", 0), ("engine.engine", "sglang"), ("estep.seed", 1)):
        assert main(["em", *micro_em_args(tmp_path, **{key: value})]) == 2
        err = capsys.readouterr().err
        assert key.replace("engine.engine", "engine.server") in err, err
        assert len(err.strip().splitlines()) == 1, err
    # a file corpus without held-out documents: the IWAE bound would be measured in-sample
    files = {"corpus.source": "files", "corpus.warm": "[w.jsonl]", "corpus.rest": "[r.jsonl]"}
    assert main(["em", *micro_em_args(tmp_path, **files)]) == 2
    err = capsys.readouterr().err
    assert "corpus.valid" in err and "held-out" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing started


# ------------------------------------------------------------------------------ the plan (in-process)
def _plan_configs(**em: object):
    from megatron_bolt.config import load_config, load_em_config

    cfg = load_em_config(REPO / "examples" / "toy" / "em.yaml", [f"{k}={v}" for k, v in em.items()])
    base = load_config(REPO / "examples" / "toy" / "train.yaml", ["train.steps=40"])
    warm = load_config(REPO / "examples" / "toy" / "train.yaml", ["train.steps=100", "train.global_batch=32"])
    return cfg, base, warm


def test_plan_paper_protocol_trains_each_iteration_from_base_on_its_own_latents():
    from megatron_bolt.em.plan import latent_trainings, matched_run, raw_trainings

    cfg, base, warm = _plan_configs(restart="base", iteration_data="new", iterations=3, ablation_samples="[1]",
                                    raw_baselines="[tokens, flops]")
    plan = latent_trainings(cfg, base, warm)
    assert [(t.stage, t.data, t.start, t.steps) for t in plan] == [
        ("warmstart", ("warmstart/merged",), None, 100),
        ("iter1", ("iter1/merged",), None, 40),
        ("iter2", ("iter2/merged",), None, 40),
        ("iter3", ("iter3/merged",), None, 40),
        ("iter3_k1", ("iter3_k1/merged",), None, 40),
    ]
    matched = matched_run(cfg, plan)
    assert [t.stage for t in matched] == ["iter3"]  # one iteration's budget, not the ablation's
    models = {t.stage: base.model for t in plan}
    raw = raw_trainings(cfg, matched, models, base, {"iter3": 0.25})
    assert [(t.stage, t.data, t.start, t.steps) for t in raw] == [
        ("raw_tokens", ("raw/rest",), None, 10),  # a quarter of the latent run's tokens are raw text
        ("raw_flops", ("raw/rest",), None, 40),  # same model and batch: the same steps
    ]
    # before the latent data is merged only the FLOPs-matched budget is known
    assert [t.stage for t in raw_trainings(cfg, matched, models, base, None)] == ["raw_flops"]


def test_plan_warm_plus_new_and_continue():
    from megatron_bolt.em.plan import latent_trainings, matched_run, raw_trainings

    cfg, base, warm = _plan_configs(restart="continue", iteration_data="warm+new", iterations=2,
                                    ablation_samples="[]", raw_baselines="[flops, tokens]")
    plan = latent_trainings(cfg, base, warm)
    assert [(t.stage, t.data, t.start) for t in plan] == [
        ("warmstart", ("warmstart/merged",), None),
        ("iter1", ("iter1/warm", "iter1/merged"), "warmstart"),
        ("iter2", ("iter2/warm", "iter2/merged"), "iter1"),
    ]
    matched = matched_run(cfg, plan)  # the last model has trained the whole chain
    assert [t.stage for t in matched] == ["warmstart", "iter1", "iter2"]
    models = {t.stage: base.model for t in plan}
    raw = raw_trainings(cfg, matched, models, base, {"warmstart": 0.5, "iter1": 0.5, "iter2": 0.5})
    per_step = base.train.global_batch * base.model.seq_len
    total = 100 * 32 * base.model.seq_len + 2 * 40 * per_step
    assert [(t.stage, t.data, t.steps) for t in raw] == [
        ("raw_flops", ("raw/warm", "raw/rest"), total // per_step),
        ("raw_tokens", ("raw/warm", "raw/rest"), total // per_step // 2),
    ]


def test_train_flops_counts_the_model_weights():
    """6 FLOPs per weight and token (plus attention) for the model Megatron builds, weights counted
    on an equivalent transformers Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_bolt.config import ModelConfig
    from megatron_bolt.em.plan import train_flops

    m = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=160,
                    vocab_size=300, seq_len=32)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2))
    weights = sum(mod.weight.numel() for mod in hf.modules() if isinstance(mod, torch.nn.Linear))
    attention = 2 * m.num_layers * m.seq_len * m.hidden_size
    assert train_flops(m, 10) == 3 * (2 * weights + attention) * 10


def test_plan_cli_prints_the_papers_budgets(capsys):
    """`bolt em --plan` on the paper's example: 13B tokens per iteration, 800M for the warm start,
    every stage from the base model, nothing run."""
    from megatron_bolt.cli import main

    assert main(["em", str(REPO / "examples" / "tinyllama_finemath" / "em.yaml"), "--plan"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:] if not line.startswith("raw_tokens:")}
    assert list(rows) == ["warmstart", "iter1", "iter2", "iter3", "raw_flops"]
    assert rows["warmstart"][1:6] == ["base", "4069", "96", "2048", "799,997,952"]
    assert rows["iter3"][1:6] == ["base", "33060", "192", "2048", "12,999,720,960"] and rows["iter3"][-1] == "iter3/merged"
    assert rows["raw_flops"][2] == "33060" and rows["raw_flops"][-1] == "raw/rest"
    assert out[-1].startswith("raw_tokens: planned once")
    assert not (REPO / "runs" / "tinyllama_finemath").exists()


def test_merged_datasets_come_from_the_right_stores(tmp_path):
    """warm+new: an iteration's warm dataset is the warm documents with the teacher's latents; the
    raw baselines' datasets have no latents; each lives under its stage's data/."""
    from megatron_bolt.config import load_em_config
    from megatron_bolt.em.driver import EMDriver

    cfg = load_em_config(REPO / "examples" / "toy" / "em.yaml", [f"output_dir={tmp_path}", "iteration_data=warm+new"])
    d = EMDriver(cfg)
    assert d.dataset_sources("iter2/warm") == (str(tmp_path / "data" / "warm_chunks.zarr"),
                                               str(tmp_path / "warmstart" / "latents.zarr"))
    assert d.dataset_sources("iter2/merged") == (str(tmp_path / "data" / "rest_chunks.zarr"),
                                                 str(tmp_path / "iter2" / "latents.zarr"))
    assert d.dataset_sources("warmstart/merged")[1] == str(tmp_path / "warmstart" / "latents.zarr")
    assert d.dataset_sources("raw/warm") == (str(tmp_path / "data" / "warm_chunks.zarr"), None)
    assert d.prefix("iter2/warm") == tmp_path / "iter2" / "data" / "warm"


def test_validation_store_has_the_references_uniform_chunks(tmp_path):
    """The IWAE documents are cut as the reference's validation protocol cuts them: ceil(n / 8)
    chunks of as even a number of sentences as possible; the training splits keep Poisson chunks."""
    from megatron_bolt.config import load_em_config
    from megatron_bolt.data.chunking import sentence_boundaries
    from megatron_bolt.em.driver import EMDriver
    from megatron_bolt.stores.chunk_store import ChunkStore
    from megatron_bolt.tokenizer import load_tokenizer

    def docs(split: str) -> Path:
        path = tmp_path / f"{split}.jsonl"
        with open(path, "w") as f:
            for d in range(6):  # 20 sentences each: uniform chunks of 6, 7 and 7
                text = " ".join(f"Sentence {i} of {split} document {d} says {i * d}." for i in range(20))
                f.write(json.dumps({"text": text}) + "\n")
        return path

    splits = {s: docs(s) for s in ("warm", "rest", "valid")}
    cfg = load_em_config(REPO / "examples" / "toy" / "em.yaml", [
        f"output_dir={tmp_path / 'run'}", "corpus.source=files", "corpus.chunk_poisson_mean=7",
        *(f"corpus.{s}=[{p}]" for s, p in splits.items()),
    ])
    driver = EMDriver(cfg)
    driver.prepare()
    tok = load_tokenizer(driver.tokenizer)

    def sentences_per_chunk(split: str) -> list[list[int]]:
        store = ChunkStore.open(driver.chunks(split))
        counts = []
        for d in range(store.num_docs):
            a, b = store.doc_chunk_range(d)
            counts.append([len(sentence_boundaries(tok.decode(store.chunk_tokens(i)))) + 1 for i in range(a, b)])
        return counts

    assert sentences_per_chunk("valid") == [[6, 7, 7]] * 6
    rest = sentences_per_chunk("rest")
    assert all(sum(c) == 20 for c in rest) and rest != [[6, 7, 7]] * 6


def test_training_stopped_by_a_signal_is_not_marked_done(tmp_path, monkeypatch):
    """`bolt train` exits 0 after a save-and-exit signal; the driver must see that its checkpoint
    is short of the planned steps, leave the step unfinished (a rerun resumes it) and say so."""
    from megatron_bolt.config import load_em_config
    from megatron_bolt.em import driver as em_driver
    from megatron_bolt.errors import UserError
    from megatron_bolt.training.checkpoint_layout import LATEST

    cfg = load_em_config(REPO / "examples" / "toy" / "em.yaml", [f"output_dir={tmp_path}"])
    d = em_driver.EMDriver(cfg)
    stage = em_driver.Stage(d.root, "iter1")
    saved = {"step": 3}

    def fake_relaunch(argv, nproc, log=None):  # the trainer: saves `saved["step"]`, exits 0
        stage.checkpoints.mkdir(parents=True, exist_ok=True)
        (stage.checkpoints / LATEST).write_text(str(saved["step"]))
        return 0

    monkeypatch.setattr(em_driver.runtime, "relaunch", fake_relaunch)
    finished = lambda: em_driver._stopped_early(stage, 5)  # noqa: E731
    with pytest.raises(UserError, match="stopped at step 3 of 5"):
        d.launch(stage, "train", ["train"], finished=finished)
    assert not stage.done("train")
    saved["step"] = 5
    d.launch(stage, "train", ["train"], finished=finished)
    assert stage.done("train")

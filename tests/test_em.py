"""`bolt em` on a micro toy config: every stage's outputs, the summary, and resume after SIGKILLs
at several steps giving exactly the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, bolt, scrubbed_env

MICRO_TRAIN = """
model: {num_layers: 2, hidden_size: 32, num_attention_heads: 2, ffn_hidden_size: 64, seq_len: 128}
train: {steps: 4, micro_batch: 4, global_batch: 4, lr: 3.0e-3, min_lr: 3.0e-4, warmup: 1, log_interval: 2}
checkpoint: {save_interval: 2}
"""


def micro_config(tmp: Path, **extra: object) -> list[str]:
    (tmp / "train.yaml").write_text(MICRO_TRAIN)
    overrides = {
        "output_dir": str(tmp / "run"), "train_config": str(tmp / "train.yaml"), "iterations": 1,
        "corpus.toy_warm_docs": 6, "corpus.toy_rest_docs": 6, "corpus.toy_valid_docs": 2,
        "warmstart.train_steps": "null",
        "estep.samples": 2, "estep.max_latent_tokens": 16, "engine.threads": 1,
        "eval.limit": 6, "eval.shots": 2, "eval.max_new_tokens": 24, "iwae_samples": "[1, 2]",
        **extra,
    }
    return [str(REPO / "examples" / "toy" / "em.yaml"), *(f"{k}={v}" for k, v in overrides.items())]


def chosen_latents(store: Path) -> list[list[int]]:
    from megatron_bolt.stores.latent_store import LatentStore

    s = LatentStore.open(store, mode="r")
    return [np.asarray(s.chosen_latent(i)).tolist() for i in range(s.num_chunks)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("em_full")
    proc = bolt("em", *micro_config(tmp, raw_baseline="false", ablation_samples="[]"), timeout=900)
    assert "warmstart" in proc.stdout and "iter1 (K=2)" in proc.stdout  # the final table
    return tmp / "run"


@pytest.mark.slow
def test_full_loop_with_baseline_and_ablation(tmp_path):
    bolt("em", *micro_config(tmp_path, ablation_samples="[1]", **{"warmstart.train_steps": 6}), timeout=900)
    run = tmp_path / "run"
    # warm start 6 steps, each iteration train.steps (4), the raw baseline the sum (restart: continue)
    for stage, steps in (("warmstart", 6), ("iter1", 4), ("iter1_k1", 4), ("raw", 10)):
        assert f", {steps} steps of " in (run / stage / "logs" / "train.log").read_text(), stage
    summary = json.loads((run / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["raw", "warmstart", "iter1 (K=2)", "iter1 (K=1)"]
    for row in summary["rows"]:
        preds = [json.loads(x) for x in (run / row["stage"] / "eval" / "predictions.jsonl").read_text().splitlines()]
        assert row["n"] == len(preds) and row["correct"] == sum(p["correct"] for p in preds)
        assert row["final_train_loss"] is not None
    assert summary["rows"][0]["iwae_per_chunk"] is None  # no latents in the raw baseline
    assert set(summary["rows"][1]["iwae_per_chunk"]) == {"1", "2"}
    for png in ("accuracy.png", "iwae.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    # the ablation sampled one latent per chunk, the main iteration two, from the same model
    from megatron_bolt.stores.latent_store import LatentStore

    assert LatentStore.open(run / "iter1_k1" / "latents.zarr", mode="r").samples == 1
    assert LatentStore.open(run / "iter1" / "latents.zarr", mode="r").samples == 2
    # the raw baseline's data holds no latent special tokens at all
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_bolt.tokenizer import LATENT_TOKENS, load_tokenizer

    tok = load_tokenizer(str(run / "data" / "tokenizer"))
    specials = {tok.token_to_id(t) for t in LATENT_TOKENS}
    raw = IndexedDataset(str(run / "raw" / "data" / "rest_text_document"))
    assert not specials & set(np.concatenate([raw[i] for i in range(len(raw))]).tolist())


@pytest.mark.slow
def test_rerun_of_a_finished_loop_does_nothing(uninterrupted, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*") if p.is_file() and "summary" not in p.name
              and p.suffix != ".png"}
    cfg = micro_config(uninterrupted.parent, raw_baseline="false", ablation_samples="[]")
    proc = bolt("em", *cfg)
    assert "[em]" not in proc.stdout  # no step ran
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after


@pytest.mark.slow
def test_resume_after_kills_equals_uninterrupted(uninterrupted, tmp_path):
    """SIGKILL the whole process group while given steps run, re-run each time: same results."""
    cfg = micro_config(tmp_path, raw_baseline="false", ablation_samples="[]")
    run = tmp_path / "run"
    env = scrubbed_env()
    # (step, seconds after its log appears): short in-process steps are killed at once, the
    # subprocess steps (training, export) well inside their run.
    kill_points = [("data/preprocess-rest", 0.0), ("warmstart/train", 3.0), ("iter1/estep", 0.3),
                   ("iter1/export", 1.5), ("iter1/eval", 0.1)]
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
        if step in ("train", "export"):  # these take many seconds: the kill must have hit them mid-run
            assert not (run / stage / ".done" / step).exists(), f"{point} finished before the kill"
    bolt("em", *cfg, timeout=900)

    def rows(path: Path) -> list[dict]:
        out = json.loads((path / "summary.json").read_text())["rows"]
        for r in out:
            r.pop("stage")
        return out

    assert rows(run) == rows(uninterrupted)
    for stage in ("warmstart", "iter1"):
        assert chosen_latents(run / stage / "latents.zarr") == chosen_latents(uninterrupted / stage / "latents.zarr")
        a = (run / stage / "data" / "merged_text_document.bin").read_bytes()
        assert a == (uninterrupted / stage / "data" / "merged_text_document.bin").read_bytes()
        preds = (run / stage / "eval" / "predictions.jsonl").read_text()
        assert preds == (uninterrupted / stage / "eval" / "predictions.jsonl").read_text()


def test_bad_em_config_is_one_line(tmp_path, capsys):
    from megatron_bolt.cli import main  # in-process: the same parser and checks as `bolt em`

    assert main(["em", *micro_config(tmp_path, **{"estep.sampels": 3})]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "bolt em: error: unknown config key 'estep.sampels' (valid: max_latent_tokens, prefix_chunks, samples, seed)"
    ]
    for key, value in (("restart", "sometimes"), ("warmstart.train_steps", 0), ("corpus.chunk_poisson_mean", -1),
                       ("engine.engine", "sglang"), ("merge.empty_latents", "drop"), ("estep.seed", 1)):
        assert main(["em", *micro_config(tmp_path, **{key: value})]) == 2
        err = capsys.readouterr().err
        assert f"config key '{key.replace('engine.engine', 'engine.server')}'" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing started

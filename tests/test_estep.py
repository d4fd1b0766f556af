"""E-step: weights against an independent transformers computation, resampling frequencies,
shard-layout independence, kill -9 resume, IWAE."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from transformers import LlamaForCausalLM

from megatron_bolt.cli import main as bolt_main
from megatron_bolt.config import EStepConfig
from megatron_bolt.inference.local import LocalEngine
from megatron_bolt.latents.estep import (
    iwae_bounds,
    open_or_create_store,
    resample,
    resample_rng,
    run_estep,
    run_iwae,
)
from megatron_bolt.stores.chunk_store import ChunkStore, write_chunk_store
from megatron_bolt.stores.latent_store import LatentStore

VOCAB = 48
SPECIAL = {"bos": 0, "eos": 1, "sol": 44, "eol": 45, "prior": 46, "posterior": 47}
MAX_LATENT = 10
PREFIX = 2


def tiny_model(path) -> str:
    return tiny_llama(path, vocab_size=VOCAB, max_positions=512, sharpen=4.0)


def make_docs(seed: int = 0, n_docs: int = 3) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [[[rng.randrange(2, 44) for _ in range(rng.randrange(2, 7))] for _ in range(rng.randrange(2, 5))]
            for _ in range(n_docs)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("estep")
    model_dir = tiny_model(root / "hf")
    docs = make_docs()
    chunks_path = str(root / "chunks.zarr")
    info = {"tokenizer": "test", "vocab_size": VOCAB, "special_tokens": SPECIAL}
    write_chunk_store(chunks_path, [[np.array(c, dtype=np.int32) for c in d] for d in docs], info)
    return root, model_dir, chunks_path, docs


def flat_chunks(docs):
    """(doc, position) of every chunk, in store order: an independent view of the prefix rule."""
    return [(d, j) for d, doc in enumerate(docs) for j in range(len(doc))]


def summed_logprob(model, tokens: list[int], start: int) -> float:
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1)
    return float(sum(lp[t - 1, tokens[t]] for t in range(start, len(tokens))))


def run_local(chunks_path, model_dir, out, samples=3, shard=(0, 1), block_size=3, seed=5):
    chunks = ChunkStore.open(chunks_path)
    settings = EStepConfig(samples, PREFIX, MAX_LATENT, seed)
    store = open_or_create_store(out, chunks.num_chunks, settings, block_size, {"engine": "local"})
    run_estep(LocalEngine(model_dir), chunks, store, settings, shard, progress=False)
    return LatentStore.open(out, mode="r")


def test_weights_match_independent_transformers(setup):
    root, model_dir, chunks_path, docs = setup
    store = run_local(chunks_path, model_dir, str(root / "w.zarr"))
    ref = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    s = SPECIAL
    finished_seen = set()
    for i, (d, j) in enumerate(flat_chunks(docs)):
        rec = store.read_chunk(i)
        x = docs[d][j]
        prefix = [t for c in docs[d][max(0, j - PREFIX):j] for t in c]
        assert len(rec["latents"]) == 3
        for k, z in enumerate(rec["latents"]):
            z = [int(t) for t in z]
            finished = len(z) < MAX_LATENT  # a latent that stopped on EoL is shorter than the cap
            finished_seen.add(finished)
            q_prompt = [s["bos"], *prefix, s["sol"], s["eol"], *x, s["sol"], s["posterior"]]
            q_cont = z + ([s["eol"]] if finished else [])
            log_q = summed_logprob(ref, q_prompt + q_cont, len(q_prompt))
            p_seq = [s["bos"], *prefix, s["sol"], s["prior"], *z, s["eol"], *x]
            log_p = summed_logprob(ref, p_seq, 1 + len(prefix))
            assert abs(rec["log_q"][k] - log_q) < 1e-3
            assert abs(rec["log_p"][k] - log_p) < 1e-3
            assert abs(rec["log_w"][k] - (log_p - log_q)) < 1e-3
        assert 0 <= rec["chosen"] < 3
    assert finished_seen == {True, False}, "want both finished and truncated latents in the test data"


def test_resampling_frequencies_match_softmax():
    log_w = np.array([-3.0, -1.0, -1.5, -4.0, -0.7])
    p = np.exp(log_w - log_w.max())
    p /= p.sum()
    n = 20000
    counts = np.bincount([resample(log_w, resample_rng(seed, 3, 7)) for seed in range(n)], minlength=len(p))
    stat = float(((counts - n * p) ** 2 / (n * p)).sum())
    pvalue = float(torch.special.gammaincc(torch.tensor((len(p) - 1) / 2, dtype=torch.float64),
                                           torch.tensor(stat / 2, dtype=torch.float64)))
    assert pvalue > 1e-3
    # argmax would put every draw on index 4: the test distinguishes resampling from argmax
    assert counts[4] < 0.6 * n
    assert resample(np.array([2.0]), resample_rng(0, 0, 0)) == 0


def assert_same_store(a: LatentStore, b: LatentStore) -> None:
    assert a.blocks_done() == set(range(a.num_blocks)) == b.blocks_done()
    for i in range(a.num_chunks):
        x, y = a.read_chunk(i), b.read_chunk(i)
        assert len(x["latents"]) == a.samples
        assert [list(z) for z in x["latents"]] == [list(z) for z in y["latents"]]
        for key in ("log_q", "log_p", "log_w"):
            np.testing.assert_allclose(x[key], y[key], atol=1e-5, rtol=0)
        assert x["chosen"] == y["chosen"]


def test_shard_layout_does_not_change_results(setup):
    root, model_dir, chunks_path, _ = setup
    whole = run_local(chunks_path, model_dir, str(root / "whole.zarr"))
    out = str(root / "sharded.zarr")
    half = run_local(chunks_path, model_dir, out, shard=(1, 2))
    assert half.num_blocks >= 3 and half.blocks_done() == set(range(1, half.num_blocks, 2))
    sharded = run_local(chunks_path, model_dir, out, shard=(0, 2))
    assert_same_store(whole, sharded)


@pytest.mark.slow
def test_kill9_resume_equals_uninterrupted(tmp_path):
    model_dir = tiny_model(tmp_path / "hf")
    docs = make_docs(seed=1, n_docs=8)
    chunks_path = str(tmp_path / "chunks.zarr")
    write_chunk_store(chunks_path, [[np.array(c, dtype=np.int32) for c in d] for d in docs],
                      {"tokenizer": "test", "vocab_size": VOCAB, "special_tokens": SPECIAL})
    out = str(tmp_path / "resumed.zarr")
    cmd = [sys.executable, "-m", "megatron_bolt.cli", "estep", "--model", model_dir, "--chunks", chunks_path,
           "--out", out, "--samples", "3", "--prefix-chunks", str(PREFIX), "--max-latent-tokens", str(MAX_LATENT),
           "--block-size", "2", "--seed", "5", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only add contention
    # Kill at random moments: after a random number of finished blocks plus a random delay, so
    # some kills land in the middle of a block write. Each run resumes the previous one.
    rng = random.Random(1234)
    num_blocks = (sum(len(d) for d in docs) + 1) // 2
    targets = sorted(rng.sample(range(1, num_blocks // 2), 3))
    done_after_kill = []
    mid_run_kills = 0
    for target in targets:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while p.poll() is None:
            if os.path.exists(os.path.join(out, "zarr.json")):
                try:
                    if len(LatentStore.open(out, mode="r").blocks_done()) >= target:
                        break
                except Exception:  # the store is being created right now
                    pass
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            mid_run_kills += 1
        p.wait()
        done_after_kill.append(len(LatentStore.open(out, mode="r").blocks_done()))
    # every run was killed, and at least the first ones left work for the next run
    assert mid_run_kills == 3 and done_after_kill[0] <= done_after_kill[-1] <= num_blocks, done_after_kill
    assert done_after_kill[1] < num_blocks, done_after_kill
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300, env=env)
    resumed = LatentStore.open(out, mode="r")
    assert resumed.num_blocks == num_blocks
    whole = run_local(chunks_path, model_dir, str(tmp_path / "whole.zarr"), block_size=2)
    assert_same_store(whole, resumed)


def test_iwae(setup, tmp_path):
    root, model_dir, chunks_path, _ = setup
    log_w = np.array([[0.0, -1.0, -2.0, 1.0], [-3.0, -3.0, -1.0, -5.0]])
    got = iwae_bounds(log_w, [1, 2, 4])
    want4 = np.mean([math.log(np.exp(r).sum() / 4) for r in log_w])
    assert abs(got[1] - log_w[:, 0].mean()) < 1e-12 and abs(got[4] - want4) < 1e-12
    res = run_iwae(LocalEngine(model_dir), ChunkStore.open(chunks_path), [1, 2, 4],
                   EStepConfig(4, PREFIX, MAX_LATENT, 0), progress=False)
    assert set(res["iwae_per_chunk"]) == {"1", "2", "4"}
    assert all(np.isfinite(v) and v < 0 for v in res["iwae_per_chunk"].values())
    out = tmp_path / "iwae.json"
    rc = bolt_main(["iwae", "--model", model_dir, "--chunks", chunks_path, "--samples", "1,2", "--quiet",
                    "--max-latent-tokens", str(MAX_LATENT), "--json", str(out)])
    assert rc == 0 and out.exists()


def test_cli_rejects_bad_shard(setup, capsys):
    root, model_dir, chunks_path, _ = setup
    rc = bolt_main(["estep", "--model", model_dir, "--chunks", chunks_path, "--out", str(root / "x.zarr"),
                    "--samples", "2", "--shard", "3/2"])
    assert rc == 2 and "--shard" in capsys.readouterr().err

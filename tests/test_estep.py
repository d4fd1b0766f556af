"""E-step: weights against an independent transformers computation, resampling frequencies,
shard-layout independence, kill -9 resume, IWAE, context truncation, local vs SGLang weights."""

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
from megatron_bolt.errors import UserError
from megatron_bolt.inference.local import LocalEngine
from megatron_bolt.latents.estep import (
    iwae_bounds,
    open_or_create_store,
    resample,
    resample_rng,
    run_estep,
    run_iwae,
    truncate_joint,
    truncate_q_prompt,
    weigh_latents,
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


def assert_weights_match(store: LatentStore, model_dir: str, docs, samples: int = 3) -> None:
    """log q, log p and log w of every latent in `store` equal an independent transformers computation."""
    ref = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    s = SPECIAL
    finished_seen = set()
    for i, (d, j) in enumerate(flat_chunks(docs)):
        rec = store.read_chunk(i)
        x = docs[d][j]
        prefix = [t for c in docs[d][max(0, j - PREFIX):j] for t in c]
        assert len(rec["latents"]) == samples
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
        assert 0 <= rec["chosen"] < samples
    assert finished_seen == {True, False}, "want both finished and truncated latents in the test data"


def test_weights_match_independent_transformers(setup):
    root, model_dir, chunks_path, docs = setup
    assert_weights_match(run_local(chunks_path, model_dir, str(root / "w.zarr")), model_dir, docs)


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
                # Freeze the run while its store is read: on a loaded machine the reader can be
                # slower than the writer, and a run that finished before it was seen is no kill.
                p.send_signal(signal.SIGSTOP)
                try:
                    if len(LatentStore.open(out, mode="r").blocks_done()) >= target:
                        break
                except Exception:  # the store is being created right now
                    pass
                finally:
                    p.send_signal(signal.SIGCONT)
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
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


def test_iwae_document_protocol_is_the_references(tmp_path, monkeypatch):
    """Whole-document prefixes; per-chunk bounds summed per document, divided by the document's
    tokens, averaged over documents (ryoungj/BoLT apps/main/eval.py `compute_elbo`)."""
    from megatron_bolt.latents import estep

    info = {"tokenizer": "t", "vocab_size": 50, "special_tokens": {"bos": 1, "eos": 2, "sol": 3, "eol": 4,
                                                                     "prior": 5, "posterior": 6}}
    docs = [[np.array([7, 8, 9], np.int32), np.array([10], np.int32)],  # 4 tokens
            [np.array([11, 12], np.int32)],  # 2 tokens
            [np.array([13], np.int32), np.array([14, 15], np.int32), np.array([16], np.int32)]]  # 4 tokens
    path = str(tmp_path / "c.zarr")
    write_chunk_store(path, docs, info)
    # log w of chunk i, sample k: -(i + 1) - k; the E-step itself is tested above
    seen = []

    def fake(engine, chunks, idx, settings, block, samples):
        seen.append((list(idx), settings.prefix_chunks))
        w = np.array([[-(i + 1.0) - k for k in range(samples)] for i in idx])
        return estep.BlockResult(list(idx), [], w, w, w, np.zeros(len(idx), np.int32), np.ones_like(w, bool))

    monkeypatch.setattr(estep, "sample_and_weight", fake)
    store = ChunkStore.open(path)
    res = run_iwae(None, store, [1, 2], EStepConfig(2, 1, 8, 0), progress=False, batch_chunks=4)
    assert all(p >= 3 for _, p in seen)  # every chunk sees its whole document
    lme2 = [math.log((math.exp(-(i + 1.0)) + math.exp(-(i + 2.0))) / 2) for i in range(6)]
    sums1 = [-1 - 2, -3, -4 - 5 - 6]
    sums2 = [lme2[0] + lme2[1], lme2[2], lme2[3] + lme2[4] + lme2[5]]
    tokens = [4, 2, 4]
    assert res["docs"] == 3 and res["chunks"] == 6 and res["x_tokens"] == 10
    assert abs(res["iwae_per_token"]["1"] - np.mean([s / t for s, t in zip(sums1, tokens)])) < 1e-12
    assert abs(res["iwae_per_token"]["2"] - np.mean([s / t for s, t in zip(sums2, tokens)])) < 1e-12
    assert abs(res["iwae_per_document"]["1"] - np.mean(sums1)) < 1e-12
    # only whole documents with --max-docs
    assert run_iwae(None, store, [1], EStepConfig(1, 1, 8, 0), progress=False, max_docs=2)["chunks"] == 3
    # the old protocol: the chunks' own prefix, the mean over chunks
    seen.clear()
    old = run_iwae(None, store, [1], EStepConfig(1, 1, 8, 0), progress=False, protocol="chunk")
    assert {p for _, p in seen} == {1} and abs(old["iwae_per_chunk"]["1"] - np.mean([-1, -2, -3, -4, -5, -6])) < 1e-12


def test_cli_rejects_bad_shard(setup, capsys):
    root, model_dir, chunks_path, _ = setup
    rc = bolt_main(["estep", "--model", model_dir, "--chunks", chunks_path, "--out", str(root / "x.zarr"),
                    "--samples", "2", "--shard", "3/2"])
    assert rc == 2 and "--shard" in capsys.readouterr().err


def test_truncation_follows_the_reference():
    """q prompt: its last context - max_latent tokens; joint: the same cut for all K, prefix first."""
    prompt = list(range(10))
    assert truncate_q_prompt(prompt, 14, 4) is prompt and truncate_q_prompt(prompt, None, 4) is prompt
    assert truncate_q_prompt(prompt, 12, 4) == list(range(2, 10))
    with pytest.raises(UserError, match="no room"):
        truncate_q_prompt(prompt, 4, 4)
    # prefix of 5 tokens, X of 3; the longest of the K sequences (12) decides: 2 come off the front
    seqs = [list(range(10)), list(range(12)), list(range(9))]
    out, start, x_cut = truncate_joint(seqs, 5, 3, 10)
    assert out == [s[2:] for s in seqs] and start == 3 and x_cut == 0
    # 7 over: the whole prefix (5) and 2 tokens at the end of X; one token stays as context
    out, start, x_cut = truncate_joint(seqs, 5, 3, 5)
    assert out == [s[5 : len(s) - 2] for s in seqs] and start == 1 and x_cut == 2
    assert truncate_joint(seqs, 5, 3, 12) == (seqs, 5, 0)
    with pytest.raises(UserError, match="too short"):
        truncate_joint(seqs, 5, 3, 4)


@pytest.mark.slow  # whole E-steps and IWAE runs at three context lengths
def test_estep_truncates_to_the_context(setup, tmp_path):
    """With a context shorter than the sequences, the stored weights are those of the truncated
    sequences (cut independently here), and the totals count each kind of cut."""
    root, model_dir, chunks_path, docs = setup
    context = 22
    chunks = ChunkStore.open(chunks_path)
    settings = EStepConfig(3, PREFIX, MAX_LATENT, 5)
    store = open_or_create_store(str(tmp_path / "t.zarr"), chunks.num_chunks, settings, 3, {})
    totals = run_estep(LocalEngine(model_dir, context_length=context), chunks, store, settings, progress=False)
    assert totals.context == context and totals.truncated.q_prompts > 0 and totals.truncated.joint > 0
    assert f"context {context}: {totals.truncated.q_prompts} q prompts" in totals.line()
    ref = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    s = SPECIAL
    q_cut = joint_cut = 0
    for i, (d, j) in enumerate(flat_chunks(docs)):
        rec = store.read_chunk(i)
        x = docs[d][j]
        prefix = [s["bos"]] + [t for c in docs[d][max(0, j - PREFIX):j] for t in c]
        q_prompt = [*prefix, s["sol"], s["eol"], *x, s["sol"], s["posterior"]]
        if len(q_prompt) > context - MAX_LATENT:
            q_prompt, q_cut = q_prompt[len(q_prompt) - (context - MAX_LATENT):], q_cut + 1
        zs = [[int(t) for t in z] for z in rec["latents"]]
        joint = [[*prefix, s["sol"], s["prior"], *z, s["eol"], *x] for z in zs]
        over = max(len(q) for q in joint) - context
        front = max(0, min(over, len(prefix)))
        joint_cut += over > 0
        for k, z in enumerate(zs):
            finished = len(z) < MAX_LATENT
            log_q = summed_logprob(ref, q_prompt + z + ([s["eol"]] if finished else []), len(q_prompt))
            seq = joint[k][front : len(joint[k]) - max(0, over - front)]
            log_p = summed_logprob(ref, seq, max(len(prefix) - front, 1))
            assert abs(rec["log_q"][k] - log_q) < 1e-3 and abs(rec["log_p"][k] - log_p) < 1e-3
    assert (q_cut, joint_cut) == (totals.truncated.q_prompts, totals.truncated.joint)
    engine = LocalEngine(model_dir, context_length=context)
    res = run_iwae(engine, chunks, [1, 2], settings, progress=False, protocol="chunk")  # the E-step's prefixes
    assert res["context"] == context and res["truncated"]["q_prompts"] == q_cut
    whole = run_iwae(engine, chunks, [1, 2], settings, progress=False)  # whole-document prefixes: cut more
    assert whole["truncated"]["q_prompts"] >= q_cut and whole["truncated"]["joint"] >= joint_cut


def test_local_and_sglang_weigh_the_same_latents_alike(setup, tmp_path):
    """Latents sampled through the SGLang client (a deterministic `bolt serve`) and weighed by the
    local engine and by the client agree to 1e-3 in log q and log p, truncation included; the
    E-step through a server with a short context (it would answer 400 past it) completes."""
    import threading

    from megatron_bolt.inference.sglang import PoolOptions, SGLangEngine
    from megatron_bolt.inference.sglang_standin import make_server

    root, model_dir, chunks_path, _ = setup
    server, batcher = make_server(model_dir, "127.0.0.1", 0, deterministic=True, context_length=30)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = SGLangEngine(f"http://127.0.0.1:{server.server_address[1]}", PoolOptions(concurrency=4))
    try:
        assert client.context_length == 23  # max_req_input_len (30 - 6) - 1
        chunks = ChunkStore.open(chunks_path)
        settings = EStepConfig(3, PREFIX, MAX_LATENT, 7)
        store = open_or_create_store(str(tmp_path / "s.zarr"), chunks.num_chunks, settings, 4, {})
        totals = run_estep(client, chunks, store, settings, progress=False)
        assert totals.truncated.q_prompts > 0 and totals.truncated.joint > 0
        idx = list(range(chunks.num_chunks))
        recs = [store.read_chunk(i) for i in idx]
        latents = [[[int(t) for t in z] for z in r["latents"]] for r in recs]
        local = LocalEngine(model_dir, context_length=23)
        lq, lp = weigh_latents(local, chunks, idx, latents, settings)
        sq, sp = weigh_latents(client, chunks, idx, latents, settings)
        stored_q = np.array([r["log_q"] for r in recs])
        stored_p = np.array([r["log_p"] for r in recs])
        for a, b in ((lq, stored_q), (sq, stored_q), (lp, stored_p), (sp, stored_p)):
            np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        batcher.stop()

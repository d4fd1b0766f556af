"""The SGLang client through the real `sglang-router` in front of two `bolt serve` worker processes
(started with --enable-deterministic-inference, as slurm/fleet.sbatch starts them by default)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import free_port
from conftest import tiny_llama as tiny_model

from megatron_bolt.inference.local import LocalEngine
from megatron_bolt.inference.sglang import PoolOptions, SGLangEngine

pytestmark = pytest.mark.slow  # a real sglang-router in front of two `bolt serve` processes

STOP = [3, 17, 29]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


@pytest.fixture()
def fleet(tmp_path):
    model_dir = tiny_model(tmp_path / "hf")
    procs: list[subprocess.Popen] = []
    workers = []
    try:
        for _ in range(2):
            port = free_port()
            p = subprocess.Popen(
                [sys.executable, "-m", "megatron_bolt.cli", "serve", "--model", model_dir, "--port", str(port),
                 "--enable-deterministic-inference"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1"},  # two workers on a small machine
            )
            procs.append(p)
            workers.append((f"http://127.0.0.1:{port}", p))
        for url, p in workers:
            wait_healthy(url, p)
        rport = free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(rport),
             "--worker-urls", *[u for u, _ in workers], "--policy", "round_robin", "--log-level", "warn",
             "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
             "--worker-startup-timeout-secs", "60"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(router)
        router_url = f"http://127.0.0.1:{rport}"
        wait_healthy(router_url, router)
        # the router reports healthy before its workers are registered; wait for a real answer
        deadline = time.monotonic() + 60
        while True:
            try:
                r = requests.post(f"{router_url}/generate", json={"input_ids": [0, 5], "sampling_params": {"max_new_tokens": 1}}, timeout=10)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("router never served a /generate")
            time.sleep(0.3)
        yield model_dir, router_url, workers
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


PROMPTS = [[0, 5, 6, 7, 8, 9], [0, 11], [0, 20, 21, 22, 23, 24, 25, 26, 27, 28, 30], [0, 40, 41]]


def test_router_fleet_matches_local_and_survives_a_dead_worker(fleet):
    model_dir, router_url, workers = fleet
    local = LocalEngine(model_dir)
    client = SGLangEngine(router_url, PoolOptions(concurrency=8, backoff_s=0.1, max_backoff_s=1.0, retries=12))
    direct = SGLangEngine(workers[1][0], PoolOptions(concurrency=4))
    try:
        assert client.context_length == 256 - 7  # the router passes the worker's /server_info on
        # seeded, deterministic servers: the router's spreading does not change a sample
        a = direct.sample(PROMPTS, 3, 20, STOP, seed=21)
        b = client.sample(PROMPTS, 3, 20, STOP, seed=21)
        assert [[s.tokens for s in ss] for ss in a] == [[s.tokens for s in ss] for ss in b]
        for prompt, sb in zip(PROMPTS, b):
            got = [s.logprob_sum for s in sb]
            want = local.score([prompt] * len(sb), [s.tokens for s in sb])
            assert max(abs(p - q) for p, q in zip(got, want)) < 1e-3
            assert all(s.finished == (s.tokens[-1] in STOP) for s in sb)
        conts = [s[1].tokens for s in b]
        assert max(abs(p - q) for p, q in zip(local.score(PROMPTS, conts), client.score(PROMPTS, conts))) < 1e-3

        # Kill one worker (SIGKILL) while a larger request set is in flight: it must still complete.
        many = [[0, 4 + i % 40, 5 + i % 30] for i in range(100)]
        result: dict = {}

        def run():
            try:
                result["out"] = client.sample(many, 2, 24, STOP, seed=5)
            except Exception as exc:  # surfaced below
                result["err"] = exc

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), "the workload finished before the kill; make it larger"
        workers[0][1].send_signal(signal.SIGKILL)
        t.join(timeout=180)
        assert not t.is_alive(), "sampling hung after a worker died"
        assert "err" not in result, result.get("err")
        out = result["out"]
        assert len(out) == 100 and all(len(s) == 2 for s in out)
        ref = direct.sample(many, 2, 24, STOP, seed=5)
        assert [[s.tokens for s in ss] for ss in out] == [[s.tokens for s in ss] for ss in ref]
        assert workers[0][1].poll() is not None and workers[1][1].poll() is None
    finally:
        client.close()
        direct.close()


def test_estep_through_router_matches_a_direct_run_despite_a_dead_worker(fleet, tmp_path):
    import numpy as np

    from megatron_bolt.config import EStepConfig
    from megatron_bolt.latents.estep import open_or_create_store, run_estep, weigh_latents
    from megatron_bolt.stores.chunk_store import ChunkStore, write_chunk_store
    from megatron_bolt.stores.latent_store import LatentStore

    model_dir, router_url, workers = fleet
    special = {"bos": 0, "eos": 1, "sol": 44, "eol": 45, "prior": 46, "posterior": 47}
    rng = np.random.default_rng(0)
    docs = [[rng.integers(2, 44, size=int(rng.integers(2, 6))).astype(np.int32) for _ in range(4)] for _ in range(6)]
    chunks_path = str(tmp_path / "chunks.zarr")
    write_chunk_store(chunks_path, docs, {"tokenizer": "test", "vocab_size": 48, "special_tokens": special})
    chunks = ChunkStore.open(chunks_path)
    settings = EStepConfig(samples=4, prefix_chunks=2, max_latent_tokens=12, seed=3)

    def estep(engine, out):
        store = open_or_create_store(out, chunks.num_chunks, settings, 4, {})
        run_estep(engine, chunks, store, settings, progress=False)
        return LatentStore.open(out, mode="r")

    client = SGLangEngine(router_url, PoolOptions(concurrency=8, backoff_s=0.1, max_backoff_s=1.0, retries=12))
    result: dict = {}

    def run():
        try:
            result["store"] = estep(client, str(tmp_path / "fleet.zarr"))
        except Exception as exc:
            result["err"] = exc

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    assert t.is_alive(), "the E-step finished before the kill; make it larger"
    workers[1][1].send_signal(signal.SIGKILL)
    t.join(timeout=240)
    client.close()
    assert not t.is_alive() and "err" not in result, result.get("err")
    fleet_store = result["store"]
    direct = SGLangEngine(workers[0][0], PoolOptions(concurrency=4))
    try:
        direct_store = estep(direct, str(tmp_path / "direct.zarr"))
    finally:
        direct.close()
    assert fleet_store.blocks_done() == set(range(fleet_store.num_blocks))
    recs = []
    for i in range(chunks.num_chunks):
        a, b = fleet_store.read_chunk(i), direct_store.read_chunk(i)
        assert [list(z) for z in a["latents"]] == [list(z) for z in b["latents"]]
        for key in ("log_q", "log_p", "log_w"):
            np.testing.assert_allclose(a[key], b[key], atol=1e-3, rtol=0)
        assert a["chosen"] == b["chosen"]
        recs.append(a)
    # and the local engine gives the fleet's latents the same weights
    idx = list(range(chunks.num_chunks))
    lq, lp = weigh_latents(LocalEngine(model_dir), chunks, idx, [r["latents"] for r in recs], settings)
    np.testing.assert_allclose(lq, np.array([r["log_q"] for r in recs]), atol=1e-3, rtol=0)
    np.testing.assert_allclose(lp, np.array([r["log_p"] for r in recs]), atol=1e-3, rtol=0)

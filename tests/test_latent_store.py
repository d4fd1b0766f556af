"""The zarr latent store: layout, done markers, partial writes, concurrent writers, fsspec URLs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from megatron_bolt.cli import main as bolt_main
from megatron_bolt.errors import UserError
from megatron_bolt.stores.latent_store import LatentStore


def fake_block(store: LatentStore, b: int, seed: int = 0):
    """Deterministic ragged latents for block b: latent (j, k) = [1000*chunk + 10*k + t ...]."""
    rng = np.random.default_rng(seed + b)
    chunks = store.block_range(b)
    latents = [[[1000 * i + 10 * k + t for t in range(rng.integers(0, 6))] for k in range(store.samples)] for i in chunks]
    n, k = len(chunks), store.samples
    log_q = -rng.random((n, k)) * 10
    log_p = -rng.random((n, k)) * 10
    chosen = rng.integers(0, k, size=n)
    return latents, log_q, log_p, log_p - log_q, chosen


@pytest.mark.parametrize("where", ["local", "memory"])
def test_roundtrip_and_status(tmp_path, where):
    path = str(tmp_path / "lat.zarr") if where == "local" else f"memory://lat-{tmp_path.name}"
    meta = {"engine": "local", "model": "m0", "iteration": 2, "seed": 7}
    store = LatentStore.create(path, num_chunks=10, samples=3, block_size=4, meta=meta)
    assert store.num_blocks == 3 and list(store.block_range(2)) == [8, 9]
    assert store.blocks_done() == set()
    assert store.status().startswith("0 of 3 blocks done")

    written = {}
    for b in (2, 0):
        written[b] = fake_block(store, b)
        store.write_block(b, *written[b], meta={"shard": b})

    reader = LatentStore.open(path, mode="r")
    assert reader.blocks_done() == {0, 2}
    assert reader.status().startswith("2 of 3 blocks done (6 of 10 chunks")
    assert reader.attrs["engine"] == "local" and reader.attrs["iteration"] == 2 and reader.attrs["seed"] == 7
    for b, (latents, log_q, log_p, log_w, chosen) in written.items():
        for j, i in enumerate(reader.block_range(b)):
            rec = reader.read_chunk(i)
            assert [z.tolist() for z in rec["latents"]] == latents[j]
            np.testing.assert_array_equal(rec["log_q"], log_q[j])
            np.testing.assert_array_equal(rec["log_p"], log_p[j])
            np.testing.assert_array_equal(rec["log_w"], log_w[j])
            assert rec["chosen"] == chosen[j] and rec["meta"] == {"shard": b}
            assert reader.chosen_latent(i).tolist() == latents[j][chosen[j]]
    # block 1 not written: readable store, nothing for its chunks
    assert reader.chosen_latent(5) is None
    with pytest.raises(KeyError):
        reader.read_chunk(5)


def test_killed_writer_leaves_nothing_finished_and_rewrite_is_safe(tmp_path, monkeypatch):
    store = LatentStore.create(tmp_path / "lat.zarr", num_chunks=6, samples=2, block_size=3)
    data = fake_block(store, 1)
    real_create = zarr.Group.create_array
    calls = {"n": 0}

    def dying_create(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # die halfway through the block's arrays
            raise KeyboardInterrupt("killed")
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", dying_create)
    with pytest.raises(KeyboardInterrupt):
        store.write_block(1, *data)
    monkeypatch.setattr(zarr.Group, "create_array", real_create)

    fresh = LatentStore.open(tmp_path / "lat.zarr")
    assert fresh.blocks_done() == set()  # the partial group does not look finished
    assert fresh.chosen_latent(4) is None
    assert (tmp_path / "lat.zarr" / "blocks" / "000001").exists()  # but it is there, partially

    fresh.write_block(1, *data)  # rewriting the unfinished block
    assert fresh.blocks_done() == {1}
    latents, *_, chosen = data
    assert [fresh.chosen_latent(i).tolist() for i in range(3, 6)] == [latents[j][chosen[j]] for j in range(3)]
    # rewriting a finished block replaces it
    other = fake_block(fresh, 1, seed=99)
    fresh.write_block(1, *other)
    assert fresh.chosen_latent(3).tolist() == other[0][0][other[4][0]]


def test_create_refuses_clobber_and_checks_shape_on_resume(tmp_path):
    path = tmp_path / "lat.zarr"
    LatentStore.create(path, num_chunks=5, samples=2, block_size=2)
    with pytest.raises(UserError, match="already exists"):
        LatentStore.create(path, num_chunks=5, samples=2, block_size=2)
    assert LatentStore.create(path, num_chunks=5, samples=2, block_size=2, exist_ok=True).num_blocks == 3
    with pytest.raises(UserError, match="existing store"):
        LatentStore.create(path, num_chunks=5, samples=4, block_size=2, exist_ok=True)
    with pytest.raises(UserError, match="no latent store"):
        LatentStore.open(tmp_path / "nope.zarr")


def test_write_block_validates_shapes(tmp_path):
    store = LatentStore.create(tmp_path / "lat.zarr", num_chunks=3, samples=2, block_size=3)
    latents, log_q, log_p, log_w, chosen = fake_block(store, 0)
    with pytest.raises(ValueError, match="chunks"):
        store.write_block(0, latents[:2], log_q, log_p, log_w, chosen)
    with pytest.raises(ValueError, match="log_p"):
        store.write_block(0, latents, log_q, log_p[:, :1], log_w, chosen)
    with pytest.raises(ValueError, match="chosen"):
        store.write_block(0, latents, log_q, log_p, log_w, np.array([0, 1, 2]))
    assert store.blocks_done() == set()


WRITER = textwrap.dedent(
    """
    import sys
    from megatron_bolt.stores.latent_store import LatentStore
    path, first = sys.argv[1], int(sys.argv[2])
    store = LatentStore.open(path)
    for b in range(first, store.num_blocks, 2):  # this writer's shard: every other block
        n = len(store.block_range(b))
        lat = [[[b, i, k] * (1 + (i + k) % 3) for k in range(store.samples)] for i in store.block_range(b)]
        logs = [[-1.0 * k for k in range(store.samples)]] * n
        store.write_block(b, lat, logs, logs, logs, [i % store.samples for i in store.block_range(b)], meta={"shard": first})
    """
)


@pytest.mark.slow
def test_two_processes_write_different_blocks_concurrently(tmp_path):
    path = str(tmp_path / "lat.zarr")
    store = LatentStore.create(path, num_chunks=95, samples=2, block_size=5, meta={"engine": "test"})
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(s)]) for s in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert store.blocks_done() == set(range(19))
    for i in range(95):
        b = i // 5
        assert store.chosen_latent(i).tolist() == [b, i, i % 2] * (1 + (i + i % 2) % 3)
        assert store.read_chunk(i)["meta"] == {"shard": b % 2}
    assert LatentStore.open(path).attrs["engine"] == "test"  # the shared root was not rewritten


def test_status_cli(tmp_path, capsys):
    path = tmp_path / "lat.zarr"
    store = LatentStore.create(path, num_chunks=4, samples=1, block_size=2, meta={"model": "hf-dir"})
    store.write_block(1, *fake_block(store, 1))
    assert bolt_main(["latents", "status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 blocks done (2 of 4 chunks" in out and "model=hf-dir" in out
    assert "missing blocks: 1 (first 1: 0)" in out
    assert bolt_main(["latents", "status", str(tmp_path / "nope.zarr")]) == 2
    assert "no latent store" in capsys.readouterr().err

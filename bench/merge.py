"""Benchmark `bolt merge`: output MB/s against a plain copy of the same bytes from the stores.

    .venv/bin/python bench/merge.py [--chunks 200000] [--workdir /tmp/bench_merge] [--repeats 3]

Builds a synthetic chunk store (Poisson-ish chunk lengths around --chunk-tokens) and a finished
latent store (K samples, latents around --latent-tokens) once, then times, alternately:
- merge: `merge_latents` end to end (zarr reads, form draws, gather, IndexedDatasetBuilder, rename);
- copy:  read the same stores' arrays that merge reads (chunk tokens and the chosen latents, with
  the same window size), cast to the output dtype and write exactly as many bytes as merge wrote to
  a .bin on the same disk; the floor any merge implementation has to pay.
Reports MB/s of output for each (median of the repeats) and the ratio; the goal is copy/merge <= 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_bolt.data.indexed import document_paths  # noqa: E402
from megatron_bolt.data.merge import merge_latents  # noqa: E402
from megatron_bolt.stores.chunk_store import ChunkStore, write_chunk_store  # noqa: E402
from megatron_bolt.stores.latent_store import LatentStore  # noqa: E402

VOCAB = 32000
SPECIALS = {"bos": 1, "eos": 2, "sol": VOCAB - 4, "eol": VOCAB - 3, "prior": VOCAB - 2, "posterior": VOCAB - 1}


def build(workdir: Path, num_chunks: int, chunk_tokens: int, latent_tokens: int, samples: int, block_size: int):
    chunks_path, latents_path = workdir / "chunks.zarr", workdir / "latents.zarr"
    if chunks_path.exists() and latents_path.exists():
        store = ChunkStore.open(str(chunks_path))
        if store.num_chunks == num_chunks:
            return str(chunks_path), str(latents_path)
    shutil.rmtree(chunks_path, ignore_errors=True)
    shutil.rmtree(latents_path, ignore_errors=True)
    rng = np.random.default_rng(0)
    lengths = rng.poisson(chunk_tokens, size=num_chunks) + 1
    per_doc = []
    left = num_chunks
    while left:
        n = min(left, int(rng.integers(1, 20)))
        per_doc.append(n)
        left -= n
    tokens = rng.integers(10, VOCAB - 10, size=int(lengths.sum()), dtype=np.int32)
    ends = np.cumsum(lengths)
    chunks = np.split(tokens, ends[:-1])

    def docs():
        c = 0
        for n in per_doc:
            yield chunks[c : c + n]
            c += n

    write_chunk_store(str(chunks_path), docs(), {"tokenizer": "bench", "vocab_size": VOCAB, "special_tokens": SPECIALS})
    store = LatentStore.create(latents_path, num_chunks, samples, block_size, meta={"engine": "bench"})
    for b in range(store.num_blocks):
        r = store.block_range(b)
        lat_len = rng.poisson(latent_tokens, size=(len(r), samples))
        flat = rng.integers(10, VOCAB - 10, size=int(lat_len.sum()), dtype=np.int32)
        pieces = np.split(flat, np.cumsum(lat_len.ravel())[:-1])
        latents = [pieces[j * samples : (j + 1) * samples] for j in range(len(r))]
        logs = -rng.random((len(r), samples))
        store.write_block(b, latents, logs, logs, logs, rng.integers(0, samples, size=len(r)))
    return str(chunks_path), str(latents_path)


def plain_copy(chunks_path: str, latents_path: str, out: Path, nbytes: int, window_tokens: int, epochs: int) -> None:
    """Read what merge reads (chunk tokens by window, chosen latents by block), write nbytes."""
    import zarr

    tokens = zarr.open_group(chunks_path, mode="r")["tokens"]
    lat = LatentStore.open(latents_path, mode="r")
    written = 0
    with open(out, "wb") as f:
        for _ in range(epochs):
            for start in range(0, tokens.shape[0], window_tokens):
                data = np.asarray(tokens[start : start + window_tokens]).astype(np.uint16)
                f.write(data.tobytes())
                written += data.nbytes
            for b in range(lat.num_blocks):
                lat._cache = None  # read each block again, as merge does once per epoch
                data = lat.read_block_chosen(b)[1].astype(np.uint16)
                f.write(data.tobytes())
                written += data.nbytes
        if nbytes > written:  # the specials and BOS/EOS merge adds
            f.write(bytes(nbytes - written))
        f.flush()
        os.fsync(f.fileno())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench_merge")
    ap.add_argument("--chunks", type=int, default=200_000)
    ap.add_argument("--chunk-tokens", type=int, default=100)
    ap.add_argument("--latent-tokens", type=int, default=80)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    chunks_path, latents_path = build(workdir, args.chunks, args.chunk_tokens, args.latent_tokens, args.samples,
                                      args.block_size)
    print(f"stores ready in {time.perf_counter() - t:.1f} s: {workdir}", file=sys.stderr)

    # Warm-up (not timed): megatron-core's import and the first zarr reads of the stores.
    merge_latents(chunks_path, latents_path, workdir / "ltm", epochs=args.epochs, progress=False)
    merge_s, copy_s, nbytes = [], [], 0
    for _ in range(args.repeats):
        t = time.perf_counter()
        summary = merge_latents(chunks_path, latents_path, workdir / "ltm", epochs=args.epochs, progress=False)
        with open(document_paths(workdir / "ltm")[0], "rb+") as f:
            os.fsync(f.fileno())
        merge_s.append(time.perf_counter() - t)
        nbytes = os.path.getsize(document_paths(workdir / "ltm")[0])
        t = time.perf_counter()
        plain_copy(chunks_path, latents_path, workdir / "copy.bin", nbytes, 1 << 22, args.epochs)
        copy_s.append(time.perf_counter() - t)
    merge_mb, copy_mb = nbytes / 1e6 / statistics.median(merge_s), nbytes / 1e6 / statistics.median(copy_s)
    print(summary.format())
    print(f"output {nbytes / 1e6:.1f} MB; merge {merge_mb:.1f} MB/s (runs {', '.join(f'{s:.2f}' for s in merge_s)} s); "
          f"plain copy {copy_mb:.1f} MB/s (runs {', '.join(f'{s:.2f}' for s in copy_s)} s); "
          f"copy/merge = {copy_mb / merge_mb:.2f}x (goal <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The latent store: K sampled latents per chunk, their weights and the resampled choice, in zarr.

Layout (zarr v3; a local path or any fsspec URL zarr supports, e.g. memory://, s3://):

    LATENTS.zarr/
      zarr.json             attrs: format, version, num_chunks, samples (K), block_size, num_blocks,
                            engine, model, iteration, seed, and any other metadata given at creation
      done                  uint8 [num_blocks], one zarr chunk per block: the "block finished" marker
      blocks/000017/        one group per block = chunk indices [17*block_size, 18*block_size)
        zarr.json           attrs: the writer's metadata (engine, model, iteration, shard, ...)
        tokens   int32      every latent of the block, flat: chunk-major, then sample k
        offsets  int64      [n*K + 1] into tokens
        log_q, log_p, log_w float64 [n, K]
        chosen   int32      [n] index of the resampled latent
        chosen_tokens int32, chosen_offsets int64 [n + 1]
                            a copy of latent[chosen] per chunk, so merge reads 1/K of the tokens

Why this shape: every block lives in its own group and its own `done` chunk, so independent writers
(one per E-step shard) never write the same zarr object, and the shared root is written once, at
creation. A block is written in full, then `done[b] = 1` is set LAST; a killed writer leaves a
partial group that nothing treats as finished, and rewriting a block first clears its marker and
then replaces the group. Readers use only finished blocks, so the store is readable while incomplete.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from megatron_bolt.errors import UserError

FORMAT = "megatron-bolt-latents"
VERSION = 1
_TOKEN_CHUNK = 1 << 22  # zarr chunk (elements) for a block's flat token arrays
_META_KEYS = ("engine", "model", "iteration", "seed")


def _block_name(b: int) -> str:
    return f"blocks/{b:06d}"


def _flat_chunks(n: int) -> tuple[int]:
    return (max(1, min(n, _TOKEN_CHUNK)),)


class LatentStore:
    """A latent store on disk / object storage; see the module docstring for the layout."""

    def __init__(self, path: str, root: zarr.Group):
        self.path = path
        self._root = root
        attrs = root.attrs.asdict()
        if attrs.get("format") != FORMAT:
            raise UserError(f"{path}: not a latent store (attribute 'format' is {attrs.get('format')!r})")
        if attrs.get("version") != VERSION:
            raise UserError(f"{path}: latent store version {attrs.get('version')!r}, this code reads {VERSION}")
        self.attrs: dict[str, Any] = attrs
        self.num_chunks: int = int(attrs["num_chunks"])
        self.samples: int = int(attrs["samples"])
        self.block_size: int = int(attrs["block_size"])
        self.num_blocks: int = int(attrs["num_blocks"])
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None  # (block, chosen_offsets, chosen_tokens)

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(
        cls,
        path: str | Path,
        num_chunks: int,
        samples: int,
        block_size: int,
        meta: dict[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> LatentStore:
        """A new empty store for `num_chunks` chunks, K=`samples` latents each, in blocks of
        `block_size` chunks. With `exist_ok`, an existing store with the same shape is opened
        instead (resuming an E-step); a different shape is an error."""
        path = str(path)
        if num_chunks < 0 or samples < 1 or block_size < 1:
            raise UserError(f"{path}: need num_chunks >= 0, samples >= 1, block_size >= 1")
        if _exists(path):
            if not exist_ok:
                raise UserError(f"{path}: already exists (remove it, or resume with the same settings)")
            store = cls.open(path, mode="r+")
            want = {"num_chunks": num_chunks, "samples": samples, "block_size": block_size}
            have = {k: store.attrs.get(k) for k in want}
            if have != want:
                raise UserError(f"{path}: existing store has {have}, asked for {want}")
            return store
        meta = dict(meta or {})
        attrs = {k: meta.pop(k, None) for k in _META_KEYS}
        attrs.update(meta)
        num_blocks = (num_chunks + block_size - 1) // block_size
        attrs.update(
            format=FORMAT, version=VERSION, num_chunks=num_chunks, samples=samples,
            block_size=block_size, num_blocks=num_blocks,
        )
        root = zarr.open_group(path, mode="w-", attributes=attrs)
        root.create_array("done", shape=(num_blocks,), chunks=(1,), dtype="uint8", fill_value=0)
        root.create_group("blocks")
        return cls(path, root)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r+") -> LatentStore:
        """Open an existing store ("r" read-only, "r+" to write blocks)."""
        path = str(path)
        try:
            root = zarr.open_group(path, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            raise UserError(f"{path}: no latent store there") from None
        return cls(path, root)

    # ------------------------------------------------------------------ geometry and status
    def block_range(self, b: int) -> range:
        """The chunk indices of block b."""
        if not 0 <= b < self.num_blocks:
            raise IndexError(f"block {b} out of range (store has {self.num_blocks})")
        return range(b * self.block_size, min((b + 1) * self.block_size, self.num_chunks))

    def block_of(self, i: int) -> int:
        if not 0 <= i < self.num_chunks:
            raise IndexError(f"chunk {i} out of range (store has {self.num_chunks})")
        return i // self.block_size

    def blocks_done(self) -> set[int]:
        """Blocks whose done marker is set (re-read from storage on every call)."""
        if self.num_blocks == 0:
            return set()
        return {int(b) for b in np.flatnonzero(self._root["done"][:])}

    def is_done(self, b: int) -> bool:
        return bool(self._root["done"][b])

    def status(self) -> str:
        done = self.blocks_done()
        chunks = sum(len(self.block_range(b)) for b in done)
        a = self.attrs
        return (
            f"{len(done)} of {self.num_blocks} blocks done ({chunks} of {self.num_chunks} chunks, "
            f"K={self.samples}, block_size={self.block_size}; engine={a.get('engine')}, "
            f"model={a.get('model')}, iteration={a.get('iteration')}, seed={a.get('seed')})"
        )

    # ------------------------------------------------------------------ writing
    def write_block(
        self,
        b: int,
        latents: Sequence[Sequence[Sequence[int]]],
        log_q: Any,
        log_p: Any,
        log_w: Any,
        chosen: Any,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Write block b in full: latents[j][k] = token ids of sample k of the block's j-th chunk;
        log_q/log_p/log_w shaped [n, K]; chosen[j] in [0, K). The done marker is set last."""
        rng = self.block_range(b)
        n, k = len(rng), self.samples
        if len(latents) != n or any(len(per_chunk) != k for per_chunk in latents):
            raise ValueError(f"block {b}: expected {n} chunks x {k} latents")
        logs = {}
        for name, value in (("log_q", log_q), ("log_p", log_p), ("log_w", log_w)):
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != (n, k):
                raise ValueError(f"block {b}: {name} has shape {arr.shape}, expected {(n, k)}")
            logs[name] = arr
        chosen = np.asarray(chosen, dtype=np.int32)
        if chosen.shape != (n,) or (n and (chosen.min() < 0 or chosen.max() >= k)):
            raise ValueError(f"block {b}: chosen must be {n} indices in [0, {k})")

        # One array per latent, then one concatenate: fast for lists and numpy arrays alike.
        arrays = [np.asarray(z, dtype=np.int64).reshape(-1) for per_chunk in latents for z in per_chunk]
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=n * k)
        offsets = np.zeros(n * k + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
        pick = np.arange(n) * k + chosen
        chosen_lengths = lengths[pick]
        chosen_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(chosen_lengths, out=chosen_offsets[1:])
        chosen_tokens = (
            np.concatenate([tokens[offsets[p] : offsets[p + 1]] for p in pick]) if n else np.zeros(0, np.int32)
        )

        done = self._root["done"]
        done[b] = 0  # a rewrite of a finished block is unfinished until it completes again
        group = zarr.open_group(self._root.store, path=_block_name(b), mode="w", attributes=dict(meta or {}))
        group.create_array("tokens", data=tokens, chunks=_flat_chunks(len(tokens)))
        group.create_array("offsets", data=offsets)
        for name, arr in logs.items():
            group.create_array(name, data=arr, chunks=(max(1, n), k))
        group.create_array("chosen", data=chosen, chunks=(max(1, n),))
        group.create_array("chosen_tokens", data=chosen_tokens, chunks=_flat_chunks(len(chosen_tokens)))
        group.create_array("chosen_offsets", data=chosen_offsets)
        if self._cache is not None and self._cache[0] == b:
            self._cache = None
        done[b] = 1  # LAST: only now does the block count as finished

    # ------------------------------------------------------------------ reading
    def _block(self, b: int) -> zarr.Group:
        if not self.is_done(b):
            raise KeyError(f"{self.path}: block {b} (chunks {self.block_range(b).start}..) is not done")
        return zarr.open_group(self._root.store, path=_block_name(b), mode="r")

    def read_block_chosen(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(chosen_offsets [n+1], chosen_tokens) of a finished block; KeyError if not done."""
        if self._cache is None or self._cache[0] != b:
            group = self._block(b)
            self._cache = (b, group["chosen_offsets"][:], group["chosen_tokens"][:])
        return self._cache[1], self._cache[2]

    def chosen_latent(self, i: int) -> np.ndarray | None:
        """The resampled latent of chunk i, or None while its block is not done."""
        b = self.block_of(i)
        # A block in the cache was finished when read; skip the per-call marker read for it.
        if (self._cache is None or self._cache[0] != b) and not self.is_done(b):
            return None
        offsets, tokens = self.read_block_chosen(b)
        j = i - b * self.block_size
        return tokens[offsets[j] : offsets[j + 1]]

    def read_chunk(self, i: int) -> dict[str, Any]:
        """Everything stored for chunk i: latents (K arrays), log_q, log_p, log_w, chosen, block
        metadata. KeyError if its block is not done."""
        b = self.block_of(i)
        group = self._block(b)
        j = i - b * self.block_size
        k = self.samples
        offsets = group["offsets"][j * k : (j + 1) * k + 1]
        tokens = group["tokens"][int(offsets[0]) : int(offsets[-1])]
        base = int(offsets[0])
        return {
            "chunk": i,
            "block": b,
            "latents": [tokens[int(offsets[s]) - base : int(offsets[s + 1]) - base] for s in range(k)],
            "log_q": group["log_q"][j],
            "log_p": group["log_p"][j],
            "log_w": group["log_w"][j],
            "chosen": int(group["chosen"][j]),
            "meta": group.attrs.asdict(),
        }


def _exists(path: str) -> bool:
    try:
        zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return False
    return True


def existing_block_size(path: str) -> int | None:
    """The block size of the latent store at `path`, or None when there is none yet."""
    try:
        return LatentStore.open(path, mode="r").block_size
    except UserError:
        return None

"""The BoLT chunk store: every chunk's token ids, its document and its position, in one zarr v3 group.

Layout (ragged lists as flat arrays plus offsets):
  tokens             int32  [n_tokens]        all chunks' tokens, document after document
  chunk_offsets      int64  [n_chunks + 1]    chunk i is tokens[chunk_offsets[i] : chunk_offsets[i + 1]]
  chunk_doc          int64  [n_chunks]        document index of each chunk
  chunk_index        int32  [n_chunks]        position of the chunk within its document
  doc_chunk_offsets  int64  [n_docs + 1]      document d owns chunks doc_chunk_offsets[d] : [d + 1]
attrs: format_version, tokenizer, vocab_size, special_tokens {bos, eos, sol, eol, prior, posterior},
       chunk_poisson_mean (when written by `bolt preprocess`).

Chunks carry no BOS/EOS. A document's chunks concatenate to its tokenization. The prefix context
of chunk i (method.md) is the previous k chunks of the same document: `prefix_tokens(i, k)`.

Readers keep the small offset arrays in memory and read token slices through a small cache of
decoded zarr blocks, so iterating over many chunks in order costs one decode per block.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from megatron_bolt.errors import UserError

FORMAT_VERSION = 1
TOKENS_BLOCK = 1 << 20  # tokens per zarr chunk (4 MiB raw)
INDEX_BLOCK = 1 << 18


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _info_dict(tokenizer_info: Any) -> dict:
    if hasattr(tokenizer_info, "info"):
        tokenizer_info = tokenizer_info.info()
    info = dict(tokenizer_info)
    return {
        "tokenizer": str(info.get("tokenizer", "")),
        "vocab_size": int(info["vocab_size"]),
        "special_tokens": {k: int(v) for k, v in dict(info.get("special_tokens", {})).items()},
    }


class ChunkStoreWriter:
    """Streams documents into a chunk store at a temporary name; `close()` moves it into place.

    Use as a context manager: an exception (or a kill) leaves nothing at the final path.
    """

    def __init__(self, path: str, tokenizer_info: Mapping | Any, extra_attrs: Mapping | None = None):
        import zarr

        self.path = str(path).rstrip("/")
        self.tmp_path = f"{self.path}.tmp-{os.getpid()}"
        self._remove(self.tmp_path)
        self._group = zarr.open_group(self.tmp_path, mode="w", zarr_format=3)
        self._group.attrs.update({"format_version": FORMAT_VERSION, **_info_dict(tokenizer_info),
                                  **(extra_attrs or {})})
        self._tokens = self._group.create_array(
            "tokens", shape=(0,), dtype="int32", chunks=(TOKENS_BLOCK,), fill_value=0
        )
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._written = 0
        self._chunk_lengths: list[np.ndarray] = []
        self._doc_chunks: list[int] = []
        self._closed = False

    # -- adding documents -------------------------------------------------------------------------
    def add_document(self, chunks: list[np.ndarray]) -> None:
        lengths = np.asarray([len(c) for c in chunks], dtype=np.int64)
        flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        self.add_document_flat(flat, lengths)

    def add_document_flat(self, tokens: np.ndarray, chunk_lengths: np.ndarray) -> None:
        """One document as its token ids and the token count of each of its chunks."""
        chunk_lengths = np.asarray(chunk_lengths, dtype=np.int64)
        if int(chunk_lengths.sum()) != len(tokens):
            raise ValueError(f"chunk lengths sum to {int(chunk_lengths.sum())}, document has {len(tokens)} tokens")
        self._chunk_lengths.append(chunk_lengths)
        self._doc_chunks.append(len(chunk_lengths))
        if len(tokens):
            self._pending.append(np.asarray(tokens, dtype=np.int32))
            self._pending_len += len(tokens)
        if self._pending_len >= 4 * TOKENS_BLOCK:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        data = np.concatenate(self._pending)
        # Write whole zarr blocks only, so no block is ever read back and rewritten.
        keep = len(data) if final else (len(data) // TOKENS_BLOCK) * TOKENS_BLOCK
        if keep == 0:
            return
        start = self._written
        self._tokens.resize((start + keep,))
        self._tokens[start : start + keep] = data[:keep]
        self._written += keep
        rest = data[keep:]
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)

    @property
    def num_chunks(self) -> int:
        return sum(len(c) for c in self._chunk_lengths)

    # -- finishing --------------------------------------------------------------------------------
    def close(self) -> str:
        if self._closed:
            return self.path
        self._flush(final=True)
        lengths = np.concatenate(self._chunk_lengths) if self._chunk_lengths else np.zeros(0, np.int64)
        per_doc = np.asarray(self._doc_chunks, dtype=np.int64)
        chunk_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        doc_chunk_offsets = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
        chunk_doc = np.repeat(np.arange(len(per_doc), dtype=np.int64), per_doc)
        chunk_index = (np.arange(len(lengths), dtype=np.int64) - np.repeat(doc_chunk_offsets[:-1], per_doc))
        for name, arr in (
            ("chunk_offsets", chunk_offsets),
            ("chunk_doc", chunk_doc),
            ("chunk_index", chunk_index.astype(np.int32)),
            ("doc_chunk_offsets", doc_chunk_offsets),
        ):
            self._group.create_array(name, data=arr, chunks=(max(1, min(len(arr), INDEX_BLOCK)),))
        self._group.attrs.update({"num_chunks": int(len(lengths)), "num_docs": int(len(per_doc)),
                                  "num_tokens": int(chunk_offsets[-1])})
        self._closed = True
        self._commit()
        return self.path

    def abort(self) -> None:
        self._closed = True
        self._remove(self.tmp_path)

    def __enter__(self) -> ChunkStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _commit(self) -> None:
        if _is_url(self.path):
            import fsspec

            fs, dst = fsspec.core.url_to_fs(self.path)
            _, src = fsspec.core.url_to_fs(self.tmp_path)
            if fs.exists(dst):
                fs.rm(dst, recursive=True)
            fs.mv(src, dst, recursive=True)  # not atomic on object stores; best effort
            return
        old = f"{self.path}.old-{os.getpid()}"
        if os.path.exists(self.path):
            os.rename(self.path, old)
        os.rename(self.tmp_path, self.path)
        shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _remove(path: str) -> None:
        if _is_url(path):
            import fsspec

            fs, p = fsspec.core.url_to_fs(path)
            if fs.exists(p):
                fs.rm(p, recursive=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def write_chunk_store(path: str, docs_chunks: Iterable[list[np.ndarray]], tokenizer_info: Mapping | Any) -> str:
    """Write documents (each a list of chunk token arrays) as a chunk store at `path`, atomically."""
    with ChunkStoreWriter(path, tokenizer_info) as writer:
        for chunks in docs_chunks:
            writer.add_document(chunks)
    return writer.path


class ChunkStore:
    """Read access to a chunk store (see the module docstring)."""

    def __init__(self, group, path: str, cache_blocks: int = 16):
        self.path = path
        self._group = group
        attrs = dict(group.attrs)
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported chunk-store format_version {attrs.get('format_version')}")
        self.attrs = attrs
        self.tokenizer = attrs.get("tokenizer", "")
        self.vocab_size = int(attrs["vocab_size"])
        self.special_tokens: dict[str, int] = {k: int(v) for k, v in attrs["special_tokens"].items()}
        self._tokens = group["tokens"]
        self.chunk_offsets = np.asarray(group["chunk_offsets"][:], dtype=np.int64)
        self.chunk_doc = np.asarray(group["chunk_doc"][:], dtype=np.int64)
        self.chunk_index = np.asarray(group["chunk_index"][:], dtype=np.int32)
        self.doc_chunk_offsets = np.asarray(group["doc_chunk_offsets"][:], dtype=np.int64)
        self._block = int(self._tokens.chunks[0])
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_blocks = cache_blocks

    @classmethod
    def open(cls, path: str, cache_blocks: int = 16) -> ChunkStore:
        import zarr

        return cls(zarr.open_group(str(path), mode="r"), str(path), cache_blocks)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_offsets) - 1

    @property
    def num_docs(self) -> int:
        return len(self.doc_chunk_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.chunk_offsets[-1])

    def doc_chunk_range(self, d: int) -> tuple[int, int]:
        return int(self.doc_chunk_offsets[d]), int(self.doc_chunk_offsets[d + 1])

    def chunk_tokens(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_chunks:
            raise IndexError(f"chunk {i} out of range [0, {self.num_chunks})")
        return self._read(int(self.chunk_offsets[i]), int(self.chunk_offsets[i + 1]))

    def prefix_tokens(self, i: int, k: int) -> np.ndarray:
        """Tokens of the (up to) k chunks before chunk i in the same document; empty for its first."""
        if not 0 <= i < self.num_chunks:
            raise IndexError(f"chunk {i} out of range [0, {self.num_chunks})")
        first = max(i - max(k, 0), int(self.doc_chunk_offsets[self.chunk_doc[i]]))
        return self._read(int(self.chunk_offsets[first]), int(self.chunk_offsets[i]))

    def doc_tokens(self, d: int) -> np.ndarray:
        a, b = self.doc_chunk_range(d)
        return self._read(int(self.chunk_offsets[a]), int(self.chunk_offsets[b]))

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(0, dtype=np.int32)
        first, last = start // self._block, (stop - 1) // self._block
        if last - first >= self._cache_blocks:  # a huge span: read it directly
            return np.asarray(self._tokens[start:stop])
        parts = []
        for b in range(first, last + 1):
            block = self._get_block(b)
            lo = max(start - b * self._block, 0)
            hi = min(stop - b * self._block, len(block))
            parts.append(block[lo:hi])
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def _get_block(self, b: int) -> np.ndarray:
        block = self._cache.get(b)
        if block is None:
            block = np.asarray(self._tokens[b * self._block : (b + 1) * self._block])
            self._cache[b] = block
            if len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(b)
        return block


def open_chunk_store(path: str) -> ChunkStore:
    """Open a chunk store, or fail with one line naming the path."""
    try:
        return ChunkStore.open(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no chunk store there") from None

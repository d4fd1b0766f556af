"""A small learnable synthetic corpus written straight to a Megatron indexed dataset.

Used by examples/tiny and the tests of the training engine, which need data that a few-million
parameter model visibly learns in a minute, without a tokenizer. Each document is a walk on a fixed
random sparse transition graph over the vocabulary (a few successors per token), so the achievable
loss is far below log(vocab).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_bolt.atomic import atomic_paths
from megatron_bolt.data.indexed import token_dtype


def write_synthetic_dataset(
    prefix: str | Path,
    num_docs: int = 400,
    vocab_size: int = 512,
    doc_len: tuple[int, int] = (32, 256),
    branching: int = 3,
    seed: int = 0,
    eod_id: int = 0,
) -> str:
    """Write `{prefix}.bin/.idx` (atomically); returns the prefix."""
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    successors = rng.integers(1, vocab_size, size=(vocab_size, branching))
    with atomic_paths(f"{prefix}.bin", f"{prefix}.idx") as (tmp_bin, tmp_idx):
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=token_dtype(vocab_size))
        for _ in range(num_docs):
            n = int(rng.integers(doc_len[0], doc_len[1] + 1))
            doc = np.empty(n + 1, dtype=np.int64)
            doc[0] = rng.integers(1, vocab_size)
            choices = rng.integers(0, branching, size=n)
            for i in range(1, n):
                doc[i] = successors[doc[i - 1], choices[i]]
            doc[n] = eod_id
            builder.add_document(doc, [len(doc)])
        builder.finalize(str(tmp_idx))
    return prefix

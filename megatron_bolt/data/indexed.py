"""Megatron indexed datasets on disk, the two rules every writer here shares.

- Paths: `{prefix}_{key}_document.bin` and `.idx` (Megatron-LM's tools/preprocess_data.py naming;
  `bolt merge` always uses key "text").
- Token dtype: uint16 when the vocabulary has fewer than 65500 entries, else int32 (Megatron-Core's
  `DType.optimal_dtype`, restated here so writers need not import megatron).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

UINT16_VOCAB_LIMIT = 65500


def token_dtype(vocab_size: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    """The on-disk token dtype for a vocabulary of `vocab_size` entries."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


def document_paths(prefix: str | Path, key: str = "text") -> tuple[str, str]:
    """(`.bin`, `.idx`) of the dataset `{prefix}_{key}_document`."""
    base = f"{prefix}_{key}_document"
    return base + ".bin", base + ".idx"

"""Atomic file writes: every output is written under a temporary name next to its final path and
renamed over it only when complete, so a reader (or a resumed run) never sees half a file.

    with atomic_path("out/result.json") as tmp:    # any writer that takes a path
        write_something(tmp)
    atomic_write_text("out/summary.txt", text)
    atomic_write_json("out/summary.json", obj)
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_path(path: str | os.PathLike) -> Path:
    """A unique temporary name in the same directory as `path` (so the rename stays on one filesystem)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on an exception it is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))

"""Atomic file writes, the one home of the rule "outputs are written under a temporary name and
renamed when complete": a reader (or a resumed run) never sees half a file.

    with atomic_path("out/model") as tmp:          # any writer that takes a path (file or directory)
        save_something(tmp)
    with atomic_paths(bin_path, idx_path) as (tmp_bin, tmp_idx):   # a pair that must match
        ...
    atomic_write_text(path, text); atomic_write_json(path, obj); atomic_write_jsonl(path, rows)

Temporary names sit in the final path's directory (so the rename stays on one filesystem), start
with a dot and carry the pid and a random tag (so concurrent writers never share one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def temp_path(path: str | os.PathLike) -> Path:
    """A unique temporary name next to `path`."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def commit(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished `tmp` over `final` (a directory replaces an old one, which os.replace
    alone does only when the old one is empty)."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir() and final.is_dir():
        _remove(final)
    os.replace(tmp, final)


def commit_together(pairs: list[tuple[str | os.PathLike, str | os.PathLike]]) -> None:
    """Commit several (tmp, final) pairs that belong together (a .bin and its .idx): the old
    finals are removed first, so a crash between two renames never pairs an old file with a new
    one; the renames follow the given order, so put the file readers check for (the index) last."""
    if len(pairs) > 1:
        for _, final in reversed(pairs):
            _remove(Path(final))
    for tmp, final in pairs:
        commit(tmp, final)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Temporary paths for `paths`; on success they replace their final paths together
    (`commit_together`), on an exception they are removed."""
    finals = [Path(p) for p in paths]
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
    temps = [temp_path(final) for final in finals]
    try:
        yield temps
        commit_together(list(zip(temps, finals)))
    except BaseException:
        for tmp in temps:
            _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path for `path` (write a file or make a directory there); it replaces `path`
    when the block succeeds and is removed when it raises."""
    with atomic_paths(path) as (tmp,):
        yield tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """One JSON document per line."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

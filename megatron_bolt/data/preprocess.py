"""Corpus preprocessing: JSONL / Parquet documents -> Megatron indexed binaries (+ a BoLT chunk store).

Output, for every JSON key, `{prefix}_{key}_document.bin/.idx` written with Megatron-Core's own
`IndexedDatasetBuilder`: one sequence per document (EOD appended with `append_eod`), uint16 tokens
when the vocabulary has fewer than 65500 entries, else int32 (Megatron's `DType.optimal_dtype`).
With `chunk_store`, the documents of the (single) key are also chunked as in method.md and written
as a chunk store (`megatron_bolt.stores.chunk_store`), chunks without EOD.

Throughput: documents travel in batches; each worker process decodes and validates its batch, then
tokenizes it with one call into the tokenizer's native batch encoder, and sends back one flat int32
array per batch. Results are consumed in submission order, so the output is byte-identical for any
number of workers. Each worker runs its tokenizer on one thread (`workers` is the number of tokenizing
cores) while this process reads the input and writes the outputs; the workers' thread settings live
in their own environment, never in the caller's. A `BatchEncoder` (settings only) travels with each
batch; each worker process loads its tokenizer once (`_worker_tokenizer`).

Bad records are skipped and counted per reason (the first few file:line references kept for the
summary); `strict` turns the first one into a `UserError`. Everything is written under temporary names
and renamed at the end; an interrupted run leaves no `.bin/.idx` pair under the final names.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from megatron_bolt.atomic import commit_together, temp_path
from megatron_bolt.data.indexed import document_paths, token_dtype
from megatron_bolt.errors import UserError
from megatron_bolt.tokenizer import BoltTokenizer, load_tokenizer

REASONS = {
    "invalid_json": "invalid JSON",
    "invalid_utf8": "invalid UTF-8",
    "not_an_object": "line is not a JSON object",
    "missing_key": "missing key",
    "non_string": "field is not a string",
    "empty_text": "empty text",
    "too_large": "document larger than --max-doc-chars",
}
TOKENIZER_TYPES = {
    "HuggingFaceTokenizer": "hf",
    "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece",
}
FIRST_REFS_KEPT = 5


@dataclass
class PreprocessConfig:
    inputs: Sequence[str]
    output_prefix: str
    tokenizer_model: str
    tokenizer_type: str = "HuggingFaceTokenizer"
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1
    log_interval: int = 1000
    chunk_store: str | None = None
    max_doc_chars: int = 10_000_000
    strict: bool = False
    batch_docs: int = 256
    add_latent_tokens: bool = True
    progress: bool = True
    tokenizer_threads: int = 1
    chunk_poisson_mean: float = 7.0  # chunks of min(Poisson(mean) + 1, 20) sentences
    chunking: str = "random"  # "uniform": the reference's validation chunks (ceil(n / (mean + 1)), even)


@dataclass
class PreprocessResult:
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    chunks: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)
    first_bad: dict[str, list[str]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    dtype: str = ""

    def summary(self) -> str:
        secs = max(self.seconds, 1e-9)
        skipped = sum(self.skipped.values())
        parts = [
            f"{self.documents} documents, {self.tokens} tokens in {self.seconds:.1f}s "
            f"({self.documents / secs:.0f} docs/s, {self.tokens / secs:.0f} tokens/s)",
            f"skipped {skipped}",
        ]
        if self.chunks:
            parts.append(f"{self.chunks} chunks")
        return "; ".join(parts)

    def skipped_lines(self) -> list[str]:
        return [
            f"  skipped {n} x {REASONS[r]} ({r}); first at {', '.join(self.first_bad[r])}"
            for r, n in sorted(self.skipped.items())
        ]


# --------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Input files in a stable order: each argument as given, globs expanded and sorted."""
    files: list[str] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            matched = sorted(glob.glob(pat, recursive=True))
            if not matched:
                raise UserError(f"--input {pat}: no file matches")
            files.extend(matched)
        elif os.path.isdir(pat):
            raise UserError(f"--input {pat} is a directory; give files or a glob such as '{pat}/*.jsonl'")
        elif not os.path.exists(pat):
            raise UserError(f"--input {pat}: no such file")
        else:
            files.append(pat)
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _is_parquet(path: str) -> bool:
    return path.endswith((".parquet", ".pq"))


def iter_batches(files: Sequence[str], keys: Sequence[str], batch_docs: int) -> Iterator[list[tuple]]:
    """Batches of records (file index, line number, payload): raw bytes for JSONL, a dict for Parquet."""
    batch: list[tuple] = []
    for fi, path in enumerate(files):
        if _is_parquet(path):
            for records in _iter_parquet(fi, path, keys, batch_docs):
                batch.extend(records)
                if len(batch) >= batch_docs:
                    yield batch
                    batch = []
            continue
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue  # blank lines (a trailing newline, say) are not documents
                batch.append((fi, n, line))
                if len(batch) >= batch_docs:
                    yield batch
                    batch = []
    if batch:
        yield batch


def _iter_parquet(fi: int, path: str, keys: Sequence[str], batch_docs: int) -> Iterator[list[tuple]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    present = [k for k in keys if k in pf.schema_arrow.names]
    row = 0
    for rb in pf.iter_batches(batch_size=batch_docs, columns=present or None):
        cols = {k: rb.column(k).to_pylist() for k in present}
        n = rb.num_rows
        yield [(fi, row + i + 1, {k: cols[k][i] for k in present}) for i in range(n)]
        row += n


# --------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _worker_tokenizer(tokenizer_model: str, kind: str, add_latent: bool, threads: int) -> BoltTokenizer:
    """The tokenizer of this process, loaded once per process and setting (workers receive a fresh
    `BatchEncoder` with every batch, so the encoder itself cannot hold it)."""
    tokenizer = load_tokenizer(tokenizer_model, add_latent_tokens=add_latent, kind=kind)
    if hasattr(tokenizer, "num_threads"):  # SentencePiece; the HF backend's come from the environment
        tokenizer.num_threads = threads
    return tokenizer


@dataclass(frozen=True)
class BatchEncoder:
    """Validates and tokenizes one batch of records (in a worker, or inline with one worker); small
    and picklable, so it travels to the workers with each batch."""

    tokenizer_model: str
    kind: str
    add_latent_tokens: bool
    keys: tuple[str, ...]
    append_eod: bool
    chunk: bool  # also cut the first key's documents into chunks
    max_doc_chars: int
    threads: int
    chunk_poisson_mean: float
    uniform: bool  # uniform (validation) chunks instead of the Poisson draw

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> BatchEncoder:
        return cls(cfg.tokenizer_model, TOKENIZER_TYPES[cfg.tokenizer_type], cfg.add_latent_tokens,
                   tuple(cfg.json_keys), cfg.append_eod, bool(cfg.chunk_store), cfg.max_doc_chars,
                   cfg.tokenizer_threads, cfg.chunk_poisson_mean, cfg.chunking == "uniform")

    def __call__(self, batch: list[tuple]) -> dict:
        from megatron_bolt.data.chunking import chunk_token_lengths

        tok = _worker_tokenizer(self.tokenizer_model, self.kind, self.add_latent_tokens, self.threads)
        bad, ok_texts = [], []
        in_bytes = 0
        for fi, line, payload in batch:
            if isinstance(payload, bytes):
                in_bytes += len(payload)
            texts, reason, detail = _validate(payload, self.keys, self.max_doc_chars)
            if texts is None:
                bad.append((reason, fi, line, detail))
            else:
                ok_texts.append(texts)
        out: dict = {"bad": bad, "n": len(ok_texts), "in_bytes": in_bytes, "keys": {}}
        for k, key in enumerate(self.keys):
            texts = [t[k] for t in ok_texts]
            chunk_lengths = None
            if self.chunk and k == 0:
                # One tokenization per document; chunk boundaries become token counts through the
                # tokens' end offsets (chunking.chunk_token_lengths).
                encoded = tok.encode_batch_with_ends(texts)
                ids_list = [ids for ids, _ in encoded]
                chunk_lengths = [chunk_token_lengths(t, ends, self.chunk_poisson_mean, self.uniform)
                                 for t, (_, ends) in zip(texts, encoded)]
            else:
                ids_list = tok.encode_batch(texts)
            lengths = np.fromiter((len(a) for a in ids_list), dtype=np.int64, count=len(ids_list))
            if self.append_eod:
                eod = np.asarray([tok.eod], dtype=np.int32)
                ids_list = [np.concatenate([a, eod]) for a in ids_list]
                lengths = lengths + 1
            flat = np.concatenate(ids_list) if ids_list else np.zeros(0, np.int32)
            entry = {"tokens": flat.astype(np.int32, copy=False), "lengths": lengths}
            if chunk_lengths is not None:
                entry["chunk_lengths"] = (
                    np.concatenate(chunk_lengths) if chunk_lengths else np.zeros(0, np.int64)
                )
                entry["chunks_per_doc"] = np.asarray([len(c) for c in chunk_lengths], dtype=np.int64)
            out["keys"][key] = entry
        return out


def _worker_environment(tokenizer_threads: int) -> None:
    """Pool initializer: the HF tokenizer's threads, set in the worker process only. `tokenizers`
    has no API for them: batch encodes read TOKENIZERS_PARALLELISM at every call and rayon reads
    RAYON_NUM_THREADS once, when its pool starts. The caller's environment is never touched."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if tokenizer_threads > 1 else "false"
    if tokenizer_threads > 1:
        os.environ["RAYON_NUM_THREADS"] = str(tokenizer_threads)


def _validate(payload, keys: Sequence[str], max_chars: int) -> tuple[list[str] | None, str, str]:
    """The texts of one record, or None with (reason, detail)."""
    if isinstance(payload, bytes):
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, "invalid_utf8", str(exc)
        try:
            obj = json.loads(line)
        except ValueError as exc:
            return None, "invalid_json", str(exc)
        if not isinstance(obj, dict):
            return None, "not_an_object", type(obj).__name__
    else:
        obj = payload
    texts = []
    for key in keys:
        if key not in obj:
            return None, "missing_key", key
        value = obj[key]
        if isinstance(value, bytes):  # Parquet binary columns
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                return None, "invalid_utf8", f"{key}: {exc}"
        if not isinstance(value, str):
            return None, "non_string", f"{key} is {type(value).__name__}"
        if len(value) > max_chars:
            return None, "too_large", f"{key} has {len(value)} characters"
        try:
            value.encode("utf-8")  # JSON escapes can carry lone surrogates
        except UnicodeEncodeError as exc:
            return None, "invalid_utf8", f"{key}: {exc}"
        if not value.strip():
            return None, "empty_text", key
        texts.append(value)
    return texts, "", ""


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on a terminal, Megatron-style log lines every `log_interval` documents otherwise."""

    def __init__(self, enabled: bool, log_interval: int):
        self.start = time.time()
        self.docs = self.tokens = 0
        self.log_interval = max(1, log_interval)
        self._next_log = self.log_interval
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit="doc", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        elif self.enabled and self.docs >= self._next_log:
            elapsed = max(time.time() - self.start, 1e-9)
            print(f"processed {self.docs} documents ({self.docs / elapsed:.0f} docs/s, {rate:.0f} tokens/s)",
                  file=sys.stderr, flush=True)
            while self._next_log <= self.docs:
                self._next_log += self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _results(cfg: PreprocessConfig, files: list[str], encoder: BatchEncoder) -> Iterator[dict]:
    """Encoded batches in input order; at most a few batches per worker in flight (bounded memory).

    Tokenizing always runs in worker processes, one worker included: their thread settings can
    then live in their own environment (`_worker_environment`), and this process reads and writes
    while they tokenize.
    """
    import multiprocessing as mp

    batches = iter_batches(files, cfg.json_keys, cfg.batch_docs)
    if cfg.tokenizer_threads > 1:
        # A fresh (spawned) process: a forked child would inherit the caller's rayon state, which
        # `tokenizers` disables after a fork if it was ever used.
        ctx = mp.get_context("spawn")
    else:
        # Fork where possible: the workers inherit the imported modules and the sentence splitter.
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(cfg.workers, initializer=_worker_environment, initargs=(cfg.tokenizer_threads,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(encoder, (batch,)))
            if len(pending) >= 3 * cfg.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Run the whole conversion; see the module docstring.

    Each worker tokenizes on one thread by default, so `workers` is the number of tokenizing
    cores; `tokenizer_threads` > 1 lets the HF tokenizer (rayon) / SentencePiece use more per worker.
    """
    if cfg.tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"--tokenizer-type {cfg.tokenizer_type}: choose one of {', '.join(TOKENIZER_TYPES)}")
    if not 0 <= cfg.chunk_poisson_mean <= 100:
        raise UserError(f"--chunk-poisson-mean must be in [0, 100], got {cfg.chunk_poisson_mean}")
    if cfg.chunking not in ("random", "uniform"):
        raise UserError(f"--chunking {cfg.chunking}: choose random or uniform")
    if cfg.chunk_store and len(cfg.json_keys) != 1:
        raise UserError("--chunk-store takes a single --json-keys key")
    if cfg.workers < 1 or cfg.batch_docs < 1 or cfg.tokenizer_threads < 1:
        raise UserError("--workers, --batch-docs and --tokenizer-threads must be at least 1")
    kind = TOKENIZER_TYPES[cfg.tokenizer_type]
    files = expand_inputs(cfg.inputs)
    tokenizer = load_tokenizer(cfg.tokenizer_model, add_latent_tokens=cfg.add_latent_tokens, kind=kind)

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = token_dtype(tokenizer.vocab_size)
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    finals = {key: document_paths(cfg.output_prefix, key) for key in cfg.json_keys}
    temps = {key: (str(temp_path(b)), str(temp_path(i))) for key, (b, i) in finals.items()}
    builders = {key: IndexedDatasetBuilder(temps[key][0], dtype=dtype) for key in cfg.json_keys}
    chunk_writer = None
    result = PreprocessResult(dtype=np.dtype(dtype).name)
    progress = _Progress(cfg.progress, cfg.log_interval)
    encoder = BatchEncoder.from_config(cfg)
    try:
        if cfg.chunk_store:
            from megatron_bolt.data.chunking import load_sentence_splitter
            from megatron_bolt.stores.chunk_store import ChunkStoreWriter

            load_sentence_splitter()
            chunk_writer = ChunkStoreWriter(cfg.chunk_store, tokenizer,
                                            extra_attrs={"chunk_poisson_mean": cfg.chunk_poisson_mean,
                                                         "chunking": cfg.chunking})
        start = time.time()
        for out in _results(cfg, files, encoder):
            for reason, fi, line, detail in out["bad"]:
                where = f"{files[fi]}:{line}"
                if cfg.strict:
                    raise UserError(f"{where}: {REASONS[reason]} ({detail}) [--strict]")
                result.skipped[reason] = result.skipped.get(reason, 0) + 1
                refs = result.first_bad.setdefault(reason, [])
                if len(refs) < FIRST_REFS_KEPT:
                    refs.append(where)
            batch_tokens = 0
            for key, entry in out["keys"].items():
                tokens, lengths = entry["tokens"], entry["lengths"]
                bounds = np.concatenate([[0], np.cumsum(lengths)])
                builder = builders[key]
                for d in range(len(lengths)):
                    builder.add_document(tokens[bounds[d] : bounds[d + 1]], [int(lengths[d])])
                batch_tokens += len(tokens)
                if chunk_writer is not None and "chunk_lengths" in entry:
                    _add_chunks(chunk_writer, entry, bounds, cfg.append_eod)
            result.documents += out["n"]
            result.tokens += batch_tokens
            result.input_bytes += out["in_bytes"]
            progress.update(out["n"], batch_tokens)
        for key, builder in builders.items():
            builder.finalize(temps[key][1])
        if chunk_writer is not None:
            result.chunks = chunk_writer.num_chunks
            chunk_writer.close()
            result.outputs.append(cfg.chunk_store)
        result.seconds = time.time() - start
        commit_together([pair for key in finals for pair in zip(temps[key], finals[key])])
        for key in finals:
            result.outputs += list(finals[key])
    except BaseException:
        for key, builder in builders.items():
            try:
                builder.data_file.close()
            except Exception:
                pass
            for p in temps[key]:
                if os.path.exists(p):
                    os.remove(p)
        if chunk_writer is not None:
            chunk_writer.abort()
        raise
    finally:
        progress.close()
    return result


def _add_chunks(writer, entry: dict, bounds: np.ndarray, append_eod: bool) -> None:
    tokens, per_doc = entry["tokens"], entry["chunks_per_doc"]
    cl = entry["chunk_lengths"]
    c = 0
    for d in range(len(per_doc)):
        a, b = int(bounds[d]), int(bounds[d + 1]) - (1 if append_eod else 0)
        n = int(per_doc[d])
        writer.add_document_flat(tokens[a:b], cl[c : c + n])
        c += n

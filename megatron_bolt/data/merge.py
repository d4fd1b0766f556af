"""Merge: a chunk store + a latent store -> a Megatron indexed dataset of latent-thought documents.

Every document is rebuilt from its chunks as `BOS chunk_1 ... chunk_n EOS`, each chunk in prior
form (`SoL PRIOR Z EoL X`) or posterior form (`SoL EoL X SoL POST Z EoL`), drawn independently per
chunk with P(posterior) = `posterior_prob`. The reference redraws the form every time a document is
read; a static .bin can only do that by holding E epochs of documents, each with its own draw, so
the output is epoch 0 (all documents in order), epoch 1, ..., then the raw (latent-free) copies.

Randomness: epoch e draws its forms from `default_rng([seed, e])`, one uniform per chunk in chunk
order, whatever the windowing, so a fixed seed gives byte-identical files. Raw copies come from
`default_rng([seed, epochs])`. Missing latents (blocks not done) are an error, or with
`allow_missing` the chunk is written raw (its form draw is still consumed, so the other chunks'
forms do not depend on which blocks were finished).

Speed: documents are processed in windows of whole documents (about `window_tokens` chunk tokens);
a window is one zarr read of the chunk tokens, one read of each latent block's chosen latents, and
one numpy gather (`formats.assemble_documents`), so the cost is close to copying the bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_bolt.atomic import atomic_paths
from megatron_bolt.data.formats import POSTERIOR, PRIOR, RAW, assemble_documents
from megatron_bolt.data.indexed import document_paths, token_dtype
from megatron_bolt.errors import UserError


@dataclass
class MergeSummary:
    output_prefix: str  # the Megatron data prefix: {output_prefix}_text_document
    dtype: str
    epochs: int
    documents: int = 0  # latent documents written (all epochs)
    raw_documents: int = 0  # latent-free copies written
    empty_documents_skipped: int = 0  # documents with no chunks (per pass, counted once)
    chunks: dict[str, int] = field(
        default_factory=lambda: {"prior": 0, "posterior": 0, "missing_raw": 0, "empty_raw": 0, "raw_copy": 0}
    )
    tokens: int = 0
    latent_tokens: int = 0  # Z tokens
    special_tokens: int = 0  # SoL/EoL/PRIOR/POST (BOS/EOS not counted)
    seconds: float = 0.0

    @property
    def latent_share(self) -> float:
        return self.latent_tokens / self.tokens if self.tokens else 0.0

    def format(self) -> str:
        c = self.chunks
        mb = self.tokens * np.dtype(self.dtype).itemsize / 1e6
        return "\n".join(
            [
                f"wrote {self.output_prefix}_text_document.bin/.idx ({self.dtype}, {mb:.1f} MB in {self.seconds:.1f} s)",
                f"documents: {self.documents} with latents over {self.epochs} epoch(s), {self.raw_documents} raw copies,"
                f" {self.empty_documents_skipped} empty skipped",
                f"chunks: prior {c['prior']}, posterior {c['posterior']}, raw (latent missing) {c['missing_raw']},"
                f" raw (latent empty) {c['empty_raw']}, in raw copies {c['raw_copy']}",
                f"tokens: {self.tokens}, latent {self.latent_tokens} ({100 * self.latent_share:.1f}%),"
                f" latent specials {self.special_tokens}",
            ]
        )


def _latent_ids(special_tokens: dict, where: str):
    from megatron_bolt.tokenizer import LatentTokenIds

    missing = [k for k in ("bos", "eos") if k not in special_tokens]
    if missing:
        raise UserError(f"{where}: attribute special_tokens lacks {', '.join(missing)} (has {sorted(special_tokens)})")
    ids = LatentTokenIds.from_special_tokens(special_tokens, where)
    return ids, int(special_tokens["bos"]), int(special_tokens["eos"])


class _Windows:
    """Doc-aligned windows over the chunk store and gathered inputs for assemble_documents."""

    def __init__(self, chunks_path: str, window_tokens: int):
        import zarr

        from megatron_bolt.stores.chunk_store import ChunkStore

        try:
            self.store = ChunkStore.open(chunks_path)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise UserError(f"{chunks_path}: not a readable chunk store ({exc})") from None
        # Token windows are read straight from the `tokens` array of the chunk-store layout: one
        # large slice per window instead of per-chunk reads.
        self.tokens = zarr.open_group(chunks_path, mode="r")["tokens"]
        self.chunk_offsets = self.store.chunk_offsets
        doc_chunks = self.store.doc_chunk_offsets
        self.doc_chunk_offsets = doc_chunks
        counts = np.diff(doc_chunks)
        self.empty_docs = int((counts == 0).sum())
        self.nonempty = np.flatnonzero(counts > 0)  # documents that are written
        doc_token_end = self.chunk_offsets[doc_chunks[1:]]
        self.windows: list[tuple[int, int]] = []
        d0, num_docs = 0, len(counts)
        while d0 < num_docs:
            target = self.chunk_offsets[doc_chunks[d0]] + window_tokens
            d1 = max(d0 + 1, int(np.searchsorted(doc_token_end, target, side="right")))
            self.windows.append((d0, min(d1, num_docs)))
            d0 = d1

    def read(self, d0: int, d1: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
        """Chunks [c0, c1) of documents [d0, d1): (c0, c1, x tokens, x lengths, chunks per doc)."""
        c0, c1 = int(self.doc_chunk_offsets[d0]), int(self.doc_chunk_offsets[d1])
        offs = self.chunk_offsets[c0 : c1 + 1]
        x = np.asarray(self.tokens[int(offs[0]) : int(offs[-1])]) if c1 > c0 else np.zeros(0, np.int32)
        return c0, c1, x, np.diff(offs), np.diff(self.doc_chunk_offsets[d0 : d1 + 1])


def _chosen_latents(latents, c0: int, c1: int, done: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chosen latents of chunks [c0, c1): (flat tokens, lengths, have-latent mask)."""
    bs = latents.block_size
    parts, lengths, have = [], np.zeros(c1 - c0, np.int64), np.zeros(c1 - c0, bool)
    c = c0
    while c < c1:
        b = c // bs
        end = min(c1, (b + 1) * bs)
        if b in done:
            offsets, tokens = latents.read_block_chosen(b)
            j0, j1 = c - b * bs, end - b * bs
            parts.append(tokens[offsets[j0] : offsets[j1]])
            lengths[c - c0 : end - c0] = np.diff(offsets[j0 : j1 + 1])
            have[c - c0 : end - c0] = True
        c = end
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return flat, lengths, have


def merge_latents(
    chunks_path: str | Path,
    latents_path: str | Path | None,
    output_prefix: str | Path,
    epochs: int | None = 1,
    posterior_prob: float = 0.5,
    raw_mix: float = 0.0,
    seed: int = 0,
    allow_missing: bool = False,
    empty_latents: str = "keep",
    window_tokens: int = 1 << 22,
    progress: bool = True,
    min_tokens: int | None = None,
) -> MergeSummary:
    """Write `{output_prefix}_text_document.bin/.idx` (see the module docstring); returns the summary.

    latents_path None writes every chunk raw (`BOS chunks EOS`): a raw baseline's data, laid out
    exactly as the latent data minus the latents.

    raw_mix R adds round(R * documents * epochs) latent-free copies (BOS + chunks + EOS): R = 1
    means as many raw documents as latent ones; whole passes first, then a random subset.
    empty_latents "raw" writes chunks whose chosen latent is empty in raw form instead of as an
    empty thought (`SoL PRIOR EoL X`): a model then only ever sees SoL where a thought follows.

    epochs None with `min_tokens` N writes as many epochs as a training run of N tokens reads
    (see `planned_train_tokens`): epochs are added until the file, with the raw copies that will
    follow, holds at least N tokens, so every document is read about once per epoch, each time
    with fresh forms, and Megatron never wraps around to forms it has shown before.
    The summary is also written to `summary_path(output_prefix)`.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_bolt.stores.latent_store import LatentStore

    start_time = time.perf_counter()
    if (epochs is None) == (min_tokens is None):
        raise UserError("give either --epochs or --min-tokens, not both or neither")
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    if min_tokens is not None and min_tokens < 1:
        raise UserError(f"--min-tokens must be >= 1, got {min_tokens}")
    if not 0.0 <= posterior_prob <= 1.0:
        raise UserError(f"--posterior-prob must be in [0, 1], got {posterior_prob}")
    if empty_latents not in ("keep", "raw"):
        raise UserError(f"--empty-latents must be 'keep' or 'raw', got {empty_latents!r}")
    if raw_mix < 0:
        raise UserError(f"--raw-mix must be >= 0, got {raw_mix}")
    chunks_path = str(chunks_path)
    latents_path = None if latents_path is None else str(latents_path)
    win = _Windows(chunks_path, window_tokens)
    ids, bos, eos = _latent_ids(win.store.special_tokens, chunks_path)
    vocab = win.store.vocab_size
    dtype = token_dtype(vocab)

    num_chunks = win.store.num_chunks
    latents = None if latents_path is None else LatentStore.open(latents_path, mode="r")
    if latents is None:  # the raw baseline: the same documents, every chunk latent-free
        done: set[int] = set()
    elif latents.num_chunks != num_chunks:
        raise UserError(f"{latents_path}: latent store has {latents.num_chunks} chunks, {chunks_path} has {num_chunks}")
    else:
        done = latents.blocks_done()
    if latents is not None and latents.num_blocks > len(done) and not allow_missing:
        first = min(set(range(latents.num_blocks)) - done)
        raise UserError(
            f"{latents_path}: {latents.status()}; first missing block {first} (chunks from "
            f"{latents.block_range(first).start}). Finish the E-step, or pass --allow-missing to write those chunks raw"
        )

    summary = MergeSummary(output_prefix=str(output_prefix), dtype=np.dtype(dtype).name, epochs=0)
    summary.empty_documents_skipped = win.empty_docs
    num_docs = len(win.nonempty)
    # Tokens of one raw (latent-free) pass over every document: chunk tokens + BOS/EOS.
    raw_pass_tokens = int(win.chunk_offsets[-1]) + 2 * num_docs if num_docs else 0

    def covered(epochs_written: int) -> bool:
        if epochs is not None:
            return epochs_written >= epochs
        expected_raw = raw_mix * epochs_written * raw_pass_tokens  # the raw copies appended after
        return epochs_written >= 1 and summary.tokens + expected_raw >= min_tokens

    from tqdm import tqdm

    bar = tqdm(total=num_chunks * (epochs or 1), unit="chunk", desc="merge", file=sys.stderr, disable=not progress)
    with bar, atomic_paths(*document_paths(output_prefix)) as (tmp_bin, tmp_idx):
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        write = _PassWriter(win, latents, done, builder, summary, ids, bos, eos, dtype, vocab, chunks_path,
                            latents_path, posterior_prob, empty_latents, bar)
        while not covered(summary.epochs):  # epoch e: every document once, forms from default_rng([seed, e])
            if summary.epochs >= 1 and epochs is None:
                bar.total += num_chunks
            write.latent_pass(np.random.default_rng([seed, summary.epochs]))
            summary.epochs += 1
        # Raw copies: whole passes first, then a random subset of documents.
        n_raw = int(round(raw_mix * num_docs * summary.epochs))
        raw_rng = np.random.default_rng([seed, summary.epochs])
        raw_subset = np.zeros(win.doc_chunk_offsets.shape[0] - 1, dtype=bool)
        if num_docs and n_raw % num_docs:
            raw_subset[raw_rng.choice(win.nonempty, size=n_raw % num_docs, replace=False)] = True
        if num_docs:
            bar.total += num_chunks * (n_raw // num_docs) + int(np.diff(win.doc_chunk_offsets)[raw_subset].sum())
            for _ in range(n_raw // num_docs):
                write.raw_pass(None)
            if n_raw % num_docs:
                write.raw_pass(raw_subset)
        builder.finalize(str(tmp_idx))
    summary.seconds = time.perf_counter() - start_time
    _write_summary(summary)
    return summary


@dataclass
class _PassWriter:
    """Writes one pass over the documents (latent forms, or raw copies) into the builder."""

    win: _Windows
    latents: Any  # LatentStore or None (raw baseline)
    done: set[int]
    builder: Any  # IndexedDatasetBuilder
    summary: MergeSummary
    ids: Any  # LatentTokenIds
    bos: int
    eos: int
    dtype: Any
    vocab: int
    chunks_path: str
    latents_path: str | None
    posterior_prob: float
    empty_latents: str
    bar: Any

    def latent_pass(self, rng: np.random.Generator) -> None:
        summary = self.summary
        for d0, d1 in self.win.windows:
            c0, c1, x, x_len, doc_counts = self.win.read(d0, d1)
            _check_ids(x, self.vocab, self.chunks_path, "chunk")
            draw = rng.random(c1 - c0)
            forms = np.where(draw < self.posterior_prob, POSTERIOR, PRIOR)
            if self.latents is None:
                z, z_len, have = np.zeros(0, np.int32), np.zeros(c1 - c0, np.int64), np.zeros(c1 - c0, bool)
            else:
                z, z_len, have = _chosen_latents(self.latents, c0, c1, self.done)
            _check_ids(z, self.vocab, self.latents_path, "latent")
            summary.chunks["missing_raw"] += int((~have).sum())
            if self.empty_latents == "raw":
                empty = have & (z_len == 0)
                summary.chunks["empty_raw"] += int(empty.sum())
                have &= ~empty
            forms[~have] = RAW
            summary.chunks["prior"] += int((forms == PRIOR).sum())
            summary.chunks["posterior"] += int((forms == POSTERIOR).sum())
            summary.latent_tokens += int(z_len.sum())
            summary.special_tokens += 3 * int((forms == PRIOR).sum()) + 5 * int((forms == POSTERIOR).sum())
            summary.documents += self._add(x, x_len, z, z_len, forms, doc_counts)

    def raw_pass(self, subset: np.ndarray | None) -> None:
        """Every document (subset None) or the documents of the boolean mask `subset`, raw."""
        for d0, d1 in self.win.windows:
            c0, c1, x, x_len, doc_counts = self.win.read(d0, d1)
            _check_ids(x, self.vocab, self.chunks_path, "chunk")
            forms = np.full(c1 - c0, RAW)
            z, z_len = np.zeros(0, np.int32), np.zeros(c1 - c0, np.int64)
            if subset is not None:
                keep_docs = subset[d0:d1]
                keep_chunks = np.repeat(keep_docs, doc_counts)
                x = x[np.repeat(keep_chunks, x_len)]
                x_len, forms, z_len = x_len[keep_chunks], forms[keep_chunks], z_len[keep_chunks]
                doc_counts = np.where(keep_docs, doc_counts, 0)
            self.summary.chunks["raw_copy"] += len(forms)
            self.summary.raw_documents += self._add(x, x_len, z, z_len, forms, doc_counts)

    def _add(self, x, x_len, z, z_len, forms, doc_counts) -> int:
        nonempty = doc_counts > 0
        tokens, doc_lengths = assemble_documents(
            x, x_len, z, z_len, forms, doc_counts[nonempty], self.ids, self.bos, self.eos, dtype=self.dtype
        )
        _add_documents(self.builder, tokens, doc_lengths)
        self.summary.tokens += len(tokens)
        self.bar.update(len(forms))
        return len(doc_lengths)


def summary_path(output_prefix: str | Path) -> str:
    """Where merge records its MergeSummary (JSON), next to the .bin/.idx."""
    return f"{output_prefix}_text_document.merge.json"


def _write_summary(summary: MergeSummary) -> None:
    path = summary_path(summary.output_prefix)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(summary), f, indent=2)
    os.replace(tmp, path)


def read_summary(output_prefix: str | Path) -> MergeSummary:
    """The MergeSummary a finished merge wrote for `output_prefix`."""
    path = summary_path(output_prefix)
    try:
        with open(path) as f:
            return MergeSummary(**json.load(f))
    except FileNotFoundError:
        raise UserError(f"{path}: no merge summary (run `bolt merge --output-prefix {output_prefix}` first)") from None


def planned_train_tokens(steps: int, global_batch: int, seq_len: int,
                         surplus: float = 0.005) -> int:
    """Tokens a training run of `steps` x `global_batch` samples of `seq_len` reads from one dataset:
    Megatron's GPTDataset needs samples * seq_len + 1 tokens, and a blend builds each dataset with
    `mid_level_dataset_surplus` (0.5%) more samples than its share (megatron.core.datasets,
    `GPTDataset._get_num_epochs`, `_get_size_per_split_per_dataset`)."""
    samples = math.ceil(steps * global_batch * (1 + surplus))
    return samples * seq_len + 1


def epochs_for(train_tokens: int, tokens_per_epoch: int) -> int:
    """Epochs of `tokens_per_epoch` that cover `train_tokens` (rounded up, at least 1)."""
    return max(1, -(-train_tokens // max(1, tokens_per_epoch)))


def _check_ids(tokens: np.ndarray, vocab: int, where: str, what: str) -> None:
    if len(tokens) and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        bad = int(tokens.max()) if int(tokens.max()) >= vocab else int(tokens.min())
        raise UserError(f"{where}: {what} token id {bad} outside the vocabulary [0, {vocab})")


def _add_documents(builder, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
    """One builder document per output document (Megatron's document index = our documents)."""
    ends = np.cumsum(doc_lengths)
    starts = ends - doc_lengths
    for s, e in zip(starts.tolist(), ends.tolist()):
        builder.add_document(tokens[s:e], [e - s])

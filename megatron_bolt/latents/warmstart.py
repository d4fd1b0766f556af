"""The warm start (method.md): one latent per chunk from a teacher, written as a K=1 latent store.

For every chunk of a chunk store, its text and its prefix (the previous `prefix_chunks` chunks of the
same document) are decoded with the corpus tokenizer and given to the teacher; the latent text that
comes back is encoded with the same tokenizer (no BOS/EOS) and stored as sample 0 with
log q = log p = log w = 0 and chosen = 0, so `bolt merge` reads it like any E-step output. Empty
latents are kept (merge writes `SoL PRIOR EoL X`). Teacher text that spells a special token
(`</s>`, `<|END_OF_LATENT|>`, ...) would be encoded as that special and break the merged layout, so
those tokens are dropped and counted.

Blocks are the unit of work and of resume, as in the E-step: each block is written in full and only
then marked done, a re-run skips finished blocks, and `shard=(i, N)` takes blocks b with b % N == i.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from megatron_bolt.config import EStepConfig
from megatron_bolt.errors import UserError
from megatron_bolt.latents.blocks import ShardBlocks
from megatron_bolt.latents.estep import open_or_create_store
from megatron_bolt.latents.teachers import Teacher, TeacherError
from megatron_bolt.stores.chunk_store import open_chunk_store
from megatron_bolt.tokenizer import BoltTokenizer, load_tokenizer


@dataclass
class WarmstartSummary:
    blocks: int = 0
    chunks: int = 0
    latent_tokens: int = 0
    empty_latents: int = 0
    specials_dropped: int = 0
    requests: int = 0
    retries: int = 0
    truncated: int = 0
    skipped_blocks: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (
            f"{self.chunks} chunks in {self.blocks} blocks, {self.latent_tokens} latent tokens, "
            f"{self.empty_latents} empty latents, {self.specials_dropped} special tokens dropped; "
            f"{self.requests} requests, {self.retries} retries, {self.truncated} answers cut at max tokens; "
            f"{self.seconds:.1f}s "
            f"({self.chunks / s:.2f} chunks/s); {self.skipped_blocks} blocks already done"
        )


def corpus_tokenizer(chunks, tokenizer_path: str | None) -> BoltTokenizer:
    """The tokenizer given, or the one the chunk store records, checked against the store's ids."""
    path = tokenizer_path or chunks.tokenizer
    if not path:
        raise UserError(f"{chunks.path}: the chunk store records no tokenizer; pass --tokenizer")
    try:
        tok = load_tokenizer(path, add_latent_tokens="sol" in chunks.special_tokens)
    except UserError as exc:
        hint = "" if tokenizer_path else " (the path the chunk store records; pass --tokenizer)"
        raise UserError(f"{exc}{hint}") from None
    have = tok.info()["special_tokens"]
    if tok.vocab_size != chunks.vocab_size or have != chunks.special_tokens:
        raise UserError(
            f"tokenizer {path} does not match the chunk store {chunks.path}: vocab {tok.vocab_size} vs "
            f"{chunks.vocab_size}, specials {have} vs {chunks.special_tokens}"
        )
    return tok


def _check_same_teacher(store, teacher: Teacher) -> None:
    want = {"engine": f"teacher:{teacher.name}", "model": teacher.model}
    have = {k: store.attrs.get(k) for k in want}
    if have != want:
        raise UserError(f"{store.path}: store was written by {have}, this run is {want}; use a new --out")


def run_warmstart(
    chunks_path: str,
    out_path: str,
    teacher: Teacher,
    tokenizer_path: str | None = None,
    prefix_chunks: int = 1,
    block_size: int = 256,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> WarmstartSummary:
    """Fill every unfinished block of this shard of `out_path` with the teacher's latents."""
    if prefix_chunks < 0:
        raise UserError("--prefix-chunks must be >= 0")
    chunks = open_chunk_store(chunks_path)
    tok = corpus_tokenizer(chunks, tokenizer_path)
    specials = np.asarray(sorted(set(chunks.special_tokens.values())), dtype=np.int32)
    # K=1 and no sampling of our own: max_latent_tokens / seed do not apply (recorded as 0).
    settings = EStepConfig(samples=1, prefix_chunks=prefix_chunks, max_latent_tokens=0, seed=0)
    meta = {"engine": f"teacher:{teacher.name}", "model": teacher.model, "chunks": str(chunks_path),
            "tokenizer": tok.name}
    store = open_or_create_store(out_path, chunks.num_chunks, settings, block_size, meta)
    _check_same_teacher(store, teacher)

    blocks = ShardBlocks(store, shard, f"warmstart {teacher.name} shard {shard[0]}/{shard[1]}", progress)
    summary = WarmstartSummary(skipped_blocks=blocks.skipped)
    requests0, retries0, truncated0 = teacher.requests, teacher.retries, teacher.truncated
    start = time.perf_counter()
    try:
        for b, idx in blocks:
            prefixes = [tok.decode(chunks.prefix_tokens(i, prefix_chunks)) for i in idx]
            texts = [tok.decode(chunks.chunk_tokens(i)) for i in idx]
            latent_texts = teacher.latents(prefixes, texts, progress=blocks.advance)
            latents = []
            for ids in tok.encode_batch(latent_texts):
                keep = ~np.isin(ids, specials)
                summary.specials_dropped += int((~keep).sum())
                latents.append([ids[keep]])
            n = len(idx)
            zeros = np.zeros((n, 1))
            empty = sum(len(z[0]) == 0 for z in latents)
            blocks.write(b, latents, zeros, zeros, zeros, np.zeros(n, dtype=np.int32),
                         meta={"engine": f"teacher:{teacher.name}", "empty_latents": int(empty)})
            summary.blocks += 1
            summary.chunks += n
            summary.latent_tokens += sum(len(z[0]) for z in latents)
            summary.empty_latents += empty
            blocks.postfix(blocks=summary.blocks, retries=teacher.retries - retries0)
    except TeacherError as exc:
        raise TeacherError(f"{exc} ({summary.blocks} blocks written this run; re-run the same command to resume)") from None
    finally:
        blocks.close()
        summary.seconds = time.perf_counter() - start
        summary.requests = teacher.requests - requests0
        summary.retries = teacher.retries - retries0
        summary.truncated = teacher.truncated - truncated0
    return summary

"""The Monte Carlo E-step of BoLT (method.md): sample K latents per chunk from q, weight them by
p/q, resample one, and write the store block by block.

For chunk X with prefix C (the previous `prefix_chunks` chunks of its document), with BOS first as
every training document has it:
    q prompt        BOS C SoL EoL X SoL POST          -> sample Z ... EoL (stop at EoL)
    log q(Z | X)    sum of the sampled tokens' log-probs (Z and the closing EoL)
    log p(Z, X)     sum of the log-probs of `SoL PRIOR Z EoL X` given `BOS C` (one prefill)
    log w           log p - log q;   chosen ~ softmax(log w)   (K = 1: the one sample)
A latent that runs into `max_latent_tokens` without EoL is kept as is (no filtering, as in
method.md); its log q has no EoL term, its log p still scores the EoL that closes it.

Context truncation, as the BoLT reference does it (apps/main/generate.py: prompts keep their last
max_prompt_len tokens; apps/main/latent_bootstrap.py `process_batch_samples`: the joint sequences):
with T the engine's `context_length` (each engine takes a smaller one if asked: --context-length)
- the q prompt keeps its last T - max_latent_tokens tokens (BOS and the oldest prefix go first);
- a chunk's K joint sequences `BOS C SoL PRIOR Z EoL X` lose tokens only when the longest is over
  T, by the same amount for all K: first from the front of `BOS C` (which is not scored), then,
  when that is not enough, from the end of X (fewer X tokens scored; the reference's
  num_suffix_token_truncated). log p sums everything after what is left of `BOS C`. One
  difference: where `BOS C` is gone entirely, the first remaining token is kept as context rather
  than scored without any (the engines need a non-empty prompt).
Each kind is counted per block (block meta) and in the totals line.

Reproducibility: the prompt seed of chunk i in block b is derive_seed(seed, b, i) and sample k uses
sample_seed(that, k); the resampling RNG is seeded from (seed, b, i) too. So a block's random
numbers are a function of (seed, block) only, whatever the shard layout, batch size or
interruptions. On the local engine the same run settings give bit-identical blocks; another batch
size can change a latent where a draw lands within float rounding of a CDF boundary (base.py).
On SGLang, seeds hold only with --enable-deterministic-inference: without it a re-run of a block
(the one in flight at a kill) draws new latents. Every block is still exact: its log q and log p are
those of the latents it holds, and resume still loses or duplicates no chunk.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from megatron_bolt.config import EngineConfig, EStepConfig, check_section
from megatron_bolt.data.formats import posterior_sampling_prompt, prior_scoring_sequence
from megatron_bolt.errors import UserError
from megatron_bolt.inference.base import Engine, derive_seed
from megatron_bolt.latents.blocks import ShardBlocks
from megatron_bolt.tokenizer import LatentTokenIds

_RESAMPLE_TAG = 0x5E5A  # separates the resampling stream from the sampling seeds


@dataclass
@dataclass
class Truncation:
    """How many chunks of a block (or run) were cut to the context, by kind."""

    q_prompts: int = 0  # q prompts that lost their oldest tokens
    joint: int = 0  # chunks whose joint sequences lost tokens of `BOS C`
    x_tail: int = 0  # ... and also tokens at the end of X
    x_tokens_cut: int = 0  # X tokens not scored, summed over chunks

    def add(self, other: Truncation) -> None:
        self.q_prompts += other.q_prompts
        self.joint += other.joint
        self.x_tail += other.x_tail
        self.x_tokens_cut += other.x_tokens_cut


def truncate_q_prompt(prompt: list[int], context: int | None, max_latent_tokens: int) -> list[int]:
    """The last context - max_latent_tokens tokens of the q prompt (the reference's prompt cut)."""
    if context is None or len(prompt) + max_latent_tokens <= context:
        return prompt
    keep = context - max_latent_tokens
    if keep < 1:
        raise UserError(f"context of {context} tokens leaves no room for a prompt next to "
                        f"--max-latent-tokens {max_latent_tokens}")
    return prompt[-keep:]


def truncate_joint(seqs: list[list[int]], prefix_len: int, x_len: int, context: int | None) -> tuple[list[list[int]], int, int]:
    """Cut one chunk's K joint sequences to the context, the same way for all K (the reference's
    `process_batch_samples`): returns (sequences, where scoring starts, X tokens cut from the end)."""
    longest = max(len(q) for q in seqs)
    if context is None or longest <= context:
        return seqs, prefix_len, 0
    remove = longest - context
    front = min(prefix_len, remove)
    back = remove - front
    if back >= x_len:
        raise UserError(f"context of {context} tokens is too short for a chunk of {x_len} tokens plus its latent "
                        f"(joint sequence of {longest} tokens); lower --max-latent-tokens or use a longer context")
    out = [q[front : len(q) - back] for q in seqs]
    start = max(prefix_len - front, 1)  # keep one token as context when all of `BOS C` is gone
    return out, start, back


@dataclass
class BlockResult:
    chunks: list[int]
    latents: list[list[list[int]]]  # [chunk][k] -> Z tokens (without the closing EoL)
    log_q: np.ndarray  # [n, K]
    log_p: np.ndarray
    log_w: np.ndarray
    chosen: np.ndarray  # [n]
    finished: np.ndarray  # [n, K] bool: the latent ended with EoL
    sample_seconds: float = 0.0
    score_seconds: float = 0.0
    truncated: Truncation = field(default_factory=Truncation)
    context: int | None = None

    @property
    def latent_tokens(self) -> int:
        return int(sum(len(z) for per in self.latents for z in per))


@dataclass
class EStepTotals:
    blocks: int = 0
    chunks: int = 0
    latents: int = 0
    latent_tokens: int = 0
    unfinished: int = 0
    sample_seconds: float = 0.0
    score_seconds: float = 0.0
    seconds: float = 0.0
    skipped_blocks: int = 0
    truncated: Truncation = field(default_factory=Truncation)
    context: int | None = None
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        t = self.truncated
        cut = (f"context {self.context}: {t.q_prompts} q prompts and {t.joint} joint sequences truncated "
               f"({t.x_tail} losing {t.x_tokens_cut} chunk tokens)" if self.context else "no context limit")
        return (
            f"{self.blocks} blocks, {self.chunks} chunks, {self.latents} latents, {self.latent_tokens} latent tokens "
            f"in {self.seconds:.1f}s ({self.chunks / s:.2f} chunks/s, {self.latent_tokens / s:.1f} latent tok/s); "
            f"sampling {self.sample_seconds:.1f}s, scoring {self.score_seconds:.1f}s; "
            f"{self.unfinished} latents hit max tokens; {cut}; {self.skipped_blocks} blocks already done"
        )


def resample(log_w: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn from softmax(log_w) (self-normalised importance resampling, not argmax)."""
    if len(log_w) == 1:
        return 0
    w = np.asarray(log_w, dtype=np.float64)
    w = np.exp(w - w.max())
    return int(rng.choice(len(w), p=w / w.sum()))


def resample_rng(seed: int, block: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, block, chunk, _RESAMPLE_TAG))


def chunk_prompt_seed(seed: int, block: int, chunk: int) -> int:
    return derive_seed(seed, block, chunk)


@dataclass
class _BlockInputs:
    """What a block's chunks give the engines: `BOS`, the prefixes C, the chunks X, the q prompts."""

    ids: LatentTokenIds
    bos: list[int]
    prefixes: list[list[int]]
    xs: list[list[int]]
    prompts: list[list[int]]
    context: int | None
    cut: Truncation


def _block_inputs(engine: Engine, chunks, chunk_indices: list[int], settings: EStepConfig) -> _BlockInputs:
    sp = chunks.special_tokens
    ids = LatentTokenIds.from_special_tokens(sp, str(chunks.path))
    bos = [int(sp["bos"])] if sp.get("bos") is not None and int(sp["bos"]) >= 0 else []
    inp = _BlockInputs(ids, bos, [], [], [], engine.context_length, Truncation())
    for i in chunk_indices:
        c = [int(t) for t in chunks.prefix_tokens(i, settings.prefix_chunks)]
        x = [int(t) for t in chunks.chunk_tokens(i)]
        inp.prefixes.append(c)
        inp.xs.append(x)
        full = bos + posterior_sampling_prompt(c, x, ids)
        inp.prompts.append(truncate_q_prompt(full, inp.context, settings.max_latent_tokens))
        inp.cut.q_prompts += len(inp.prompts[-1]) < len(full)
    return inp


def _joint_rows(inp: _BlockInputs, latents: list[list[list[int]]]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, continuations) scoring log p(Z, X | C) for every latent, truncated per chunk."""
    score_prompts, score_conts = [], []
    for j, zs in enumerate(latents):
        seqs = []
        for z in zs:
            seq, start = prior_scoring_sequence(inp.prefixes[j], z, inp.xs[j], inp.ids)
            seqs.append(inp.bos + seq)
        seqs, start, x_cut = truncate_joint(seqs, len(inp.bos) + start, len(inp.xs[j]), inp.context)
        inp.cut.joint += start < len(inp.bos) + len(inp.prefixes[j]) or x_cut > 0
        inp.cut.x_tail += x_cut > 0
        inp.cut.x_tokens_cut += x_cut
        for seq in seqs:
            score_prompts.append(seq[:start])
            score_conts.append(seq[start:])
    return score_prompts, score_conts


def sample_and_weight(
    engine: Engine,
    chunks,  # ChunkStore
    chunk_indices: list[int],
    settings: EStepConfig,
    block: int,
    samples: int | None = None,
) -> BlockResult:
    """Sample K latents for each chunk, score them, and compute log w and the resampled choice."""
    k = samples or settings.samples
    inp = _block_inputs(engine, chunks, chunk_indices, settings)
    seeds = [chunk_prompt_seed(settings.seed, block, i) for i in chunk_indices]
    t0 = time.perf_counter()
    sampled = engine.sample(inp.prompts, k, settings.max_latent_tokens, [inp.ids.eol], seed=seeds)
    t1 = time.perf_counter()
    n = len(chunk_indices)
    latents = [[s.body() for s in per] for per in sampled]
    log_q = np.array([[s.logprob_sum for s in per] for per in sampled], dtype=np.float64).reshape(n, k)
    finished = np.array([[s.finished for s in per] for per in sampled], dtype=bool).reshape(n, k)
    score_prompts, score_conts = _joint_rows(inp, latents)
    t2 = time.perf_counter()
    log_p = np.asarray(engine.score(score_prompts, score_conts), dtype=np.float64).reshape(n, k)
    t3 = time.perf_counter()
    log_w = log_p - log_q
    chosen = np.array(
        [resample(log_w[j], resample_rng(settings.seed, block, i)) for j, i in enumerate(chunk_indices)],
        dtype=np.int32,
    )
    return BlockResult(list(chunk_indices), latents, log_q, log_p, log_w, chosen, finished, t1 - t0, t3 - t2,
                       inp.cut, inp.context)


def weigh_latents(
    engine: Engine, chunks, chunk_indices: list[int], latents: list[list[list[int]]], settings: EStepConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(log q, log p) of given latents (as a latent store holds them: no closing EoL) under `engine`,
    both by scoring, with the E-step's prompts and truncation: compares engines on the same latents.

    A latent shorter than max_latent_tokens ended with EoL, whose log-prob log q includes."""
    latents = [[[int(t) for t in z] for z in zs] for zs in latents]
    inp = _block_inputs(engine, chunks, chunk_indices, settings)
    q_prompts, q_conts = [], []
    for prompt, zs in zip(inp.prompts, latents):
        for z in zs:
            q_prompts.append(prompt)
            q_conts.append(z + ([inp.ids.eol] if len(z) < settings.max_latent_tokens else []))
    shape = (len(latents), len(latents[0]) if latents else 0)
    log_q = np.asarray(engine.score(q_prompts, q_conts), dtype=np.float64).reshape(shape)
    log_p = np.asarray(engine.score(*_joint_rows(inp, latents)), dtype=np.float64).reshape(shape)
    return log_q, log_p


def open_engine(model_dir: str, cfg: EngineConfig) -> Engine:
    """The engine that runs the E-step and the IWAE bound on the HF export `model_dir`. `cfg.threads`
    is the process's to set (torch.set_num_threads is process-wide): the entry points do it."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"{model_dir}: no config.json (expected an HF export directory)")
    check_section(cfg, "engine.")
    if cfg.engine in ("sglang", "vllm-server"):
        from megatron_bolt.inference.http import PoolOptions
        from megatron_bolt.inference.sglang import SGLangEngine
        from megatron_bolt.inference.vllm_server import VLLMServerEngine

        client = SGLangEngine if cfg.engine == "sglang" else VLLMServerEngine
        return client(cfg.server, options=PoolOptions(concurrency=cfg.concurrency), context_length=cfg.context_length)
    if cfg.engine == "vllm":
        from megatron_bolt.inference.vllm import VLLMEngine

        return VLLMEngine(model_dir, dtype=cfg.vllm_dtype, kv_cache_gib=cfg.kv_cache_gib,
                          max_num_seqs=cfg.batch_rows, eager=not cfg.vllm_graphs, context_length=cfg.context_length)
    from megatron_bolt.inference.local import LocalEngine

    return LocalEngine(model_dir, device=cfg.device, max_batch_rows=cfg.batch_rows, context_length=cfg.context_length)


def open_or_create_store(path: str, num_chunks: int, settings: EStepConfig, block_size: int, meta: dict):
    """Create the store, or open the existing one after checking it was made with the same settings."""
    from megatron_bolt.stores.latent_store import LatentStore

    full_meta = {**meta, **settings.fingerprint()}
    store = None
    for attempt in range(5):
        try:
            store = LatentStore.create(path, num_chunks, settings.samples, block_size, meta=full_meta, exist_ok=True)
            break
        except UserError:
            raise
        except Exception:  # another shard created it at the same moment: open it instead
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    assert store is not None
    for key, want in settings.fingerprint().items():
        have = store.attrs.get(key)
        if have is not None and have != want:
            raise UserError(f"{path}: store was made with {key}={have}, this run has {key}={want}; use a new --out")
    return store


def run_estep(
    engine: Engine,
    chunks,  # ChunkStore
    store,  # LatentStore
    settings: EStepConfig,
    shard: tuple[int, int] = (0, 1),
    block_meta: dict | None = None,
    progress: bool = True,
    max_blocks: int | None = None,
) -> EStepTotals:
    """Fill every unfinished block of this shard; finished blocks are skipped (resume)."""
    if store.num_chunks != chunks.num_chunks:
        raise UserError(f"{store.path}: store has {store.num_chunks} chunks, chunk store has {chunks.num_chunks}")
    with ShardBlocks(store, shard, f"estep shard {shard[0]}/{shard[1]}", progress, max_blocks) as blocks:
        totals = EStepTotals(skipped_blocks=blocks.skipped)
        start = time.perf_counter()
        for b, idx in blocks:
            res = sample_and_weight(engine, chunks, idx, settings, b)
            unfinished = int((~res.finished).sum())
            blocks.write(b, res.latents, res.log_q, res.log_p, res.log_w, res.chosen,
                         meta={**(block_meta or {}), "unfinished": unfinished, "context": res.context,
                               "truncated": asdict(res.truncated)})
            totals.truncated.add(res.truncated)
            totals.context = res.context
            totals.blocks += 1
            totals.chunks += len(res.chunks)
            totals.latents += res.log_q.size
            totals.latent_tokens += res.latent_tokens
            totals.unfinished += unfinished
            totals.sample_seconds += res.sample_seconds
            totals.score_seconds += res.score_seconds
            totals.seconds = time.perf_counter() - start
            blocks.advance(len(res.chunks), chunks_s=f"{totals.chunks / totals.seconds:.2f}",
                           latent_tok_s=f"{totals.latent_tokens / totals.seconds:.0f}")
    totals.seconds = time.perf_counter() - start
    return totals


# ------------------------------------------------------------------------------------------ IWAE
def iwae_bounds(log_w: np.ndarray, ns: Iterable[int]) -> dict[int, float]:
    """Mean over chunks of logsumexp(log w_1..n) - log n, using the first n of the K samples."""
    out = {}
    for n in ns:
        if n < 1 or n > log_w.shape[1]:
            raise ValueError(f"n={n} needs 1 <= n <= {log_w.shape[1]}")
        out[n] = float(_logmeanexp(log_w, n).mean())
    return out


IWAE_PROTOCOLS = ("document", "chunk")
WHOLE_DOCUMENT = 1 << 30  # prefix_chunks that reaches back to a document's first chunk


def _logmeanexp(log_w: np.ndarray, n: int) -> np.ndarray:
    """Per row: logsumexp of the first n log weights, minus log n."""
    sub = log_w[:, :n]
    m = sub.max(axis=1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(sub - m).sum(axis=1))) - math.log(n)


def run_iwae(
    engine: Engine,
    chunks,
    ns: list[int],
    settings: EStepConfig,
    max_chunks: int | None = None,
    batch_chunks: int = 64,
    progress: bool = True,
    protocol: str = "document",
    max_docs: int | None = None,
) -> dict:
    """IWAE bounds for n in ns.

    protocol "document" (the BoLT reference's validation, `compute_elbo` in apps/main/eval.py):
    every chunk's prefix is the whole document before it, the per-chunk bounds are summed per
    document, each document's sum is divided by its tokens, and those per-token values are
    averaged over documents (the first `max_docs` documents). Build the chunk store with
    `bolt preprocess --chunking uniform` for the reference's uniform validation chunks.

    protocol "chunk": the chunks' own prefixes (`settings.prefix_chunks`), the mean over (the first
    `max_chunks`) chunks, and per token as that mean times chunks over X tokens.
    """
    if protocol not in IWAE_PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: choose from {', '.join(IWAE_PROTOCOLS)}")
    if protocol == "document":
        docs = chunks.num_docs if max_docs is None else min(max_docs, chunks.num_docs)
        total = int(chunks.doc_chunk_offsets[docs]) if docs else 0
        settings = EStepConfig(settings.samples, WHOLE_DOCUMENT, settings.max_latent_tokens, settings.seed)
    else:
        total = chunks.num_chunks if max_chunks is None else min(max_chunks, chunks.num_chunks)
    if total == 0:
        raise UserError(f"{chunks.path}: no chunks")
    kmax = max(ns)
    all_w = []
    x_lengths = np.zeros(total, dtype=np.int64)
    cut = Truncation()
    context = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="chunk", file=sys.stderr, desc="iwae", dynamic_ncols=True)
    for start in range(0, total, batch_chunks):
        idx = list(range(start, min(start + batch_chunks, total)))
        res = sample_and_weight(engine, chunks, idx, settings, block=start // batch_chunks, samples=kmax)
        all_w.append(res.log_w)
        x_lengths[idx] = [len(chunks.chunk_tokens(i)) for i in idx]
        cut.add(res.truncated)
        context = res.context
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    log_w = np.concatenate(all_w)
    # X tokens actually scored: the per-token bound must not count tokens truncation cut off (the
    # document protocol's per-document counts keep them: cuts at a chunk's end are rare and counted)
    x_tokens = int(x_lengths.sum()) - cut.x_tokens_cut
    result = {"protocol": protocol, "chunks": total, "x_tokens": x_tokens, "samples": kmax,
              "settings": asdict(settings),
              "context": context, "truncated": asdict(cut)}
    if protocol == "chunk":
        bounds = iwae_bounds(log_w, ns)
        result["iwae_per_chunk"] = {str(n): v for n, v in bounds.items()}
        result["iwae_per_token"] = {str(n): v * total / max(x_tokens, 1) for n, v in bounds.items()}
        return result
    doc_of = np.asarray(chunks.chunk_doc[:total], dtype=np.int64)
    doc_tokens = np.bincount(doc_of, weights=x_lengths, minlength=docs)
    per_doc, per_token, per_chunk = {}, {}, {}
    for n in ns:
        if n < 1 or n > kmax:
            raise ValueError(f"n={n} needs 1 <= n <= {kmax}")
        lme = _logmeanexp(log_w, n)
        doc_sum = np.bincount(doc_of, weights=lme, minlength=docs)
        per_doc[str(n)] = float(doc_sum.mean())
        per_token[str(n)] = float((doc_sum / np.maximum(doc_tokens, 1)).mean())
        per_chunk[str(n)] = float(lme.mean())
    result.update(docs=docs, iwae_per_document=per_doc, iwae_per_token=per_token, iwae_per_chunk=per_chunk)
    return result

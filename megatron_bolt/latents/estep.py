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

Reproducibility: the prompt seed of chunk i in block b is derive_seed(seed, b, i) and sample k uses
sample_seed(that, k); the resampling RNG is seeded from (seed, b, i) too. So a block's result is
a function of (model, data, seed, block) only: shard layout, batch size and interruptions do not
change it, and a re-run of a block rewrites identical values.
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
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (
            f"{self.blocks} blocks, {self.chunks} chunks, {self.latents} latents, {self.latent_tokens} latent tokens "
            f"in {self.seconds:.1f}s ({self.chunks / s:.2f} chunks/s, {self.latent_tokens / s:.1f} latent tok/s); "
            f"sampling {self.sample_seconds:.1f}s, scoring {self.score_seconds:.1f}s; "
            f"{self.unfinished} latents hit max tokens; {self.skipped_blocks} blocks already done"
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
    sp = chunks.special_tokens
    ids = LatentTokenIds.from_special_tokens(sp, str(chunks.path))
    bos = [int(sp["bos"])] if sp.get("bos") is not None and int(sp["bos"]) >= 0 else []
    prefixes, xs, prompts = [], [], []
    for i in chunk_indices:
        c = [int(t) for t in chunks.prefix_tokens(i, settings.prefix_chunks)]
        x = [int(t) for t in chunks.chunk_tokens(i)]
        prefixes.append(c)
        xs.append(x)
        prompts.append(bos + posterior_sampling_prompt(c, x, ids))
    seeds = [chunk_prompt_seed(settings.seed, block, i) for i in chunk_indices]
    t0 = time.perf_counter()
    sampled = engine.sample(prompts, k, settings.max_latent_tokens, [ids.eol], seed=seeds)
    t1 = time.perf_counter()
    n = len(chunk_indices)
    latents: list[list[list[int]]] = []
    log_q = np.zeros((n, k))
    finished = np.zeros((n, k), dtype=bool)
    score_prompts, score_conts = [], []
    for j, per in enumerate(sampled):
        zs = []
        for s_idx, s in enumerate(per):
            z = s.body()
            zs.append(z)
            log_q[j, s_idx] = s.logprob_sum
            finished[j, s_idx] = s.finished
            seq, start = prior_scoring_sequence(prefixes[j], z, xs[j], ids)
            score_prompts.append(bos + seq[:start])
            score_conts.append(seq[start:])
        latents.append(zs)
    t2 = time.perf_counter()
    log_p = np.asarray(engine.score(score_prompts, score_conts), dtype=np.float64).reshape(n, k)
    t3 = time.perf_counter()
    log_w = log_p - log_q
    chosen = np.array(
        [resample(log_w[j], resample_rng(settings.seed, block, i)) for j, i in enumerate(chunk_indices)],
        dtype=np.int32,
    )
    return BlockResult(list(chunk_indices), latents, log_q, log_p, log_w, chosen, finished, t1 - t0, t3 - t2)


def open_engine(model_dir: str, cfg: EngineConfig) -> Engine:
    """The engine that runs the E-step and the IWAE bound on the HF export `model_dir`."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"{model_dir}: no config.json (expected an HF export directory)")
    check_section(cfg, "engine.")
    if cfg.engine == "sglang":
        from megatron_bolt.inference.sglang import SGLangEngine

        return SGLangEngine(cfg.server, concurrency=cfg.concurrency)
    import torch

    from megatron_bolt.inference.local import LocalEngine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return LocalEngine(model_dir, device=cfg.device, max_batch_rows=cfg.batch_rows)


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
                         meta={**(block_meta or {}), "unfinished": unfinished})
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
        sub = log_w[:, :n]
        m = sub.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(sub - m).sum(axis=1))) - math.log(n)
        out[n] = float(lse.mean())
    return out


def run_iwae(
    engine: Engine,
    chunks,
    ns: list[int],
    settings: EStepConfig,
    max_chunks: int | None = None,
    batch_chunks: int = 64,
    progress: bool = True,
) -> dict:
    """IWAE bounds for n in ns on (the first max_chunks) chunks, per chunk and per X token."""
    total = chunks.num_chunks if max_chunks is None else min(max_chunks, chunks.num_chunks)
    if total == 0:
        raise UserError(f"{chunks.path}: no chunks")
    kmax = max(ns)
    all_w = []
    x_tokens = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="chunk", file=sys.stderr, desc="iwae", dynamic_ncols=True)
    for start in range(0, total, batch_chunks):
        idx = list(range(start, min(start + batch_chunks, total)))
        res = sample_and_weight(engine, chunks, idx, settings, block=start // batch_chunks, samples=kmax)
        all_w.append(res.log_w)
        x_tokens += sum(len(chunks.chunk_tokens(i)) for i in idx)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    log_w = np.concatenate(all_w)
    bounds = iwae_bounds(log_w, ns)
    return {
        "chunks": total,
        "x_tokens": x_tokens,
        "samples": kmax,
        "iwae_per_chunk": {str(n): v for n, v in bounds.items()},
        "iwae_per_token": {str(n): v * total / max(x_tokens, 1) for n, v in bounds.items()},
        "settings": asdict(settings),
    }

"""`bolt estep`: sample K latents per chunk, weight by p/q, resample one, write a latent store.

Re-running the same command resumes: finished blocks are skipped. `--shard i/N` lets N jobs fill
one store (block b belongs to shard b % N). Results do not depend on the shard layout.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_bolt.cli import set_torch_threads
from megatron_bolt.config import EngineConfig, EStepConfig
from megatron_bolt.errors import UserError


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    e, s = EngineConfig(), EStepConfig()
    parser.add_argument("--model", required=True, help="HF export directory of the current model")
    parser.add_argument("--chunks", required=True, help="chunk store (zarr) from preprocessing")
    parser.add_argument("--engine", choices=["local", "vllm", "sglang", "vllm-server"], default=e.engine,
                        help="local: transformers in this process; vllm: vLLM in this process; "
                             "sglang / vllm-server: HTTP client of the SGLang / vLLM servers at --server")
    parser.add_argument("--server", nargs="+", default=[], metavar="URL",
                        help="sglang / vllm-server engines: one router URL, or several server URLs (round robin)")
    parser.add_argument("--concurrency", type=int, default=e.concurrency, help="server engines: requests in flight")
    parser.add_argument("--device", default=e.device, help="local engine: torch device (default cuda if available)")
    parser.add_argument("--threads", type=int, default=e.threads,
                        help="local and vllm engines: torch CPU threads (1 is fastest for small models on busy machines)")
    parser.add_argument("--batch-rows", type=int, default=e.batch_rows,
                        help="local engine: (chunk, sample) rows decoded together (raise on a GPU); "
                             "vllm engine: most sequences in one vLLM batch (max_num_seqs)")
    parser.add_argument("--kv-cache-gib", type=float, default=e.kv_cache_gib,
                        help=f"vllm engine: KV cache size in GiB (default {e.kv_cache_gib:g}; unset, vLLM would take "
                             "90%% of RAM on CPU). Raise on a GPU, e.g. to most of its free memory")
    parser.add_argument("--vllm-dtype", default=e.vllm_dtype, choices=["float32", "bfloat16", "float16", "auto"],
                        help="vllm engine: weights and activations (default float32, as the local engine: "
                             "log w is a difference of summed log-probs)")
    parser.add_argument("--vllm-graphs", action="store_true",
                        help="vllm engine: torch.compile and CUDA graphs instead of eager mode (GPU: faster "
                             "decoding after a warm-up of a minute or more)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="truncate prompts and scored sequences to this many tokens, as the BoLT reference does "
                             "(default: the engine's: max_position_embeddings, or what the SGLang server accepts)")
    parser.add_argument("--prefix-chunks", type=int, default=s.prefix_chunks,
                        help=f"previous chunks given as context (default {s.prefix_chunks})")
    parser.add_argument("--max-latent-tokens", type=int, default=s.max_latent_tokens,
                        help=f"cap on a latent's length (default {s.max_latent_tokens})")
    parser.add_argument("--seed", type=int, default=s.seed, help="run seed; same seed, same latents")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    if args.engine in ("sglang", "vllm-server") and not args.server:
        raise UserError(f"--engine {args.engine} needs --server URL [URL ...]")
    return EngineConfig(engine=args.engine, server=list(args.server), concurrency=args.concurrency,
                        device=args.device, threads=args.threads, batch_rows=args.batch_rows,
                        kv_cache_gib=args.kv_cache_gib, vllm_dtype=args.vllm_dtype, vllm_graphs=args.vllm_graphs,
                        context_length=args.context_length)


def estep_config(args: argparse.Namespace, samples: int) -> EStepConfig:
    cfg = EStepConfig(samples, args.prefix_chunks, args.max_latent_tokens, args.seed)
    for key, message in cfg.problems():
        raise UserError(f"--{key.replace('_', '-')}: {message}")
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--out", required=True, help="latent store (zarr) to create or resume")
    parser.add_argument("--samples", type=int, required=True, help="K latents per chunk")
    parser.add_argument("--shard", default="0/1", help="i/N: this job fills blocks b with b %% N == i")
    parser.add_argument("--block-size", type=int, default=None,
                        help="chunks per block, the unit of resume (default: the existing store's, else 256)")
    parser.add_argument("--max-blocks", type=int, default=None, help="stop after this many blocks (testing)")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.latents.blocks import parse_shard
    from megatron_bolt.latents.estep import open_engine, open_or_create_store, run_estep
    from megatron_bolt.stores.chunk_store import open_chunk_store
    from megatron_bolt.stores.latent_store import existing_block_size

    shard = parse_shard(args.shard)
    settings = estep_config(args, args.samples)
    engine_cfg = engine_config(args)
    set_torch_threads(engine_cfg.threads)
    chunks = open_chunk_store(args.chunks)
    meta = {"engine": args.engine, "model": os.path.abspath(args.model), "chunks": str(args.chunks)}
    block_size = args.block_size or existing_block_size(args.out) or 256
    engine = open_engine(args.model, engine_cfg)
    try:
        store = open_or_create_store(args.out, chunks.num_chunks, settings, block_size, meta)
        totals = run_estep(engine, chunks, store, settings, shard, block_meta={"engine": args.engine},
                           progress=not args.quiet, max_blocks=args.max_blocks)
    finally:
        engine.close()
    print(f"bolt estep: {totals.line()}", file=sys.stderr)
    print(f"bolt estep: {store.status()}", file=sys.stderr)
    return 0

"""`bolt estep`: sample K latents per chunk, weight by p/q, resample one, write a latent store.

Re-running the same command resumes: finished blocks are skipped. `--shard i/N` lets N jobs fill
one store (block b belongs to shard b % N). Results do not depend on the shard layout.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_bolt.errors import UserError


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF export directory of the current model")
    parser.add_argument("--chunks", required=True, help="chunk store (zarr) from preprocessing")
    parser.add_argument("--engine", choices=["local", "sglang"], default="local",
                        help="local: transformers in this process; sglang: HTTP client of --server")
    parser.add_argument("--server", nargs="+", default=[], metavar="URL",
                        help="sglang engine: one router URL, or several server URLs (round robin)")
    parser.add_argument("--concurrency", type=int, default=64, help="sglang engine: requests in flight")
    parser.add_argument("--device", default=None, help="local engine: torch device (default cuda if available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="local engine: torch CPU threads (1 is fastest for small models on busy machines)")
    parser.add_argument("--batch-rows", type=int, default=64,
                        help="local engine: (chunk, sample) rows decoded together (raise on a GPU)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="truncate prompts and scored sequences to this many tokens, as the BoLT reference does "
                             "(default: the engine's: max_position_embeddings, or what the SGLang server accepts)")
    parser.add_argument("--prefix-chunks", type=int, default=3, help="previous chunks given as context (default 3)")
    parser.add_argument("--max-latent-tokens", type=int, default=1024, help="cap on a latent's length (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; same seed, same latents")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def make_engine(args: argparse.Namespace):
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"{args.model}: no config.json (expected an HF export directory)")
    if args.context_length is not None and args.context_length < 2:
        raise UserError(f"--context-length {args.context_length}: must be at least 2")
    if args.engine == "sglang":
        if not args.server:
            raise UserError("--engine sglang needs --server URL [URL ...]")
        from megatron_bolt.inference.sglang import SGLangEngine

        return SGLangEngine(args.server, concurrency=args.concurrency, context_length=args.context_length)
    import torch

    from megatron_bolt.inference.local import LocalEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    return LocalEngine(args.model, device=args.device, max_batch_rows=args.batch_rows, context_length=args.context_length)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--out", required=True, help="latent store (zarr) to create or resume")
    parser.add_argument("--samples", type=int, required=True, help="K latents per chunk")
    parser.add_argument("--shard", default="0/1", help="i/N: this job fills blocks b with b %% N == i")
    parser.add_argument("--block-size", type=int, default=None,
                        help="chunks per block, the unit of resume (default: the existing store's, else 256)")
    parser.add_argument("--max-blocks", type=int, default=None, help="stop after this many blocks (testing)")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.latents.estep import EStepSettings, open_or_create_store, parse_shard, run_estep
    from megatron_bolt.stores.chunk_store import open_chunk_store
    from megatron_bolt.stores.latent_store import existing_block_size

    if args.samples < 1:
        raise UserError("--samples must be >= 1")
    shard = parse_shard(args.shard)
    chunks = open_chunk_store(args.chunks)
    settings = EStepSettings(args.samples, args.prefix_chunks, args.max_latent_tokens, args.seed)
    meta = {"engine": args.engine, "model": os.path.abspath(args.model), "chunks": str(args.chunks)}
    block_size = args.block_size or existing_block_size(args.out) or 256
    store = open_or_create_store(args.out, chunks.num_chunks, settings, block_size, meta)
    engine = make_engine(args)
    try:
        totals = run_estep(engine, chunks, store, settings, shard, block_meta={"engine": args.engine},
                           progress=not args.quiet, max_blocks=args.max_blocks)
    finally:
        engine.close()
    print(f"bolt estep: {totals.line()}", file=sys.stderr)
    print(f"bolt estep: {store.status()}", file=sys.stderr)
    return 0

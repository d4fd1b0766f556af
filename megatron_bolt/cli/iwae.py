"""`bolt iwae`: the IWAE bound logsumexp(log w_1..n) - log n (method.md) on validation chunks.

Default protocol "document", the BoLT reference's validation: each chunk's prefix is the whole
document before it, bounds are summed per document and reported per token (averaged over
documents); build the validation chunk store with `bolt preprocess --chunking uniform` for the
reference's uniform chunks. "chunk": the older per-chunk mean with --prefix-chunks of context."""

from __future__ import annotations

import argparse
import os

from megatron_bolt.atomic import atomic_write_json
from megatron_bolt.cli import set_torch_threads
from megatron_bolt.cli.estep import add_engine_arguments, engine_config, estep_config
from megatron_bolt.errors import UserError
from megatron_bolt.stores.chunk_store import open_chunk_store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--samples", default="1,2,4", help="comma-separated n values (default 1,2,4)")
    parser.add_argument("--protocol", default="document", choices=("document", "chunk"),
                        help="document (default, the reference's): whole-document prefixes, summed per document, "
                             "per token; chunk: per-chunk mean with --prefix-chunks of context")
    parser.add_argument("--max-docs", type=int, default=None, help="document protocol: only the first N documents")
    parser.add_argument("--max-chunks", type=int, default=None, help="chunk protocol: only the first N chunks")
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.latents.estep import open_engine, run_iwae

    try:
        ns = sorted({int(v) for v in args.samples.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--samples {args.samples!r}: expected comma-separated integers") from None
    if not ns or ns[0] < 1:
        raise UserError("--samples values must be >= 1")
    settings = estep_config(args, max(ns))
    chunks = open_chunk_store(args.chunks)
    engine_cfg = engine_config(args)
    set_torch_threads(engine_cfg.threads)
    engine = open_engine(args.model, engine_cfg)
    try:
        result = run_iwae(engine, chunks, ns, settings, args.max_chunks, progress=not args.quiet,
                          protocol=args.protocol, max_docs=args.max_docs)
    finally:
        engine.close()
    result["model"] = os.path.abspath(args.model)
    for n in ns:
        if args.protocol == "document":
            print(f"iwae n={n}: {result['iwae_per_token'][str(n)]:.4f} nats/token, "
                  f"{result['iwae_per_document'][str(n)]:.4f} nats/document ({result['docs']} documents, "
                  f"{result['chunks']} chunks)")
        else:
            print(f"iwae n={n}: {result['iwae_per_chunk'][str(n)]:.4f} nats/chunk, "
                  f"{result['iwae_per_token'][str(n)]:.4f} nats/token ({result['chunks']} chunks)")
    if args.json:
        atomic_write_json(args.json, result)
    return 0

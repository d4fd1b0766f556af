"""`bolt preprocess` (= tools/preprocess_data.py): JSONL / Parquet -> Megatron .bin/.idx (+ chunk store).

Takes Megatron-LM's tools/preprocess_data.py flags where they apply, so existing commands keep working.
"""

from __future__ import annotations

import argparse
import sys

from megatron_bolt.data.preprocess import TOKENIZER_TYPES, PreprocessConfig, preprocess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = (
        "Tokenize documents into Megatron indexed datasets {prefix}_{key}_document.bin/.idx "
        "(read by Megatron-Core's IndexedDataset / GPTDataset) and, with --chunk-store, a BoLT chunk "
        "store (documents split into paragraphs, sentences and min(Poisson(7)+1, 20)-sentence chunks)."
    )
    g = parser.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSONL (one JSON object per line, .gz allowed) or Parquet files; globs are expanded "
                        "and sorted, e.g. 'data/*.parquet'")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="fields (columns) to tokenize, one output each")
    g.add_argument("--max-doc-chars", type=int, default=10_000_000,
                   help="skip documents with more characters than this (giant-document guard)")
    g.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", choices=sorted(TOKENIZER_TYPES),
                   help="HuggingFaceTokenizer: an HF directory or tokenizer.json; SentencePieceTokenizer: a .model")
    g.add_argument("--tokenizer-model", required=True, help="path of the tokenizer (directory, tokenizer.json or .model)")
    g.add_argument("--no-latent-tokens", action="store_true",
                   help="do not add the four BoLT latent tokens to the vocabulary (affects vocab size and dtype only)")
    g = parser.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="output path prefix, without _{key}_document.bin")
    g.add_argument("--append-eod", action="store_true", help="append the EOD (EOS) token to every document")
    g.add_argument("--chunk-store", metavar="OUT.zarr", default=None,
                   help="also write the BoLT chunk store (local path or fsspec URL); chunks carry no EOD")
    g.add_argument("--chunk-poisson-mean", type=float, default=7.0, metavar="MEAN",
                   help="chunks have min(Poisson(MEAN) + 1, 20) sentences (default 7, as the reference code); "
                        "0 makes every sentence its own chunk")
    g.add_argument("--chunking", default="random", choices=("random", "uniform"),
                   help="random (default): the reference's training chunks; uniform: its validation chunks, "
                        "ceil(n/8) chunks of as even a number of sentences as possible (for `bolt iwae`); the 8 is "
                        "--chunk-poisson-mean + 1, rounded")
    g = parser.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes (= CPU cores used for tokenizing)")
    g.add_argument("--tokenizer-threads", type=int, default=1,
                   help="tokenizer threads per worker (HF: rayon, SentencePiece: num_threads); 1 keeps "
                        "cores used = --workers")
    g.add_argument("--batch-docs", type=int, default=256, help="documents per batch sent to a worker")
    g.add_argument("--log-interval", type=int, default=1000,
                   help="documents between progress lines when stderr is not a terminal")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def run(args: argparse.Namespace) -> int:
    cfg = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model,
        tokenizer_type=args.tokenizer_type,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        log_interval=args.log_interval,
        chunk_store=args.chunk_store,
        max_doc_chars=args.max_doc_chars,
        strict=args.strict,
        batch_docs=args.batch_docs,
        add_latent_tokens=not args.no_latent_tokens,
        progress=not args.no_progress,
        tokenizer_threads=args.tokenizer_threads,
        chunk_poisson_mean=args.chunk_poisson_mean, chunking=args.chunking,
    )
    result = preprocess(cfg)
    print(f"preprocess: {result.summary()}; dtype {result.dtype}", file=sys.stderr)
    for line in result.skipped_lines():
        print(line, file=sys.stderr)
    for path in result.outputs:
        print(f"  wrote {path}", file=sys.stderr)
    return 0

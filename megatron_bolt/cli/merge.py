"""`bolt merge`: chunk store + latent store -> {P}_text_document.bin/.idx in prior/posterior forms."""

from __future__ import annotations

import argparse

from megatron_bolt.data.merge import merge_latents


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Rebuild every document of the chunk store as BOS + chunks + EOS, each chunk independently in "
        "prior form (SoL PRIOR Z EoL X) or posterior form (SoL EoL X SoL POST Z EoL) with its chosen "
        "latent Z, drawn again for each of E epochs; then append raw (latent-free) copies. Writes "
        "P_text_document.bin/.idx for Megatron-Core (uint16 tokens if the vocabulary fits, else int32), "
        "atomically. Byte-identical for a fixed --seed."
    )
    parser.add_argument("--chunks", required=True, metavar="CHUNKS.zarr", help="chunk store (from `bolt preprocess`)")
    parser.add_argument("--latents", metavar="LATENTS.zarr",
                        help="latent store (from `bolt estep` or `bolt warmstart`); omit to write every chunk raw "
                        "(BOS + chunks + EOS), the data of a raw baseline")
    parser.add_argument("--output-prefix", required=True, metavar="P", help="writes P_text_document.bin and .idx")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--epochs", type=int, default=None, metavar="E",
                      help="copies of the corpus, each with fresh prior/posterior draws (default 1)")
    size.add_argument("--min-tokens", type=int, default=None, metavar="N",
                      help="instead of --epochs: as many epochs as a training run of N tokens reads "
                      "(steps x global batch x seq_len, +0.5%% in a Megatron blend), so no form is shown twice")
    parser.add_argument("--posterior-prob", type=float, default=0.5, metavar="P",
                        help="probability that a chunk is written in posterior form (default 0.5)")
    parser.add_argument("--raw-mix", type=float, default=0.0, metavar="R",
                        help="add round(R * documents * epochs) latent-free copies (default 0, as the reference)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the form draws and the raw subset (default 0)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="write chunks whose latent block is not done raw (counted) instead of failing")
    parser.add_argument("--empty-latents", choices=("keep", "raw"), default="keep",
                        help="chunks whose chosen latent is empty: keep them as empty thoughts (SoL PRIOR EoL X, "
                        "the reference) or write them raw (default keep)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = merge_latents(
        args.chunks,
        args.latents,
        args.output_prefix,
        epochs=1 if args.epochs is None and args.min_tokens is None else args.epochs,
        min_tokens=args.min_tokens,
        posterior_prob=args.posterior_prob,
        raw_mix=args.raw_mix,
        seed=args.seed,
        allow_missing=args.allow_missing,
        empty_latents=args.empty_latents,
        progress=not args.quiet,
    )
    print(summary.format())
    return 0

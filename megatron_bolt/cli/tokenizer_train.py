"""`bolt tokenizer train`: a byte-level BPE with <s>, </s> and the four latent tokens, for small runs."""

from __future__ import annotations

import argparse
import sys

from megatron_bolt.tokenizer import train_bpe_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="training text: JSONL files (the --json-key field) or plain text files (lines)")
    parser.add_argument("--json-key", default="text", help="field of each JSONL object to train on")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="total vocabulary size, including 256 byte tokens and 6 special tokens")
    parser.add_argument("--out", required=True, help="output directory (an HF tokenizer directory)")


def run(args: argparse.Namespace) -> int:
    tok = train_bpe_tokenizer(args.input, args.vocab_size, args.out, key=args.json_key)
    latent = tok.latent
    print(
        f"tokenizer train: wrote {args.out} (vocab {tok.vocab_size}; bos {tok.bos_id}, eos {tok.eos_id}, "
        f"latent sol {latent.sol} eol {latent.eol} prior {latent.prior} posterior {latent.posterior})",
        file=sys.stderr,
    )
    return 0

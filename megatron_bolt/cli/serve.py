"""`bolt serve`: an HF export behind SGLang's native HTTP API (the subset the E-step and sglang-router use)."""

from __future__ import annotations

import argparse
import os

from megatron_bolt.cli import set_torch_threads
from megatron_bolt.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF export directory (save_pretrained layout)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for a fleet)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--enable-deterministic-inference", action="store_true",
                        help="honour requests' sampling_seed, as SGLang does only with this flag (without it every "
                             "request draws fresh randomness)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="longest prompt + new tokens, as SGLang's flag (default: max_position_embeddings)")


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"{args.model}: no config.json (expected an HF export directory)")
    set_torch_threads(args.threads)
    from megatron_bolt.inference.sglang_standin import serve

    if args.context_length is not None and args.context_length < 8:
        raise UserError(f"--context-length {args.context_length}: need at least 8 (SGLang keeps a margin of 6)")
    serve(args.model, args.host, args.port, args.device, args.enable_deterministic_inference, args.context_length)
    return 0

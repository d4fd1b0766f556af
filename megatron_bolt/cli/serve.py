"""`bolt serve`: an HF export behind SGLang's native HTTP API (the subset the E-step and sglang-router use)."""

from __future__ import annotations

import argparse
import os

from megatron_bolt.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF export directory (save_pretrained layout)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for a fleet)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"{args.model}: no config.json (expected an HF export directory)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from megatron_bolt.inference.sglang_standin import serve

    serve(args.model, args.host, args.port, args.device)
    return 0

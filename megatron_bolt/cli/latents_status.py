"""`bolt latents status STORE`: how far a latent store is ("k of n blocks done") and what is missing."""

from __future__ import annotations

import argparse

from megatron_bolt.stores.latent_store import LatentStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="latent store: a local path or an fsspec URL zarr supports")
    parser.add_argument("--list", type=int, default=20, metavar="N", help="list up to N missing blocks (default 20)")


def _ranges(blocks: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8'"""
    out, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(str(start) if start == b else f"{start}-{b}")
            start = None
    return ", ".join(out)


def run(args: argparse.Namespace) -> int:
    store = LatentStore.open(args.store, mode="r")
    print(store.status())
    missing = sorted(set(range(store.num_blocks)) - store.blocks_done())
    shown = missing[: args.list] if args.list > 0 else []
    more = f" (first {len(shown)}: {_ranges(shown)})" if shown else ""
    print(f"missing blocks: {len(missing)}{more}")
    return 0

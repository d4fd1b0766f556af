"""The work loop shared by the E-step and the warm start: a shard's unfinished blocks of a latent
store, in order, each computed in full and written (then marked done) by `LatentStore.write_block`.

    with ShardBlocks(store, shard, "estep shard 0/1", progress=True) as blocks:
        for b, chunk_indices in blocks:
            ...                                   # latents, log q / p / w, chosen for the block
            blocks.write(b, latents, log_q, log_p, log_w, chosen, meta={...})

Finished blocks are skipped (resume); shard i/N owns blocks b with b % N == i, interleaved so
shards finish at similar times, so N jobs can fill one store.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np

from megatron_bolt.errors import UserError


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def shard_blocks(num_blocks: int, shard: tuple[int, int]) -> list[int]:
    """Blocks of shard i/N: b with b % N == i."""
    i, n = shard
    return [b for b in range(num_blocks) if b % n == i]


class ShardBlocks:
    """The blocks shard `shard` still has to fill in `store` (a LatentStore), with a progress bar
    counting chunks; `skipped` is how many of the shard's blocks were done already."""

    def __init__(self, store, shard: tuple[int, int], desc: str, progress: bool = True,
                 max_blocks: int | None = None) -> None:
        self.store, self.shard = store, shard
        mine = shard_blocks(store.num_blocks, shard)
        done = store.blocks_done()
        self.todo = [b for b in mine if b not in done]
        self.skipped = len(mine) - len(self.todo)
        if max_blocks is not None:
            self.todo = self.todo[:max_blocks]
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=sum(len(store.block_range(b)) for b in self.todo), unit="chunk",
                            file=sys.stderr, desc=desc, dynamic_ncols=True)

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        for b in self.todo:
            yield b, list(self.store.block_range(b))

    def write(self, block: int, latents, log_q: np.ndarray, log_p: np.ndarray, log_w: np.ndarray,
              chosen: np.ndarray, meta: dict) -> None:
        """Write one finished block (the store marks it done last), tagged with this shard."""
        self.store.write_block(block, latents, log_q, log_p, log_w, chosen,
                               meta={**meta, "shard": f"{self.shard[0]}/{self.shard[1]}"})

    def advance(self, chunks: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(chunks)
            if postfix:
                self.bar.set_postfix(**postfix)

    def postfix(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> ShardBlocks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

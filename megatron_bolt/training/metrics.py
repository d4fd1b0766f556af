"""Throughput figures of one training step: tokens/s, MFU and peak device memory.

On CPU `mfu` and `peak_mem_gib` are null: a CPU has no tensor-core peak to divide by (unless
`train.peak_tflops` is set) and no device allocator whose high-water mark means anything.
"""

from __future__ import annotations

import torch

from megatron_bolt.config import RunConfig
from megatron_bolt.training.flops import device_peak_tflops, llama_flops_per_step, mfu


class StepMeter:
    def __init__(self, cfg: RunConfig, world_size: int):
        t, m = cfg.train, cfg.model
        self.tokens_per_step = t.global_batch * m.seq_len
        self.world_size = world_size
        # The ponder model runs several Jacobi passes per step; the formula is for one plain pass.
        self.flops = None if m.type != "gpt" else llama_flops_per_step(m, t.global_batch,
                                                                       m.padded_vocab_size(cfg.parallel.tp))
        self.peak = device_peak_tflops(t.peak_tflops)
        self.cuda = torch.cuda.is_available()

    def measure(self, seconds: float) -> dict:
        seconds = max(seconds, 1e-9)
        return {
            "tokens_per_s": self.tokens_per_step / seconds,
            "mfu": None if self.flops is None else mfu(self.flops, seconds, self.world_size, self.peak),
            # rank 0's device, highest allocation since the start of the run
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None,
        }

"""The Megatron half of a conversion: a one-rank process group and the TP=1 model.

Conversion always works on the TP=1 layout in a single process; a distributed checkpoint reshards
to any TP/PP on load, so nothing here depends on how the checkpoint will be (or was) trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_bolt.config import ModelConfig, ParallelConfig
from megatron_bolt.errors import UserError


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """A 1-rank process group with TP=PP=1 for the duration (reused if the caller already has one).
    Without CUDA it needs the CPU compatibility layer (`megatron_bolt.compat.cpu.install()`)."""
    from megatron.core import parallel_state

    from megatron_bolt import runtime

    if dist.is_initialized():
        if dist.get_world_size() != 1 or parallel_state.get_tensor_model_parallel_world_size() != 1:
            raise UserError("checkpoint conversion runs in a single process; do not launch it with torchrun")
        yield
        return
    runtime.init_distributed(tp=1, pp=1, env=runtime.single_rank_env())
    try:
        yield
    finally:
        runtime.shutdown()


def build_cfg(model: ModelConfig, padding_tp: int) -> ModelConfig:
    """The model config to build at TP=1 so the vocabulary is padded as it is at TP=`padding_tp`
    (a checkpoint's embedding has the padded size of the TP it was saved or is meant for)."""
    # conversion runs anywhere (a CPU login node): no TE features, no explicitly requested kernels
    return dataclasses.replace(
        model,
        transformer_impl="local",
        fp8=None,
        gradient_accumulation_fusion=None,
        bias_dropout_fusion=None,
        masked_softmax_fusion=None,
        apply_rope_fusion=None,
        make_vocab_divisible_by=model.make_vocab_divisible_by * padding_tp,
    )


def build_tp1(model: ModelConfig, padding_tp: int, bf16: bool, meta: bool = False) -> torch.nn.Module:
    """The whole model at TP=1 (weights uninitialised; `meta=True` allocates nothing)."""
    from megatron_bolt.models.gpt import build_gpt

    cfg = build_cfg(model, padding_tp)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return build_gpt(cfg, ParallelConfig(tp=1, pp=1), pre_process=True, post_process=True, bf16=bf16)

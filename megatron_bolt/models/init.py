"""Parallelism-invariant weight initialisation.

Megatron initialises each tensor-parallel shard from its own RNG stream, so the same seed gives a
different model at TP=2 than at TP=1. Here every parameter is drawn in full, in its TP=1 layout,
from a generator seeded by (seed, global parameter name), and each rank keeps its slice: the same
seed gives the same model at any TP/PP, which makes parallel runs comparable step for step.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core import parallel_state

from megatron_bolt.config import ModelConfig


def global_name(local_name: str, layer_offset: int, tie_embeddings: bool) -> str:
    """`decoder.layers.3.x` on a stage starting at layer 8 is `decoder.layers.11.x` globally."""
    parts = local_name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(int(parts[2]) + layer_offset)
    name = ".".join(parts)
    if tie_embeddings and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    return name


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _full_tensor(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    if name.endswith("layer_norm_weight") or "layernorm" in name or name.endswith("final_layernorm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):  # q/k/v biases (Qwen2 shape) start at zero, as in Megatron
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)  # Megatron's scaled init for output projections
    return torch.randn(shape, generator=_generator(seed, name)) * std


def _tp_slice(name: str, full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp: int) -> torch.Tensor:
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):
        # SwiGLU: [gate; up] in the TP=1 layout, [gate_r; up_r] on each rank.
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def _full_shape(name: str, param: torch.nn.Parameter, tp: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if tp > 1 and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return tuple(shape)


@torch.no_grad()
def initialize_weights(model: torch.nn.Module, cfg: ModelConfig, seed: int, layer_offset: int) -> None:
    """Fill every parameter of this rank's model chunk with its slice of the canonical init."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for local_name, param in model.named_parameters():
        name = global_name(local_name, layer_offset, cfg.tie_embeddings)
        full = _full_tensor(name, _full_shape(name, param, tp), cfg, seed)
        param.copy_(_tp_slice(name, full, param, tp_rank, tp).to(param.dtype))

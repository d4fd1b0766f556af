"""Parallelism-invariant weight initialisation that builds only this rank's shard.

Megatron initialises each tensor-parallel shard from its own RNG stream, so the same seed gives a
different model at TP=2 than at TP=1. Here the canonical (TP=1 layout) tensor is defined slice by
slice along its TP partition dimension: slice i (a row of a column-parallel weight, a column of a
row-parallel one, a row of anything else) is drawn from a generator seeded by
(seed, global parameter name, i). A rank draws only the slices it holds, so it never allocates a
full tensor, and the same seed gives the same model at any TP/PP.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor

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


_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def _base_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def _std(name: str, cfg: ModelConfig) -> float | None:
    """None: a norm weight (ones)."""
    if name.endswith("layer_norm_weight") or "layernorm" in name:
        return None
    if name.endswith(_ROW_PARALLEL):
        return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)  # Megatron's scaled init for output projections
    return cfg.init_std


def canonical_slices(name: str, full_shape: tuple[int, ...], dim: int, indices: list[int], cfg: ModelConfig,
                     seed: int) -> torch.Tensor:
    """The slices `indices` (along `dim`) of the canonical tensor `name`, stacked along `dim`."""
    std = _std(name, cfg)
    slice_shape = full_shape[:dim] + full_shape[dim + 1:]
    if name.endswith(".bias"):  # q/k/v biases (Qwen2 shape) start at zero, as in Megatron
        return torch.zeros(slice_shape[:dim] + (len(indices),) + slice_shape[dim:])
    if std is None:
        out = torch.ones(slice_shape[:dim] + (len(indices),) + slice_shape[dim:])
        return out
    base = _base_seed(seed, name)
    out = torch.empty((len(indices),) + slice_shape)

    def fill(lo: int, hi: int) -> None:
        gen = torch.Generator()
        for j in range(lo, hi):
            gen.manual_seed(base + indices[j])
            out[j].normal_(0.0, std, generator=gen)

    # Each slice has its own generator, so threads (ATen releases the GIL) give the same values.
    workers = max(1, min(torch.get_num_threads(), len(indices) // 64))
    bounds = [len(indices) * k // workers for k in range(workers + 1)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, bounds[:-1], bounds[1:]))
    return out.movedim(0, dim) if dim else out


def local_indices(name: str, full_len: int, tp_rank: int, tp: int) -> list[int]:
    """Which canonical slices along the partition dimension rank `tp_rank` of `tp` holds."""
    if tp == 1:
        return list(range(full_len))
    if name.endswith("linear_fc1.weight"):
        # SwiGLU: [gate; up] in the TP=1 layout, [gate_r; up_r] on each rank.
        half = full_len // 2
        part = half // tp
        gate = range(tp_rank * part, (tp_rank + 1) * part)
        return list(gate) + [half + i for i in gate]
    part = full_len // tp
    return list(range(tp_rank * part, (tp_rank + 1) * part))


def shard_init(name: str, param: torch.nn.Parameter, cfg: ModelConfig, seed: int, tp_rank: int,
               tp: int) -> torch.Tensor:
    """This rank's part of the canonical tensor `name`, built without the full tensor."""
    # The slicing dimension comes from the layer's role, not from TP attributes, so the canonical
    # tensor is the same whether or not a layer implementation tags its weights at TP=1: rows for
    # column-parallel and vocabulary-parallel weights, columns for row-parallel ones.
    dim = 1 if param.dim() == 2 and name.endswith(_ROW_PARALLEL) else 0
    split = tp > 1 and bool(getattr(param, "tensor_model_parallel", False))
    if split and param.partition_dim != dim:
        raise ValueError(f"{name}: split along dim {param.partition_dim}, expected {dim}")
    full_shape = list(param.shape)
    if split:
        full_shape[dim] *= tp
    indices = local_indices(name, full_shape[dim], tp_rank, tp if split else 1)
    return canonical_slices(name, tuple(full_shape), dim, indices, cfg, seed)


@torch.no_grad()
def initialize_weights(model: torch.nn.Module, cfg: ModelConfig, seed: int, layer_offset: int) -> None:
    """Fill every parameter of this rank's model chunk with its slice of the canonical init."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for local_name, param in model.named_parameters():
        name = global_name(local_name, layer_offset, cfg.tie_embeddings)
        param.copy_(shard_init(name, param, cfg, seed, tp_rank, tp).to(param.dtype))

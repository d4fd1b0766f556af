"""Llama-style GPT on Megatron-Core: RMSNorm, SwiGLU, RoPE, GQA, no biases.

The local (pure Megatron-Core) layer spec runs everywhere, CPU included; the Transformer Engine
spec is used on GPU when TE is importable, and is the only way to get FP8. Both specs give the
same distributed-checkpoint keys, so a checkpoint moves freely between them.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_bolt.config import ModelConfig, ParallelConfig
from megatron_bolt.errors import UserError


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def use_transformer_engine(model: ModelConfig) -> bool:
    if model.fp8 and not transformer_engine_available():
        raise UserError(
            f"model.fp8={model.fp8!r} needs Transformer Engine on a GPU, and it is not importable here "
            "(use an NGC PyTorch image, or set model.fp8=null)"
        )
    if model.transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise UserError("model.transformer_impl=transformer_engine, but Transformer Engine is not importable")
        return True
    return model.transformer_impl == "auto" and transformer_engine_available()


def transformer_config(model: ModelConfig, parallel: ParallelConfig, bf16: bool = False) -> TransformerConfig:
    """The Megatron-Core TransformerConfig of a Llama-architecture model."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    fp8 = {}
    if model.fp8:
        fp8 = {"fp8": model.fp8, "fp8_margin": 0, "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        ffn_hidden_size=model.ffn,
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vp,
        # Megatron-LM's default for the interleaved schedule (--no-overlap-p2p-communication off):
        # unbatched, overlapped p2p; batched p2p needs pp > 2 (several sends between two ranks)
        overlap_p2p_comm=parallel.vp is not None,
        batch_p2p_comm=parallel.vp is None,
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        # Megatron's own init also tags parameters with their TP partitioning (used by grad-norm
        # clipping and the distributed optimizer); megatron_bolt.models.init then overwrites the
        # values with the parallelism-invariant ones.
        perform_initialization=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **fp8,
    )


class SDPACoreAttention(DotProductAttention):
    """Megatron-Core's local core attention, computed by `F.scaled_dot_product_attention` in the case
    this project uses (causal, no mask tensor, no dropout, no softmax offset).

    The local spec's DotProductAttention materialises the [b*h, s, s] scores, masks them with
    `masked_fill` and softmaxes them in separate ops; on CPU that cost about a quarter of a small
    model's step (docs/benchmarks.md).
    Any other case goes to the parent unchanged. No parameters: checkpoints are unaffected.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        plain = (attention_mask is None and attention_bias is None and packed_seq_params is None
                 and self.softmax_offset is None and (self.attention_dropout.p == 0 or not self.training)
                 and self.attn_mask_type == AttnMaskType.causal)
        if not plain:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        # [s, b, heads, d] -> [b, heads, s, d]; GQA: SDPA broadcasts the KV groups itself.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


def layer_spec(model: ModelConfig):
    if use_transformer_engine(model):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def build_gpt(
    model: ModelConfig,
    parallel: ParallelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    bf16: bool = False,
    vp_stage: int | None = None,
) -> GPTModel:
    """One pipeline stage of the model (the whole model when pp == 1)."""
    return GPTModel(**gpt_model_kwargs(model, parallel, pre_process, post_process, bf16), vp_stage=vp_stage)


def gpt_model_kwargs(
    model: ModelConfig, parallel: ParallelConfig, pre_process: bool, post_process: bool, bf16: bool
) -> dict:
    """GPTModel's constructor arguments for a Llama-style stage (shared by the ponder model)."""
    return dict(
        config=transformer_config(model, parallel, bf16),
        transformer_layer_spec=layer_spec(model),
        vocab_size=model.padded_vocab_size(parallel.tp),
        max_sequence_length=model.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_base),
        parallel_output=True,
    )

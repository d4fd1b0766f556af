"""Llama-style GPT on Megatron-Core: RMSNorm, SwiGLU, RoPE (optionally Llama-3 scaled), GQA, an
explicit head dim, optional q/k/v biases (Qwen2), tied or untied embeddings.

The local (pure Megatron-Core) layer spec runs everywhere, CPU included; the Transformer Engine
spec is used on GPU when TE is importable, and is the only way to get FP8. Both specs give the
same distributed-checkpoint keys, so a checkpoint moves freely between them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

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


def use_transformer_engine(model: ModelConfig, parallel: ParallelConfig | None = None) -> bool:
    if parallel is not None and parallel.cp > 1 and not transformer_engine_available():
        raise UserError(
            f"parallel.cp={parallel.cp} needs Transformer Engine on a GPU (context-parallel attention), "
            "and it is not importable here (use an NGC PyTorch image, or set parallel.cp=1)"
        )
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


FUSED_KERNELS = ("gradient_accumulation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _te_rope_kernel() -> bool:
    if not _importable("transformer_engine"):
        return False
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def _c_compiler() -> bool:
    """Triton builds its kernel launchers with a C compiler at run time (absent from slim images)."""
    return any(shutil.which(c) for c in (os.environ.get("CC", "cc"), "gcc", "clang"))


def fused_kernels(model: ModelConfig, cuda: bool, importable=_importable, te_rope_kernel=_te_rope_kernel,
                  c_compiler=_c_compiler) -> dict:
    """Which of Megatron's fused kernels this run uses: an explicit `model.<flag>` wins, None means
    "on when this machine has the kernel" (Megatron-LM turns them all on by default and lets a
    missing extension fail; here a missing one is skipped instead).

    Every kernel computes the same function as its unfused path, so this choice is device-level
    (like picking cuBLAS over a CPU GEMM), not a choice of dtypes, groups, optimizer flags or
    checkpoint formats: the checkpoint, the numbers in the config and the optimizer are the same
    with and without them. None of them exists on CPU, which is why the CPU tests check this
    decision with its inputs rather than run the kernels.
    - gradient_accumulation_fusion: the wgrad GEMM accumulates into the fp32 `main_grad` directly;
      the output layer is always megatron-core's ColumnParallelLinear, which needs apex's
      `fused_weight_gradient_mlp_cuda` (present in NGC images; never pip-installed here).
    - bias_dropout_fusion: megatron-core's jit-fused bias+dropout+residual add (torch.compile, so
      it needs triton and a C compiler).
    - masked_softmax_fusion: the local spec's fallback softmax via Megatron's fused softmax extensions.
    - apply_rope_fusion: Transformer Engine's fused RoPE.
    """
    available = {
        "gradient_accumulation_fusion": cuda and importable("fused_weight_gradient_mlp_cuda"),
        "bias_dropout_fusion": cuda and importable("triton") and c_compiler(),
        "masked_softmax_fusion": cuda and importable("scaled_upper_triang_masked_softmax_cuda")
        and importable("scaled_masked_softmax_cuda"),
        "apply_rope_fusion": cuda and te_rope_kernel(),
    }
    chosen = {}
    for name in FUSED_KERNELS:
        wanted = getattr(model, name)
        if wanted and not available[name]:
            raise UserError(f"model.{name}=true, but its kernel is not available on this machine "
                            "(set it to null to use it only where it is)")
        chosen[name] = available[name] if wanted is None else wanted
    return chosen


def _fp8_kwargs(model: ModelConfig) -> dict:
    if not model.fp8:
        return {}
    return {"fp8": model.fp8, "fp8_recipe": model.fp8_recipe, "fp8_margin": model.fp8_margin,
            "fp8_amax_history_len": model.fp8_amax_history_len,
            "fp8_amax_compute_algo": model.fp8_amax_compute_algo, "fp8_wgrad": model.fp8_wgrad}


def _recompute_kwargs(model: ModelConfig) -> dict:
    if model.recompute_granularity is None:
        return {}
    kwargs = {"recompute_granularity": model.recompute_granularity}
    if model.recompute_granularity == "full":
        kwargs.update(recompute_method=model.recompute_method, recompute_num_layers=model.recompute_num_layers)
    else:
        kwargs["recompute_modules"] = list(model.recompute_modules)
    return kwargs


def check_requirements(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise the one-line UserError of a feature this machine cannot run (TE for cp/fp8, a kernel)."""
    use_transformer_engine(model, parallel)
    fused_kernels(model, torch.cuda.is_available())
    if (model.recompute_granularity == "selective" and "layernorm" in model.recompute_modules
            and not transformer_engine_available()):
        raise UserError("model.recompute_modules 'layernorm' needs Transformer Engine on a GPU (megatron-core "
                        "recomputes norms with its TE-based output-discarding checkpoint); drop it here")


def transformer_config(model: ModelConfig, parallel: ParallelConfig, bf16: bool = False) -> TransformerConfig:
    """The Megatron-Core TransformerConfig of a Llama-architecture model."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        ffn_hidden_size=model.ffn,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vp,
        context_parallel_size=parallel.cp,
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
        persist_layer_norm=False,
        **fused_kernels(model, torch.cuda.is_available()),
        **_recompute_kwargs(model),
        **_fp8_kwargs(model),
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


def layer_spec(model: ModelConfig, parallel: ParallelConfig | None = None):
    if use_transformer_engine(model, parallel):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def rotary_for(model: GPTModel, positions: torch.Tensor) -> torch.Tensor:
    """RoPE frequencies [n, 1, 1, d] for explicit position ids [n] (not 0..n-1)."""
    return model.rotary_pos_emb(int(positions.max().item()) + 1)[positions.long()]


def output_logits(model: GPTModel, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer on post-final-norm hidden states [s, b, h] (tied: the embedding matrix);
    logits [s, b, vocab / tp] (this rank's vocabulary shard)."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    out, _ = model.output_layer(hidden, weight=weight)
    return out


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
    spec = layer_spec(model, parallel)  # first: its requirement errors are the clearest
    return dict(
        config=transformer_config(model, parallel, bf16),
        transformer_layer_spec=spec,
        vocab_size=model.padded_vocab_size(parallel.tp),
        max_sequence_length=model.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_base,
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
        parallel_output=True,
    )

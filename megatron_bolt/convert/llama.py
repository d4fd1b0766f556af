"""Name and layout mapping between Hugging Face Llama / Mistral / Qwen2 models and our Megatron-Core GPT (TP=1).

Everything here is pure tensor arithmetic on the TP=1 layout (works on meta tensors too):

- QKV: Megatron fuses q, k, v into one `linear_qkv.weight` grouped per query (KV) group:
  for group g, its `heads/kv_heads` query heads, then its key head, then its value head. HF keeps
  `q_proj`, `k_proj`, `v_proj` separate, query heads in order, query head i using KV head
  i // (heads/kv_heads). Both sides use the rotate-half RoPE convention (Megatron-Core with
  `rotary_interleaved=False`), so rows are regrouped, never permuted within a head.
- Qwen2's q/k/v biases fuse into `linear_qkv.bias` with the same grouping as the weight rows.
- SwiGLU: `linear_fc1.weight` = cat([gate_proj, up_proj]).
- Vocabulary: Megatron's embedding / output layer have `padded_vocab` rows; the padding rows are
  zeros on import and dropped on export, so they never reach an HF model.

Both directions are generators over (name, tensor) that pull source tensors through a `get(name)`
callback, so a converter holds the model plus one layer's worth of temporaries, never two models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from megatron_bolt.config import ModelConfig
from megatron_bolt.errors import UserError

Getter = Callable[[str], torch.Tensor]

# HF tensors that carry no weights (old checkpoints stored RoPE frequencies as buffers).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


# model_type -> the transformers class. All three are the same network when Qwen2 gets its q/k/v
# biases and Mistral runs without a sliding window (transformers' modeling_llama / modeling_qwen2 /
# modeling_mistral; Megatron-LM's tools/checkpoint/schema_hf.py `HFLMSchema` names the same tensors).
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Megatron-Core's Llama-3 RoPE scaling (`RotaryEmbedding._apply_scaling`) takes only the factor; the
# other three fields are fixed at these values (those of Llama 3.1, 3.2 and 3.3).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Fields whose presence (truthy) changes the network in a way the Megatron model cannot reproduce.
_REFUSED_FIELDS = {
    "quantization_config": "quantized weights are not supported; convert the unquantized model",
    "mlp_bias": "biases in the MLP are not supported",
}


def _rope(hf: dict, source: str) -> tuple[float, float | None]:
    """(theta, llama3 scaling factor or None) from the transformers 4 spelling (`rope_theta`,
    `rope_scaling`) or the 5 spelling (`rope_parameters`); other RoPE variants are refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    field, spec = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    kind = spec.get("rope_type") or spec.get("type") or "default"
    if spec.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{source}: field '{field}.partial_rotary_factor' is {spec['partial_rotary_factor']}; "
                        "only full rotary embeddings are supported")
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UserError(f"{source}: field '{field}.rope_type' is {kind!r}; only 'default' and 'llama3' RoPE are supported")
    for key, want in _LLAMA3_FIXED.items():
        if float(spec.get(key, want)) != want:
            raise UserError(f"{source}: field '{field}.{key}' is {spec[key]}; Megatron-Core's llama3 RoPE scaling "
                            f"fixes it at {want:g}")
    if not isinstance(spec.get("factor"), (int, float)):
        raise UserError(f"{source}: field '{field}.factor' is missing or not a number")
    return float(theta), float(spec["factor"])


def _check_no_sliding_window(hf: dict, family: str, context: int, source: str) -> None:
    """Sliding-window attention is refused (the Megatron model attends to the whole context)."""
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise UserError(f"{source}: field 'use_sliding_window' is true; sliding-window attention is not supported")
    window = hf.get("sliding_window")
    if family == "mistral" and window is not None and window < context:
        raise UserError(f"{source}: field 'sliding_window' is {window}, smaller than max_position_embeddings "
                        f"({context}); sliding-window attention is not supported (set it to null for full attention)")
    if family != "qwen2" or hf.get("use_sliding_window"):
        sliding = [i for i, t in enumerate(hf.get("layer_types") or []) if t != "full_attention"]
        if sliding:
            raise UserError(f"{source}: field 'layer_types' has non-full attention at layers {sliding[:4]}; not supported")


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF Llama / Mistral / Qwen2 `config.json` dict (transformers 4 or 5
    spelling). Anything the Megatron model would not reproduce is a UserError naming the field."""
    family = hf.get("model_type", "llama")
    if family not in FAMILIES:
        raise UserError(f"{source}: field 'model_type' is {family!r}; supported: {', '.join(sorted(FAMILIES))}")
    arch = hf.get("architectures") or [FAMILIES[family]]
    if FAMILIES[family] not in arch:
        raise UserError(f"{source}: field 'architectures' is {arch}; expected {FAMILIES[family]} for model_type {family}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool) or hf[key] < 1:
            raise UserError(f"{source}: field '{key}' is missing or not a positive integer")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: field 'hidden_act' is {hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    for key, why in _REFUSED_FIELDS.items():
        if hf.get(key):
            raise UserError(f"{source}: field '{key}' is set; {why}")
    if family == "llama" and hf.get("attention_bias"):
        raise UserError(f"{source}: field 'attention_bias' is true (biases on q/k/v and o_proj); not supported")
    context = int(hf.get("max_position_embeddings") or 2048)
    _check_no_sliding_window(hf, family, context, source)
    theta, factor = _rope(hf, source)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if not isinstance(head_dim, int) or head_dim % 2:
        raise UserError(f"{source}: field 'head_dim' is {head_dim!r}; it must be an even integer")
    kv = hf.get("num_key_value_heads") or heads
    if heads % kv:
        raise UserError(f"{source}: field 'num_key_value_heads' ({kv}) must divide num_attention_heads ({heads})")
    return ModelConfig(
        type="gpt",
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=kv if kv != heads else None,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        seq_len=context,
        max_position_embeddings=context,
        kv_channels=head_dim if head_dim * heads != hf["hidden_size"] else None,
        qkv_bias=family == "qwen2",
        rope_base=theta,
        rope_scaling_factor=factor,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def export_family(cfg: ModelConfig, base: dict | None) -> str:
    """The HF model_type to export `cfg` as: the imported model's, else llama (qwen2 with q/k/v biases)."""
    family = (base or {}).get("model_type")
    if family not in FAMILIES:
        family = "qwen2" if cfg.qkv_bias else "llama"
    if (family == "qwen2") != cfg.qkv_bias:
        raise UserError(f"model.qkv_bias={cfg.qkv_bias} does not fit an HF {FAMILIES[family]} export")
    return family


def rope_fields(cfg: ModelConfig) -> dict:
    """RoPE in both spellings: transformers 4.x / SGLang read `rope_theta` + `rope_scaling`,
    transformers 5.x / recent vLLM read `rope_parameters`."""
    scaling = None
    if cfg.rope_scaling_factor is not None:
        scaling = {"rope_type": "llama3", "factor": float(cfg.rope_scaling_factor), **_LLAMA3_FIXED}
    params = {**(scaling or {"rope_type": "default"}), "rope_theta": float(cfg.rope_base)}
    return {"rope_theta": float(cfg.rope_base), "rope_scaling": scaling, "rope_parameters": params}


def dtype_fields(dtype: torch.dtype) -> dict:
    """The weights' dtype in both spellings (`torch_dtype` for transformers 4.x, `dtype` for 5.x)."""
    name = str(dtype).removeprefix("torch.")
    return {"torch_dtype": name, "dtype": name}


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype, base: dict | None = None) -> dict:
    """An HF config.json dict for `cfg` that transformers 4.x and 5.x, vLLM and SGLang all read:
    shape fields from `cfg`, everything else (token ids, generation defaults) kept from `base`, the
    config.json of the model we imported from; RoPE and dtype in both spellings."""
    from transformers import AutoConfig

    family = export_family(cfg, base)
    keep = {
        k: v
        for k, v in (base or {}).items()
        if k not in ("rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype", "transformers_version",
                     "layer_types", "auto_map", "architectures", "model_type")
    }
    keep.update(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.context,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        rope_parameters=rope_fields(cfg)["rope_parameters"],
    )
    if family == "llama":
        keep.update(attention_bias=False, mlp_bias=False)
    out = AutoConfig.for_model(family, **keep).to_dict()
    out.pop("transformers_version", None)
    out.update(architectures=[FAMILIES[family]], model_type=family, **rope_fields(cfg), **dtype_fields(dtype))
    return out


# --------------------------------------------------------------------------------------------------
# Fused layouts
# --------------------------------------------------------------------------------------------------


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v projections -> Megatron's grouped `linear_qkv.weight`."""
    groups, d, hidden = cfg.kv_heads, _head_dim(cfg), q.shape[-1]
    per_group = cfg.num_attention_heads // groups
    q = q.reshape(groups, per_group * d, hidden)
    k = k.reshape(groups, d, hidden)
    v = v.reshape(groups, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * d, hidden)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped `linear_qkv.weight` -> HF q/k/v projections (contiguous copies)."""
    groups, d, hidden = cfg.kv_heads, _head_dim(cfg), qkv.shape[-1]
    per_group = cfg.num_attention_heads // groups
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, hidden).split([per_group * d, d, d], dim=1)
    return (
        q.reshape(groups * per_group * d, hidden).contiguous(),
        k.reshape(groups * d, hidden).contiguous(),
        v.reshape(groups * d, hidden).contiguous(),
    )


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Vocabulary padding: zero rows appended up to `rows`."""
    if weight.shape[0] > rows:
        raise UserError(f"vocabulary of {weight.shape[0]} rows does not fit a padded vocabulary of {rows}")
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


# --------------------------------------------------------------------------------------------------
# Names and shapes
# --------------------------------------------------------------------------------------------------


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a `LlamaForCausalLM` state dict as `save_pretrained` writes it (no tied head)."""
    h, d = cfg.hidden_size, _head_dim(cfg)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
                p + "self_attn.k_proj.weight": (cfg.kv_heads * d, h),
                p + "self_attn.v_proj.weight": (cfg.kv_heads * d, h),
                p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (cfg.ffn, h),
                p + "mlp.up_proj.weight": (cfg.ffn, h),
                p + "mlp.down_proj.weight": (h, cfg.ffn),
            }
        )
        if cfg.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (cfg.num_attention_heads * d,),
                    p + "self_attn.k_proj.bias": (cfg.kv_heads * d,),
                    p + "self_attn.v_proj.bias": (cfg.kv_heads * d,),
                }
            )
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


# Per-layer tensors that map one to one (Megatron suffix, HF suffix).
_LAYER_ONE_TO_ONE = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
)


def mcore_from_hf(cfg: ModelConfig, padded_vocab: int, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron (TP=1) parameters, one at a time, built from HF tensors fetched with `get`."""
    yield "embedding.word_embeddings.weight", pad_rows(get("model.embed_tokens.weight"), padded_vocab)
    for i in range(cfg.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        for m_suffix, hf_suffix in _LAYER_ONE_TO_ONE:
            yield m + m_suffix, get(p + hf_suffix)
        q, k, v = (get(p + f"self_attn.{x}_proj.weight") for x in "qkv")
        yield m + "self_attention.linear_qkv.weight", fuse_qkv(q, k, v, cfg)
        del q, k, v
        if cfg.qkv_bias:  # the bias is fused like a weight with one column
            q, k, v = (get(p + f"self_attn.{x}_proj.bias")[:, None] for x in "qkv")
            yield m + "self_attention.linear_qkv.bias", fuse_qkv(q, k, v, cfg)[:, 0]
        yield m + "mlp.linear_fc1.weight", torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not cfg.tie_embeddings:
        yield "output_layer.weight", pad_rows(get("lm_head.weight"), padded_vocab)


def hf_from_mcore(cfg: ModelConfig, get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors, one at a time, from Megatron (TP=1) parameters fetched with `get`; the
    vocabulary padding is cut off. Yields contiguous tensors ready for safetensors."""
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")[: cfg.vocab_size].contiguous()
    for i in range(cfg.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        for m_suffix, hf_suffix in _LAYER_ONE_TO_ONE:
            yield p + hf_suffix, get(m + m_suffix).contiguous()
        q, k, v = split_qkv(get(m + "self_attention.linear_qkv.weight"), cfg)
        yield p + "self_attn.q_proj.weight", q
        yield p + "self_attn.k_proj.weight", k
        yield p + "self_attn.v_proj.weight", v
        del q, k, v
        if cfg.qkv_bias:
            for x, bias in zip("qkv", split_qkv(get(m + "self_attention.linear_qkv.bias")[:, None], cfg)):
                yield p + f"self_attn.{x}_proj.bias", bias[:, 0].contiguous()
        gate, up = get(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
        yield p + "mlp.gate_proj.weight", gate.contiguous()
        yield p + "mlp.up_proj.weight", up.contiguous()
    yield "model.norm.weight", get("decoder.final_layernorm.weight").contiguous()
    if not cfg.tie_embeddings:
        yield "lm_head.weight", get("output_layer.weight")[: cfg.vocab_size].contiguous()


def new_vocab_rows(n: int, hidden: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows for added tokens: N(0, std = hidden^-0.5) clamped at 3 sigma (method.md)."""
    std = hidden**-0.5
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hidden, generator=gen) * std).clamp_(-3 * std, 3 * std).to(dtype)

"""Name and layout mapping between Hugging Face `LlamaForCausalLM` and our Megatron-Core GPT (TP=1).

Everything here is pure tensor arithmetic on the TP=1 layout (works on meta tensors too):

- QKV: Megatron fuses q, k, v into one `linear_qkv.weight` grouped per query (KV) group:
  for group g, its `heads/kv_heads` query heads, then its key head, then its value head. HF keeps
  `q_proj`, `k_proj`, `v_proj` separate, query heads in order, query head i using KV head
  i // (heads/kv_heads). Both sides use the rotate-half RoPE convention (Megatron-Core with
  `rotary_interleaved=False`), so rows are regrouped, never permuted within a head.
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


def _rope(hf: dict) -> tuple[float, dict | None]:
    """RoPE theta and any scaling, from either the transformers 4 or the 5 spelling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or params.get("rope_type", "default")
    return float(theta), None if kind in (None, "default") else (scaling or params)


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for an HF Llama `config.json` dict; unsupported variants are UserErrors."""
    arch = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in arch:
        raise UserError(
            f"{source}: model_type={hf.get('model_type')!r}, architectures={arch}: only LlamaForCausalLM is supported"
        )
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise UserError(f"{source}: field '{key}' is missing or not an integer")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: field 'hidden_act' is {hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UserError(f"{source}: field '{key}' is true; biases are not supported")
    theta, scaling = _rope(hf)
    if scaling is not None:
        raise UserError(f"{source}: RoPE scaling {scaling} is not supported (only default RoPE)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise UserError(
            f"{source}: field 'head_dim' ({head_dim}) * num_attention_heads ({heads}) != hidden_size "
            f"({hf['hidden_size']}); not supported"
        )
    kv = hf.get("num_key_value_heads") or heads
    if heads % kv:
        raise UserError(f"{source}: num_key_value_heads ({kv}) must divide num_attention_heads ({heads})")
    return ModelConfig(
        type="gpt",
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=kv if kv != heads else None,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_base=theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype, base: dict | None = None) -> dict:
    """An HF `LlamaConfig` dict for `cfg`: shape fields from `cfg`, everything else (token ids,
    generation defaults) kept from `base`, the config.json of the model we imported from."""
    from transformers import LlamaConfig

    keep = {
        k: v
        for k, v in (base or {}).items()
        if k not in ("rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype", "transformers_version")
    }
    keep.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
    )
    config = LlamaConfig(**keep)
    config.dtype = dtype
    return config.to_dict()


# --------------------------------------------------------------------------------------------------
# Fused layouts
# --------------------------------------------------------------------------------------------------


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


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

"""Configuration of a PonderLM-2 (continuous latent thoughts) Llama-architecture model exported by
megatron-bolt (`bolt convert mcore-to-hf` on a `model.type: ponder` checkpoint).

Loaded with `trust_remote_code=True`; this file and `modeling_ponder.py` are copied next to the
weights. RoPE is read from either transformers spelling: 4.x `rope_theta` + `rope_scaling`, or 5.x
`rope_parameters`. Works with transformers 4.4x-4.5x and 5.x.
"""

from __future__ import annotations

try:  # transformers 5 name; 4.x has only PretrainedConfig (5.x keeps it as an alias)
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig


class PonderConfig(_BaseConfig):
    model_type = "ponder_llama"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rms_norm_eps: float = 1e-5,
        attention_bias: bool = False,  # q/k/v biases (Qwen2 shape); o_proj never has one
        tie_word_embeddings: bool = False,
        latents_per_token: int = 1,
        eval_jacobi_iters: int = 3,
        embed_scale: float | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        rope_parameters = kwargs.pop("rope_parameters", None) or {}
        rope_theta = kwargs.pop("rope_theta", None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.latents_per_token = latents_per_token
        self.eval_jacobi_iters = eval_jacobi_iters
        self.embed_scale = embed_scale if embed_scale is not None else (2.5 * hidden_size) ** 0.5
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Set after the base class, which in transformers 5 would rewrite the RoPE fields its own way.
        theta = rope_theta or rope_parameters.get("rope_theta") or 10000.0
        scaling = rope_scaling or {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if (scaling or {}).get("rope_type", scaling.get("type") if scaling else None) in (None, "default"):
            scaling = None
        # (no `rope_scaling` attribute: in transformers 5 it is an alias of rope_parameters)
        self.rope_theta = float(theta)
        self.rope_parameters = {**(scaling or {"rope_type": "default"}), "rope_theta": float(theta)}

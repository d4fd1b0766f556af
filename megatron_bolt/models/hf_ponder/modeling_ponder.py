"""PonderLM-2 (continuous latent thoughts) for Hugging Face transformers, as exported by megatron-bolt.

The network is a Llama (RMSNorm, SwiGLU, rotate-half RoPE with optional llama3 scaling, GQA,
optional q/k/v biases); weight names are those of `LlamaForCausalLM`. What differs is the
sequence the layers see (megatron-bolt method.md section 2): before predicting the token after
t, the model runs K latent slots after token t, each fed the post-final-norm hidden state of the
slot before it, unprojected, at token t's position id. The token embedding is scaled by
`embed_scale`. Logits are read at each token's last latent slot.

- A forward without a cache (scoring, the prefill) runs the Jacobi procedure: K warm-up passes over
  growing sequences (the tokens, then tokens with 1, ..., K-1 latents: each pass's slot outputs
  become the latents of the next), `eval_jacobi_iters` Jacobi passes over the full interleaved
  sequence, then the final pass, which also fills the KV cache. This equals megatron-bolt's
  `PonderGPTModel.forward` in eval mode, so `bolt score` on the checkpoint and log-likelihoods here agree.
- With a non-empty cache every new token is decoded exactly: K+1 single-slot steps, each appended
  to the cache (so the cache holds K+1 entries per token).
- `attention_mask` and `position_ids` are per token, as for any causal LM (left padding works);
  they are expanded to the slots internally.
- `generate` is this model's own loop (greedy, or sampling with temperature / top-k): the
  Jacobi prefill, then the KV-cached decode.

Self-contained on purpose (only PreTrainedModel, DynamicCache and the output class come from
transformers), so it loads in transformers 4.4x-4.5x and 5.x alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_ponder import PonderConfig
except ImportError:  # loaded as a plain module (tests)
    from configuration_ponder import PonderConfig

_TRANSFORMERS_5 = int(__import__("transformers").__version__.split(".")[0]) >= 5


def rope_inv_freq(config: PonderConfig) -> torch.Tensor:
    """Inverse frequencies [d/2]; llama3 scaling divides the low frequencies by `factor` and blends
    the band between them smoothly (transformers' `_compute_llama3_parameters`, Megatron-Core's
    `RotaryEmbedding._apply_scaling`)."""
    d = config.head_dim
    scaling = config.rope_parameters
    inv = 1.0 / (scaling["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if scaling.get("rope_type", "default") == "default":
        return inv
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: PonderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.groups, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.d, bias=bias)
        self.k_proj = nn.Linear(h, self.groups * self.d, bias=bias)
        self.v_proj = nn.Linear(h, self.groups * self.d, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.d, h, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.groups, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.groups, self.d).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.heads // self.groups
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.d))


class MLP(nn.Module):
    def __init__(self, config: PonderConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: PonderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class PonderBackbone(nn.Module):
    """Embedding, layers and final norm (`model.*` in the state dict, as in LlamaForCausalLM)."""

    def __init__(self, config: PonderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Not a buffer: transformers 5 builds models on the meta device and would leave a
        # non-persistent buffer uninitialised; this is recomputed per call, which costs nothing.
        self.config = config

    def run(self, x, positions, key_valid, cache):
        """Post-final-norm outputs of slots x [b, s, h] at positions [b, s], after the cached slots.
        key_valid [b, cached + s]: which key slots are real (not padding); every slot also sees itself."""
        b, s, _ = x.shape
        freqs = positions[..., None].float() * rope_inv_freq(self.config).to(x.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
        total = key_valid.shape[1]
        past = total - s
        q_idx = torch.arange(s, device=x.device)[:, None] + past
        k_idx = torch.arange(total, device=x.device)[None, :]
        mask = (k_idx <= q_idx)[None] & key_valid[:, None, :].bool()
        mask = (mask | (k_idx == q_idx)[None])[:, None]  # [b, 1, s, total]; padded rows never go all-masked
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


class PonderPreTrainedModel(PreTrainedModel):
    config_class = PonderConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class PonderForCausalLM(PonderPreTrainedModel):
    # transformers 5 maps the tied key to its source; 4.x lists the tied keys
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: PonderConfig):
        super().__init__(config)
        self.model = PonderBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ------------------------------------------------------------------------------- the two modes
    def _jacobi(self, emb, positions, token_valid, cache, iters: int) -> torch.Tensor:
        """Hidden states [b, n, h] at each token's last latent, by the Jacobi procedure; the final
        pass goes through `cache` (if any), K+1 entries per token in decode order."""
        K = self.config.latents_per_token
        b, n, h = emb.shape
        latents = emb.new_zeros(b, n, 0, h)
        schedule = list(range(1, K + 1)) + [K + 1] * (iters + 1)  # slots per token of each pass
        for p, slots in enumerate(schedule):
            x = torch.cat([emb[:, :, None], latents], dim=2).reshape(b, n * slots, h)
            final = p == len(schedule) - 1
            out = self.model.run(x, positions.repeat_interleave(slots, dim=1),
                                 token_valid.repeat_interleave(slots, dim=1), cache if final else None)
            out = out.view(b, n, slots, h)
            if final:
                return out[:, :, K]
            latents = out[:, :, :K]  # slot j's output is latent j+1 (the slot after it)

    def _decode(self, emb, positions, token_valid, cache, past: int) -> torch.Tensor:
        """Exact sequential decoding of new tokens after `past` cached ones: K+1 steps per token."""
        S = self.config.latents_per_token + 1
        slot_valid = token_valid.repeat_interleave(S, dim=1)
        outs = []
        for t in range(emb.shape[1]):
            x = emb[:, t : t + 1]
            for k in range(S):
                end = (past + t) * S + k + 1
                x = self.model.run(x, positions[:, t : t + 1], slot_valid[:, :end], cache)
            outs.append(x)
        return torch.cat(outs, dim=1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        jacobi_iters: int | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        S = self.config.latents_per_token + 1
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")  # 5.x's new name
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() // S if cache is not None else 0
        b, n = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, past + n, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape[1] != past + n:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} tokens, expected {past} cached + {n} new")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        emb = self.model.embed_tokens(input_ids) * self.config.embed_scale
        if past == 0:
            iters = self.config.eval_jacobi_iters if jacobi_iters is None else jacobi_iters
            hidden = self._jacobi(emb, position_ids, attention_mask, cache, iters)
        else:
            hidden = self._decode(emb, position_ids, attention_mask, cache, past)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        jacobi_iters: int | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Prompt + continuation ids [b, n + new]: the Jacobi prefill, then K+1 cached steps per
        token. Rows that produced an EOS continue with `pad_token_id` (EOS if unset)."""
        gen_cfg = getattr(self, "generation_config", None)
        if eos_token_id is None and gen_cfg is not None:
            eos_token_id = gen_cfg.eos_token_id
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cache = DynamicCache()
        out = self(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=1, jacobi_iters=jacobi_iters)
        last_pos = (attention_mask.long().sum(-1) - 1)[:, None]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = []
        for step in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if do_sample:
                logits = logits / max(temperature, 1e-6)
                if top_k:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new.append(nxt)
            done |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device)) if eos else done
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            out = self(nxt[:, None], attention_mask=attention_mask, position_ids=last_pos, past_key_values=cache,
                       use_cache=True)
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)

"""A lean forward pass for transformers' LlamaForCausalLM, used by the local engine.

It computes what `LlamaForCausalLM.forward` computes (transformers' modeling_llama: embedding,
per layer RMSNorm -> attention with RoPE -> residual -> RMSNorm -> gated MLP -> residual, final norm,
lm_head) from the model's own modules and weights, with less work per step:
- q/k/v and gate/up are one matmul each (weights concatenated once); on CPU every projection uses a
  oneDNN linear with its weight reordered once (`torch.ops.mkldnn._reorder_linear_weight`, what
  torch inductor does for CPU linears; vLLM's CPU build also runs fp32 linears through oneDNN),
  measured 1.2x (layers) to 2x (an 8000-row lm_head) faster than MKL on the AMD CI cores;
- the KV cache of every layer is one preallocated buffer (`KVCache`) and attention reads it in place:
  decode attention is two batched matmuls with the query heads of one KV head stacked (no
  `repeat_kv` copy of the cache, no 4-D float mask); multi-token passes use SDPA with `enable_gqa`;
- the mask is built from the 2-D key mask once per call, not through transformers' mask machinery.
The numbers agree with transformers' forward to float32 rounding (tests/test_engines.py checks log-
probs to 1e-5), not bit for bit: kernels and summation order differ.

Only plain Llama layers are taken (`LeanLlama.supports`); anything else (Mistral sliding windows,
Qwen2 biases, ponder exports) runs through transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cpu_packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int):
    """A linear over `weight` reordered for oneDNN, or None where that is not available/exact."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or op is None
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        probe = torch.randn(3, weight.shape[1], dtype=weight.dtype)
        got = op(probe, packed, bias, "none", [], "")
        want = F.linear(probe, weight, bias)
    except RuntimeError:
        return None
    if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-4):
        return None
    return lambda x: op(x, packed, bias, "none", [], "")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int):
    """x -> x @ weight.T + bias, by the fastest exact kernel for weight's device."""
    weight = weight.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    fast = _cpu_packed_linear(weight, bias, rows_hint)
    return fast or (lambda x: F.linear(x, weight, bias))


def _cat_linear(mods, rows_hint: int):
    weight = torch.cat([m.weight for m in mods], dim=0)
    bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods], dim=0)
    return _linear(weight, bias, rows_hint)


class KVCache:
    """Keys and values of all layers: per layer a [rows, kv_heads, capacity, head_dim] buffer, of
    which the first `length` positions are filled (the same positions for every row: rows are
    left-padded, and the key mask says which positions are real)."""

    def __init__(self, layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int, dtype, device) -> None:
        shape = (rows, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity, self.length = capacity, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (in that order; repeats fan a row out), as DynamicCache does."""
        n, used = len(indices), self.length
        dropping = n <= self.k[0].shape[0] and bool((indices[1:] > indices[:-1]).all())
        for bufs in (self.k, self.v):
            for i, b in enumerate(bufs):
                if dropping:  # compact the kept rows' filled part to the front of the same buffer
                    b[:n, :, :used] = b[indices, :, :used]
                    bufs[i] = b[:n]
                else:
                    bufs[i] = b[indices]


class LeanLlama:
    """`forward(ids, key_mask, pos, cache, keep)` of a LlamaForCausalLM; see the module docstring."""

    @staticmethod
    def supports(model) -> bool:
        """True for a plain LlamaForCausalLM (the layout `forward` reproduces)."""
        if type(model).__name__ != "LlamaForCausalLM":
            return False
        cfg = model.config
        if int(getattr(cfg, "pretraining_tp", 1) or 1) != 1 or getattr(cfg, "sliding_window", None):
            return False
        return all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.model.layers)

    def __init__(self, model, rows_hint: int = 64) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rope_apply = apply_rotary_pos_emb
        inner = model.model
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self.lm_head = _linear(model.lm_head.weight, model.lm_head.bias, rows_hint)
        attn0 = inner.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.scaling = attn0.scaling
        self.dtype, self.device = model.lm_head.weight.dtype, model.lm_head.weight.device
        self.layers = []
        for layer in inner.layers[: model.config.num_hidden_layers]:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm,
                _cat_linear([a.q_proj, a.k_proj, a.v_proj], rows_hint),
                _linear(a.o_proj.weight, a.o_proj.bias, rows_hint),
                layer.post_attention_layernorm,
                _cat_linear([m.gate_proj, m.up_proj], rows_hint),
                _linear(m.down_proj.weight, m.down_proj.bias, rows_hint),
                m.act_fn,
            ))

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return KVCache(len(self.layers), rows, self.kv_heads, capacity, self.head_dim, self.dtype, self.device)

    def forward(self, ids: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                keep: int = 0) -> torch.Tensor:
        """Logits of the last `keep` positions (0: all) for `ids` [B, T] appended to `cache`.

        key_mask [B, cache.length + T]: 1 where the key is a real token (0: left padding); pos [B, T]
        the tokens' positions. Query t attends to the real keys up to its own position, and always to
        itself (a padding query then sees only itself instead of nothing: no NaN in the cache).
        """
        B, T = ids.shape
        past, end = cache.length, cache.length + T
        if end > cache.capacity:
            raise RuntimeError(f"KV cache holds {cache.capacity} positions, {end} needed")
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        nq, nkv = h * d, kvh * d
        key_ok = key_mask[:, :end].bool()
        if T == 1:
            bias = torch.zeros((B, 1, 1, end), dtype=self.dtype, device=self.device)
            bias.masked_fill_(~key_ok[:, None, None, :], float("-inf"))
        else:
            q_at = torch.arange(past, end, device=self.device)[:, None]
            k_at = torch.arange(end, device=self.device)[None, :]
            allowed = (key_ok[:, None, :] & (k_at <= q_at)[None]) | (k_at == q_at)[None]
            allowed = allowed[:, None]  # [B, 1, T, end]
        x = self.embed(ids)
        cos, sin = self.rotary(x, position_ids=pos)
        for i, (norm1, qkv, o_proj, norm2, gate_up, down, act) in enumerate(self.layers):
            y = qkv(norm1(x))
            q = y[..., :nq].view(B, T, h, d).transpose(1, 2)
            k = y[..., nq : nq + nkv].view(B, T, kvh, d).transpose(1, 2)
            v = y[..., nq + nkv :].view(B, T, kvh, d).transpose(1, 2)
            q, k = self._rope_apply(q, k, cos, sin)
            kc, vc = cache.k[i], cache.v[i]
            kc[:, :, past:end] = k
            vc[:, :, past:end] = v
            keys, values = kc[:, :, :end], vc[:, :, :end]
            if T == 1:
                # the query heads that share a KV head, stacked: [B, kvh, h/kvh, d] against [B, kvh, end, d]
                qs = q.reshape(B, kvh, h // kvh, d)
                scores = torch.matmul(qs, keys.transpose(-1, -2)).mul_(self.scaling).add_(bias)
                att = torch.matmul(torch.softmax(scores, dim=-1), values).reshape(B, 1, nq)
            else:
                att = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=self.scaling,
                                                     enable_gqa=True)
                att = att.transpose(1, 2).reshape(B, T, nq)
            x = x + o_proj(att)
            g, u = gate_up(norm2(x)).chunk(2, dim=-1)
            x = x + down(act(g) * u)
        cache.length = end
        if keep:
            x = x[:, -keep:]
        return self.lm_head(self.norm(x))

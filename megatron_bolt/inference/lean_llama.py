"""A lean forward pass for transformers' LlamaForCausalLM, used by the local engine.

It computes what `LlamaForCausalLM.forward` computes (transformers' modeling_llama: embedding,
per layer RMSNorm -> attention with RoPE -> residual -> RMSNorm -> gated MLP -> residual, final norm,
lm_head) from the model's own modules and weights, with less work per step:
- q/k/v and gate/up are one matmul each (weights concatenated once); on CPU every projection uses a
  oneDNN linear with its weight reordered once (`torch.ops.mkldnn._reorder_linear_weight`, what
  torch inductor does for CPU linears; vLLM's CPU build runs its fp32 linears through oneDNN too,
  `dispatch_cpu_unquantized_gemm` in vllm/model_executor/layers/utils.py): for 32 decode rows on
  one thread of this project's AMD EPYC VM, 1.2-1.9x faster than MKL's sgemm (F.linear) for the
  layers' shapes, 2.2x for an 8000-row lm_head;
- the KV cache is preallocated and keeps the prompt part once per distinct prompt (`KVCache`):
  decode attention reads a prompt's keys once for all of its samples, with the query heads that
  share a KV head stacked into one matmul (no `repeat_kv` copy, no 4-D float mask; while every
  prompt has as many live rows the stacking is a reshape, afterwards a gather); multi-token passes
  use SDPA with `enable_gqa`;
- padding costs no projection or MLP work: the rows' real tokens are packed ([N, hidden]) for the
  per-token layers and only RoPE and attention see the padded [B, T] layout (vLLM's batches are
  packed by construction; left-padded prompts of different lengths would otherwise pay for their
  padding in every GEMM);
- the additive mask is built from the 2-D key mask once per call, not through transformers' mask
  machinery, and multi-token attention runs a block of 64 queries at a time over only the keys up
  to the block's end (most of the causally empty upper triangle is skipped: measured, torch's CPU
  flash kernel is no faster with is_causal than with a full mask at a few hundred keys), and the
  MLP 512 token rows at a time (its widest activations stay in cache);
- fewer operations per layer, which is what a decode step of a small model pays for: RMSNorm is
  one `F.rms_norm` call (the formula of LlamaRMSNorm), RoPE is applied to q and k together in
  three kernels (`_rope`), cos/sin come from a table the model's own rotary module computes once per
  cache instead of at every step, and residual adds and the gated MLP work in place.
The numbers agree with transformers' forward to float32 rounding (tests/test_engines.py checks log-
probs to 1e-5), not bit for bit: kernels and summation order differ.

Only plain Llama layers are taken (`LeanLlama.supports`); anything else (Mistral sliding windows,
Qwen2 biases, ponder exports) runs through transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# RoPE variants whose frequencies depend on the sequence length (transformers' dynamic_rope_update):
# their cos/sin are computed per call, as transformers does, not from a table.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin` in three kernels: rotate_half(x) is
    roll(x, d/2) with the first half negated, and that sign is folded into `sin_signed`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


# queries per SDPA call in multi-token passes (see _causal_attention)
_QUERY_BLOCK = 64
# token rows per MLP call in multi-token passes
_MLP_ROWS = 512


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, past: int,
                      scale: float) -> torch.Tensor:
    """SDPA of queries at positions past.. over causally masked keys, a block of queries at a time,
    each block over only the keys up to its last position, so most of the masked-out upper triangle
    is not computed (torch's CPU flash kernel does not skip it here: with is_causal it was no faster
    than with a full mask for 193 tokens, and an explicit mask rules is_causal out anyway)."""
    T = q.shape[2]
    if T <= _QUERY_BLOCK:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    parts = []
    for a in range(0, T, _QUERY_BLOCK):
        b, end = min(a + _QUERY_BLOCK, T), past + min(a + _QUERY_BLOCK, T)
        parts.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :end], v[:, :, :end],
                                                    attn_mask=mask[:, :, a:b, :end], scale=scale, enable_gqa=True))
    return torch.cat(parts, dim=2)


def _cpu_packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int):
    """A linear over `weight` reordered for oneDNN, or None where that is not available/exact."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or op is None
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        # a private generator: building an engine must not move the global RNG
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        got = op(probe, packed, bias, "none", [], "")
        want = F.linear(probe, weight, bias)
    except RuntimeError:
        return None
    if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-4):
        return None
    return lambda x: op(x, packed, bias, "none", [], "")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int):
    """x -> x @ weight.T + bias, by the fastest exact kernel for weight's device; and whether that
    kernel holds its own (reordered) copy of the weight."""
    weight = weight.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    fast = _cpu_packed_linear(weight, bias, rows_hint)
    return (fast, True) if fast else ((lambda x: F.linear(x, weight, bias)), False)


def _cat_linear(mods, rows_hint: int):
    """One linear for several modules on the same input (q/k/v, gate/up), outputs side by side."""
    weight = torch.cat([m.weight.detach() for m in mods], dim=0)
    bias = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods], dim=0)
    fn, own_copy = _linear(weight, bias, rows_hint)
    if not own_copy:  # the modules' weights become views of the fused one: no second copy on a GPU
        at = 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight.data = weight[at : at + n]
            if bias is not None:
                m.bias.data = bias[at : at + n]
            at += n
    return fn


def _rms_norm(module):
    """transformers' LlamaRMSNorm (weight * x / sqrt(mean(x^2) + eps), in float32) as one call."""
    weight, eps = module.weight.detach(), module.variance_epsilon

    def norm(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, eps)
        return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)

    return norm


class KVCache:
    """Keys and values of all layers, with the prompt part stored once per distinct prompt.

    The first forward (the left-padded prompts, `length` 0 -> width W) fills `prefix`: per layer a
    [prompts, kv_heads, W, head_dim] buffer. Later tokens go to `suffix`, one row per sequence, in a
    [rows, kv_heads, capacity - W, head_dim] buffer. `group[b]` is the prompt row that sequence b
    continues, so fanning a prompt out to its n samples (`batch_select_indices` with repeats) copies
    no keys, and decode attention reads each prompt's keys once for all its samples (cascade
    attention, as FlashInfer and vLLM's GPU backends do for shared prefixes).
    """

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int, dtype, device) -> None:
        self.layers, self.kv_heads, self.head_dim, self.dtype, self.device = layers, kv_heads, head_dim, dtype, device
        self.capacity, self.length, self.width = capacity, 0, 0
        self.prefix_k: list[torch.Tensor] = []
        self.prefix_v: list[torch.Tensor] = []
        self.suffix_k: list[torch.Tensor] = []
        self.suffix_v: list[torch.Tensor] = []
        self.group = torch.zeros(0, dtype=torch.long)

    def _slots(self) -> None:
        """Each row's place (its prompt, its rank among that prompt's rows) in the grouped layout."""
        groups = self.group.tolist()
        seen: dict[int, int] = {}
        rank = []
        for g in groups:
            rank.append(seen.get(g, 0))
            seen[g] = rank[-1] + 1
        self.rank = torch.tensor(rank, dtype=torch.long, device=self.device)
        self.per_group = max(seen.values(), default=1)
        # rows grouped by prompt, in prompt order, as many per prompt (as the fan-out leaves them,
        # until rows end unevenly): the grouped layout is then a view of the rows' layout
        self.uniform = groups == [g for g in range(len(seen)) for _ in range(self.per_group)]
        self._grouped: tuple[torch.Tensor, torch.Tensor] | None = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (in that order; repeats fan a row out), as DynamicCache does."""
        indices = indices.to(self.group.device)
        group = self.group[indices]
        used = torch.unique(group)
        if len(used) < len(self.prefix_k[0]):
            # every sample of some prompt has ended: drop that prompt's keys, renumber the rest
            self.prefix_k = [b[used] for b in self.prefix_k]
            self.prefix_v = [b[used] for b in self.prefix_v]
            group = torch.searchsorted(used, group)
        self.group = group
        if self.suffix_k:
            n, used_len = len(indices), self.length - self.width
            dropping = n <= self.suffix_k[0].shape[0] and bool((indices[1:] > indices[:-1]).all())
            for bufs in (self.suffix_k, self.suffix_v):
                for i, b in enumerate(bufs):
                    if dropping:  # compact the kept rows' filled part to the front of the same buffer
                        b[:n, :, :used_len] = b[indices, :, :used_len]
                        bufs[i] = b[:n]
                    else:
                        bufs[i] = b[indices]
        self._slots()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new positions' keys/values of `layer` ([rows, kv_heads, T, head_dim])."""
        B, _, T, _ = k.shape
        if self.length == 0:
            self.prefix_k.append(k.contiguous())
            self.prefix_v.append(v.contiguous())
            return
        if len(self.suffix_k) <= layer:
            shape = (B, self.kv_heads, self.capacity - self.width, self.head_dim)
            self.suffix_k.append(torch.empty(shape, dtype=self.dtype, device=self.device))
            self.suffix_v.append(torch.empty(shape, dtype=self.dtype, device=self.device))
        at = self.length - self.width
        self.suffix_k[layer][:, :, at : at + T] = k
        self.suffix_v[layer][:, :, at : at + T] = v

    def advance(self, T: int) -> None:
        if self.length == 0:
            self.width = T
            self.group = torch.arange(len(self.prefix_k[0]), device=self.device)
            self._slots()
        self.length += T

    def full(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's keys and values up to `end` as contiguous tensors (prompt part copied per row)."""
        t = end - self.width
        k = torch.cat([self.prefix_k[layer][self.group], self.suffix_k[layer][:, :, :t]], dim=2)
        v = torch.cat([self.prefix_v[layer][self.group], self.suffix_v[layer][:, :, :t]], dim=2)
        return k, v

    def decode_attention(self, layer: int, q: torch.Tensor, bias: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of one new query per row (q [B, kv_heads, heads per kv head, d]) over the row's
        prompt keys (shared by the rows of one prompt) and its own suffix keys; bias [B, 1, 1, end]."""
        B, kvh, r, d = q.shape
        G, W, n = len(self.prefix_k[layer]), self.width, self.per_group
        t = self.length + 1 - W
        sk, sv = self.suffix_k[layer][:, :, :t], self.suffix_v[layer][:, :, :t]
        q = q * scaling
        if self.uniform:  # rows are [G, n] already: the grouped layout by reshapes, no gather
            qg = q.view(G, n, kvh, r, d).transpose(1, 2).reshape(G, kvh, n * r, d)
            sp = torch.matmul(qg, self.prefix_k[layer].transpose(-1, -2))
            sp = sp.view(G, kvh, n, r, W).transpose(1, 2).reshape(B, kvh, r, W)
        else:
            # the queries of one prompt's rows side by side: [G, kvh, n * r, d]; slots of ended rows
            # stay zero (only live rows' slots are written), so the buffers serve every layer until
            # rows change
            if self._grouped is None:
                self._grouped = (q.new_zeros((G, kvh, n, r, d)), q.new_zeros((G, kvh, n, r, W)))
            qg, pg = self._grouped
            qg[self.group, :, self.rank] = q
            sp = torch.matmul(qg.view(G, kvh, n * r, d), self.prefix_k[layer].transpose(-1, -2))
            sp = sp.view(G, kvh, n, r, W)[self.group, :, self.rank]
        ss = torch.matmul(q, sk.transpose(-1, -2))
        # softmax in float32 whatever the model's dtype, as SDPA does
        p = torch.softmax(torch.cat([sp, ss], dim=-1).add_(bias), dim=-1, dtype=torch.float32).to(q.dtype)
        if self.uniform:
            pg = p[..., :W].reshape(G, n, kvh, r, W).transpose(1, 2).reshape(G, kvh, n * r, W)
            out = torch.matmul(pg, self.prefix_v[layer]).view(G, kvh, n, r, d).transpose(1, 2).reshape(B, kvh, r, d)
        else:
            pg[self.group, :, self.rank] = p[..., :W]
            out = torch.matmul(pg.view(G, kvh, n * r, W), self.prefix_v[layer]).view(G, kvh, n, r, d)
            out = out[self.group, :, self.rank]
        return out.add_(torch.matmul(p[..., W:], sv))


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
        inner = model.model
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, _rms_norm(inner.norm)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lm_head = _linear(model.lm_head.weight, model.lm_head.bias, rows_hint)[0]
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
                _rms_norm(layer.input_layernorm),
                _cat_linear([a.q_proj, a.k_proj, a.v_proj], rows_hint),
                _linear(a.o_proj.weight, a.o_proj.bias, rows_hint)[0],
                _rms_norm(layer.post_attention_layernorm),
                _cat_linear([m.gate_proj, m.up_proj], rows_hint),
                _linear(m.down_proj.weight, m.down_proj.bias, rows_hint)[0],
                m.act_fn,
            ))

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        """An empty cache for up to `capacity` positions (rows are set by the first forward)."""
        if self.rotary.rope_type not in _LENGTH_DEPENDENT_ROPE and (
                self._rope_table is None or self._rope_table[0].shape[1] < capacity):
            self._rope_table = self._cos_sin(torch.arange(capacity, device=self.device)[None])
        return KVCache(len(self.layers), self.kv_heads, capacity, self.head_dim, self.dtype, self.device)

    def _cos_sin(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the sign-folded sin of `_rope` at positions pos [B, T], as [B, T, 1, head_dim]
        (broadcast over heads); the model's rotary module computes them, elementwise in position."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, position_ids=pos)
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos[:, :, None], sin[:, :, None]

    def forward(self, ids: torch.Tensor, key_mask: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                keep: int = 0, head: bool = True) -> torch.Tensor:
        """Logits of the last `keep` positions (0: all) for `ids` [B, T] appended to `cache`; with
        head=False the final-normed hidden states instead (`lm_head` makes them logits).

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
        if T == 1 and past:
            bias = torch.zeros((B, 1, 1, end), dtype=self.dtype, device=self.device)
            bias.masked_fill_(~key_ok[:, None, None, :], float("-inf"))
        else:
            q_at = torch.arange(past, end, device=self.device)[:, None]
            k_at = torch.arange(end, device=self.device)[None, :]
            allowed = (key_ok[:, None, :] & (k_at <= q_at)[None]) | (k_at == q_at)[None]
            # additive, once per call: SDPA would turn a boolean mask into this in every layer
            allowed = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~allowed, float("-inf"))[:, None]  # [B, 1, T, end]
        # Padding (left in prompts, right in scoring continuations) is taken out of the per-token
        # work: embedding, norms, projections and MLP run on the real tokens only (`real`, packed
        # rows of [N, hidden]), and only RoPE and attention see the padded [B, T] layout, where a
        # padding position holds zero q/k/v (masked for every real query, and finite for its own).
        real = None
        if T > 1:
            flat = key_ok[:, past:end].reshape(-1)
            if not bool(flat.all()):
                real = flat.nonzero()[:, 0]
        x = self.embed(ids if real is None else ids.reshape(-1)[real])
        if self._rope_table is not None:  # [1, capacity, 1, d] -> [B, T, 1, d]
            cos, sin = (t[0, pos] for t in self._rope_table)
        else:
            cos, sin = self._cos_sin(pos)
        for i, (norm1, qkv, o_proj, norm2, gate_up, down, act) in enumerate(self.layers):
            y = qkv(norm1(x))
            if real is not None:
                y = y.new_zeros((B * T, y.shape[-1])).index_copy_(0, real, y)
            # q and k rotated together, in the [B, T, heads, d] layout of the projection's output
            qk = _rope(y[..., : nq + nkv].view(B, T, h + kvh, d), cos, sin)
            q = qk[:, :, :h].transpose(1, 2)
            k = qk[:, :, h:].transpose(1, 2)
            v = y[..., nq + nkv :].view(B, T, kvh, d).transpose(1, 2)
            cache.write(i, k, v)
            if past == 0:
                keys, values = cache.prefix_k[i], cache.prefix_v[i]
            elif T == 1:
                att = cache.decode_attention(i, q.reshape(B, kvh, h // kvh, d), bias, self.scaling).reshape(B, 1, nq)
            else:
                keys, values = cache.full(i, end)
            if past == 0 or T > 1:
                att = _causal_attention(q, keys, values, allowed, past, self.scaling)
                att = att.transpose(1, 2).reshape(B, T, nq)
            if real is not None:
                att = att.reshape(B * T, nq).index_select(0, real)
            x = x + o_proj(att)  # a new tensor: the embedding's output must not be written to
            # the MLP a slice of rows at a time: its [rows, 2 x intermediate] activations stay in cache
            rows = x.view(-1, x.shape[-1])
            for a in range(0, rows.shape[0], _MLP_ROWS):
                part = rows[a : a + _MLP_ROWS]
                g, u = gate_up(norm2(part)).chunk(2, dim=-1)
                part.add_(down(act(g).mul_(u)))
        if real is not None:  # back to [B, T, hidden]; padding positions hold zeros
            x = x.new_zeros((B * T, x.shape[-1])).index_copy_(0, real, x).view(B, T, -1)
        cache.advance(T)
        if keep:
            x = x[:, -keep:]
        x = self.norm(x)
        return self.lm_head(x) if head else x

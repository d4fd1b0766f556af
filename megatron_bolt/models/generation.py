"""Generation for the project's Megatron-Core models, gpt and ponder: sequential KV-cached decoding
(`bolt generate`, and the exact reference the ponder model's Jacobi passes approximate).

The Megatron inference engine is not used: each transformer layer is run piecewise (its norms,
`get_query_key_value_tensors`, RoPE, attention over a growing per-layer cache, `linear_proj`, MLP),
which works for the local and the Transformer Engine layer specs alike and under TP (the row-
parallel projections do their own all-reduce).

Ponder decoding appends K+1 positions per token, one at a time, all with the token's position id:
the scaled token embedding, then K latents, each the post-final-norm output of the previous slot.
The next-token logits are read at the last latent. Prefill runs the Jacobi procedure over the
prompt (`PonderGPTModel.jacobi_latents`: the warm-up and J Jacobi passes), and its final pass is the
cached pass over the interleaved prompt, so the prefill logits are those of the model's forward.
A vanilla GPTModel is the K = 0 case. Embedding, RoPE and output layer are the model's own
(`PonderGPTModel.embed`, `gpt.rotary_for`, `gpt.output_logits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_bolt.models.gpt import output_logits, rotary_for


class KVCache:
    """Per-layer keys/values [s, b, groups, d] after RoPE, grown by concatenation."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=0)
            v = torch.cat([self.values[layer], v], dim=0)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[0]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """q [s, b, n, d] attends causally to k, v [past + s, b, g, d]; returns [s, b, n*d]."""
    s, b, n, d = q.shape
    rep = n // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, n, s, d]
    mask = None
    if s > 1:
        total = kb.shape[2]
        mask = torch.ones(s, total, dtype=torch.bool, device=q.device).tril(diagonal=past)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    return out.permute(2, 0, 1, 3).reshape(s, b, n * d)


def cached_decoder(model, hidden: torch.Tensor, rotary: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the decoder over new positions `hidden` [s, b, h] after the cached ones; post-final-norm."""
    past = cache.length
    for i, layer in enumerate(model.decoder.layers):
        attn = layer.self_attention
        normed = layer.input_layernorm(hidden)
        q, k, v = attn.get_query_key_value_tensors(normed)[:3]
        q = apply_rotary_pos_emb(q, rotary, config=model.config)
        k = apply_rotary_pos_emb(k, rotary, config=model.config)
        k, v = cache.append(i, k, v)
        out, bias = attn.linear_proj(_attention(q, k, v, past))
        hidden = hidden + (out if bias is None else out + bias)
        mlp_out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
        hidden = hidden + (mlp_out if bias is None else mlp_out + bias)
    return model.decoder.final_layernorm(hidden)


def _full_logits(model, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[b, vocab] logits of the last position of hidden [s, b, h], gathered over TP."""
    logits = gather_from_tensor_model_parallel_region(output_logits(model, hidden[-1:]))
    return logits[0, :, :vocab_size].float()


def _latents(model) -> int:
    return getattr(model, "latents", 0)


def _embed(model, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's input embeddings (scaled for ponder), [T, b, h]."""
    if _latents(model):
        return model.embed(tokens, positions)
    return model.embedding(input_ids=tokens, position_ids=positions)




@torch.no_grad()
def step_token(model, token: torch.Tensor, position: int, cache: KVCache, vocab_size: int) -> torch.Tensor:
    """Append one token (and its K latents, one position at a time); next-token logits [b, vocab]."""
    pos = torch.full((1,), position, dtype=torch.long, device=token.device)
    rotary = rotary_for(model, pos)
    hidden = cached_decoder(model, _embed(model, token.view(-1, 1), pos.view(1, 1)), rotary, cache)
    for _ in range(_latents(model)):
        hidden = cached_decoder(model, hidden, rotary, cache)  # the latent is fed back unprojected
    return _full_logits(model, hidden, vocab_size)


@torch.no_grad()
def sequential_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token-by-token logits [b, T, vocab]: the exact computation Jacobi training approximates."""
    cache = KVCache(len(model.decoder.layers))
    return torch.stack([step_token(model, tokens[:, t], t, cache, vocab_size) for t in range(tokens.shape[1])], 1)


@torch.no_grad()
def prefill(model, tokens: torch.Tensor, vocab_size: int, jacobi_iters: int | None = None) -> tuple[KVCache, torch.Tensor]:
    """Cache for the prompt [b, T] and the next-token logits [b, vocab]; Jacobi latents for ponder."""
    T = tokens.shape[1]
    positions = torch.arange(T, device=tokens.device)
    cache = KVCache(len(model.decoder.layers))
    emb = _embed(model, tokens, positions.unsqueeze(0))
    K = _latents(model)
    if K == 0:
        hidden = cached_decoder(model, emb, rotary_for(model, positions), cache)
        return cache, _full_logits(model, hidden, vocab_size)
    iters = model.eval_jacobi if jacobi_iters is None else jacobi_iters
    latents = model.jacobi_latents(emb, positions, iters)  # warm-up + J passes; the cached pass is the final one
    hidden = cached_decoder(model, model.interleave(emb, latents), model.slot_rotary(positions, K + 1), cache)
    return cache, _full_logits(model, hidden, vocab_size)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, vocab_size: int, temperature: float = 0.0,
             seed: int = 0, eos_id: int | None = None, jacobi_iters: int | None = None) -> list[int]:
    """Greedy (temperature 0) or sampled continuation of one prompt. Collective under TP: every rank
    draws from the same seeded generator, so all ranks pick the same tokens."""
    dev = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=dev)
    cache, logits = prefill(model, tokens, vocab_size, jacobi_iters)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[int] = []
    for i in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits[0].cpu() / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        else:
            nxt = int(logits[0].argmax())
        out.append(nxt)
        if nxt == eos_id or i == max_new_tokens - 1:
            break
        logits = step_token(model, torch.tensor([nxt], device=dev), len(prompt) + i, cache, vocab_size)
    return out

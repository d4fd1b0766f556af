"""Continuous latent thoughts (PonderLM-2, method.md section 2) on Megatron-Core.

A `GPTModel` subclass, so parameter names, init and checkpoints are exactly those of the vanilla
model; only `forward` differs. For T tokens and K latents per token the decoder sees the interleaved
sequence `e_1 z_1^1..z_1^K e_2 z_2^1..` of length (K+1)T, where e_t is the token embedding scaled by
`embed_scale` and z_t^k is the post-final-norm hidden state of the slot before it, fed back
unprojected. A latent shares its token's position id. The loss (or logits) of token t is read at its
last latent slot.

Training uses Jacobi iterations: a plain pass over the T tokens gives the initial latents, then J
passes over the interleaved sequence each replace every latent with the output of the slot before
it, and a final pass gives the logits. Gradients flow through all passes. After J >= K*T iterations
the result equals the sequential computation (`ponder_generate`). J is drawn from
`model.jacobi_iters` in training (a hash of the seed and the micro-batch tokens, so every TP rank
draws the same J, a resumed run redraws what it drew before, and DP ranks agree with DP = 1) and is
`model.eval_jacobi_iters` in eval mode.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core.models.gpt import GPTModel

from megatron_bolt.config import ModelConfig, ParallelConfig
from megatron_bolt.errors import UserError
from megatron_bolt.models.gpt import layer_spec, transformer_config


class PonderGPTModel(GPTModel):
    """GPTModel whose forward runs the interleaved latent-thought sequence (PP = 1 only)."""

    def __init__(self, *args, ponder: ModelConfig, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.latents = ponder.latents_per_token
        self.jacobi_choices = list(ponder.jacobi_iters)
        self.eval_jacobi = ponder.eval_jacobi_iters
        self.embed_scale = ponder.embed_scale or math.sqrt(2.5 * ponder.hidden_size)
        self.seed = seed
        self.jacobi_override: int | None = None  # tests / benchmarks force a J

    # -- pieces shared with ponder_generate -------------------------------------------------------
    def rotary_for(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE frequencies [n, 1, 1, d] for explicit position ids [n] (not 0..n-1)."""
        table = self.rotary_pos_emb(int(positions.max().item()) + 1)
        return table[positions.long()]

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Scaled token embeddings, [T, b, h] (Megatron's sequence-first layout)."""
        return self.embedding(input_ids=input_ids, position_ids=position_ids) * self.embed_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        out, _ = self.output_layer(hidden, weight=weight)
        return out

    def num_jacobi(self, input_ids: torch.Tensor) -> int:
        if self.jacobi_override is not None:
            return self.jacobi_override
        if not self.training:
            return self.eval_jacobi
        if len(self.jacobi_choices) == 1:
            return self.jacobi_choices[0]
        # Same draw on every rank that sees these tokens (TP peers), independent of process history.
        digest = hashlib.sha256(str(self.seed).encode() + input_ids.detach().cpu().numpy().tobytes()).digest()
        return self.jacobi_choices[int.from_bytes(digest[:8], "little") % len(self.jacobi_choices)]

    def interleave(self, emb: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """emb [T, b, h], latents [T, K, b, h] -> [(K+1)T, b, h]."""
        T, b, h = emb.shape
        return torch.cat([emb.unsqueeze(1), latents], dim=1).reshape(T * (self.latents + 1), b, h)

    def jacobi_hidden(self, emb: torch.Tensor, positions: torch.Tensor, iters: int) -> torch.Tensor:
        """Final-pass hidden states of the interleaved sequence, [(K+1)T, b, h]."""
        T, b, h = emb.shape
        K = self.latents
        slot_positions = positions.repeat_interleave(K + 1)
        rotary_tokens = self.rotary_for(positions)
        rotary_slots = self.rotary_for(slot_positions)
        first = self.decoder(hidden_states=emb, attention_mask=None, rotary_pos_emb=rotary_tokens)
        latents = first.unsqueeze(1).expand(T, K, b, h)
        for _ in range(iters):
            out = self.decoder(hidden_states=self.interleave(emb, latents), attention_mask=None,
                               rotary_pos_emb=rotary_slots)
            # latent k of token t is the output of the slot before it: slots 0..K-1 of token t
            latents = out.view(T, K + 1, b, h)[:, :K]
        return self.decoder(hidden_states=self.interleave(emb, latents), attention_mask=None,
                            rotary_pos_emb=rotary_slots)

    # -- the GPTModel interface used by the training loop and `bolt score` ------------------------
    def forward(self, input_ids, position_ids, attention_mask, labels=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        positions = position_ids[0]
        if position_ids.shape[0] > 1 and not torch.equal(position_ids, positions.expand_as(position_ids)):
            raise UserError("ponder models need the same position ids in every row of a batch")
        emb = self.embed(input_ids, position_ids)
        hidden = self.jacobi_hidden(emb, positions, self.num_jacobi(input_ids))
        T = input_ids.shape[1]
        last = hidden.view(T, self.latents + 1, *hidden.shape[1:])[:, -1]  # [T, b, h]
        logits = self.logits(last)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)


def build_ponder(
    model: ModelConfig,
    parallel: ParallelConfig,
    pre_process: bool = True,
    post_process: bool = True,
    bf16: bool = False,
    seed: int = 0,
) -> PonderGPTModel:
    """The whole ponder model (pipeline parallelism is not supported: Jacobi needs every layer per pass)."""
    if parallel.pp > 1 or not (pre_process and post_process):
        raise UserError(
            f"model.type=ponder does not support pipeline parallelism (parallel.pp={parallel.pp}); "
            "use parallel.tp and data parallelism"
        )
    if parallel.sequence_parallel and parallel.tp > 1:
        raise UserError("model.type=ponder does not support parallel.sequence_parallel")
    return PonderGPTModel(
        config=transformer_config(model, parallel, bf16),
        transformer_layer_spec=layer_spec(model),
        vocab_size=model.padded_vocab_size(parallel.tp),
        max_sequence_length=model.seq_len,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_base),
        parallel_output=True,
        ponder=model,
        seed=seed,
    )

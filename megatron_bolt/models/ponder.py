"""Continuous latent thoughts (PonderLM-2, method.md section 2) on Megatron-Core.

A `GPTModel` subclass, so parameter names, init and checkpoints are exactly those of the vanilla
model; only `forward` differs. For T tokens and K latents per token the decoder sees the interleaved
sequence `e_1 z_1^1..z_1^K e_2 z_2^1..` of length (K+1)T, where e_t is the token embedding scaled by
`embed_scale` and z_t^k is the post-final-norm hidden state of the slot before it, fed back
unprojected. A latent shares its token's position id. The loss (or logits) of token t is read at its
last latent slot.

Training uses Jacobi iterations. The starting latents are warmed up as the PonderLM-2 reference
does: K passes over growing sequences (the plain T tokens; then tokens with 1 latent each; ...;
tokens with K-1 latents), each pass's slot outputs becoming the next pass's latents, so latent k
starts from a k-step computation rather than a copy of the plain pass. Then J passes over the full
interleaved sequence each replace every latent with the output of the slot before it, and a final
pass gives the logits: K + J + 1 passes. Gradients flow through all passes. After J >= K*T
iterations the result equals the sequential computation (`models.generation`). J is drawn from
`ponder.jacobi_iters` in training (a hash of the seed and the micro-batch tokens, so every TP rank
draws the same J, a resumed run redraws what it drew before, and DP ranks agree with DP = 1) and is
`ponder.eval_jacobi_iters` in eval mode.

At PP > 1 each pass traverses the pipeline stages point to point (`ponder_pipeline`, which also
holds the training schedule for that case); TP and DP work as for the vanilla model.
"""

from __future__ import annotations

import hashlib

import torch
from megatron.core.models.gpt import GPTModel

from megatron_bolt.config import ModelConfig, ParallelConfig, PonderConfig
from megatron_bolt.errors import UserError
from megatron_bolt.models.gpt import gpt_model_kwargs, output_logits, rotary_for


class PonderGPTModel(GPTModel):
    """GPTModel whose forward runs the interleaved latent-thought sequence.

    With pipeline parallelism each stage's forward runs its layers in every pass, passing hidden
    states on point to point (`ponder_pipeline`); the last stage returns the losses / logits, the
    others a scalar link tensor that `ponder_pipeline.forward_backward` runs their backward from.
    """

    def __init__(self, *args, ponder: PonderConfig, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.latents = ponder.latents_per_token
        self.jacobi_choices = list(ponder.jacobi_iters)
        self.eval_jacobi = ponder.eval_jacobi_iters
        self.embed_scale = ponder.scale(self.config.hidden_size)
        self.seed = seed
        self.jacobi_override: int | None = None  # tests / benchmarks force a J

    # -- pieces shared with generation and ponder_pipeline ---------------------------------------
    def rotary_for(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE frequencies [n, 1, 1, d] for explicit position ids [n] (not 0..n-1)."""
        return rotary_for(self, positions)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Scaled token embeddings, [T, b, h] (Megatron's sequence-first layout)."""
        return self.embedding(input_ids=input_ids, position_ids=position_ids) * self.embed_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_logits(self, hidden)

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
        """emb [T, b, h], latents [T, k, b, h] (any k <= K) -> [(k+1)T, b, h]."""
        T, b, h = emb.shape
        return torch.cat([emb.unsqueeze(1), latents], dim=1).reshape(T * (latents.shape[1] + 1), b, h)

    def next_latents(self, out: torch.Tensor, tokens: int) -> torch.Tensor:
        """The latents [T, k, b, h] fed to the next pass, from a pass's post-final-norm output over
        s slots per token: latent j of token t is the output of its slot j (the slot before it).

        While s <= K (warm-up) every slot's output is kept, so the next pass has one slot more; with
        all K+1 slots the last one's output (the next token's logits) is dropped.
        """
        b, h = out.shape[1:]
        slots = out.shape[0] // tokens
        return out.view(tokens, slots, b, h)[:, : self.latents]

    def pass_slots(self, iters: int) -> list[int]:
        """Slots per token of each pass: K warm-up passes over growing sequences (1..K slots, as
        PonderLM-2's `LlamaForCausalLM.forward` builds its stages), then `iters` Jacobi passes and
        the final pass over all K+1 slots."""
        return list(range(1, self.latents + 1)) + [self.latents + 1] * (iters + 1)

    def slot_rotary(self, positions: torch.Tensor, slots: int) -> torch.Tensor:
        """RoPE of a pass with `slots` slots per token (a latent shares its token's position)."""
        return self.rotary_for(positions.repeat_interleave(slots))

    def jacobi_latents(self, emb: torch.Tensor, positions: torch.Tensor, iters: int) -> torch.Tensor:
        """The latents [T, K, b, h] after the warm-up and `iters` Jacobi passes (whole model, PP = 1):
        what the final pass (or a generation prefill) runs on."""
        T = emb.shape[0]
        latents = emb.new_zeros(T, 0, *emb.shape[1:])
        for slots in self.pass_slots(iters)[:-1]:
            out = self.decoder(hidden_states=self.interleave(emb, latents), attention_mask=None,
                               rotary_pos_emb=self.slot_rotary(positions, slots))
            latents = self.next_latents(out, T)
        return latents

    def jacobi_hidden(self, emb: torch.Tensor, positions: torch.Tensor, iters: int) -> torch.Tensor:
        """Final-pass hidden states of the interleaved sequence, [(K+1)T, b, h] (whole model, PP = 1);
        `ponder_pipeline` runs the same passes across pipeline stages."""
        latents = self.jacobi_latents(emb, positions, iters)
        return self.decoder(hidden_states=self.interleave(emb, latents), attention_mask=None,
                            rotary_pos_emb=self.slot_rotary(positions, self.latents + 1))

    # -- the GPTModel interface used by the training loop and `bolt score` ------------------------
    def forward(self, input_ids, position_ids, attention_mask, labels=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        positions = position_ids[0]
        if position_ids.shape[0] > 1 and not torch.equal(position_ids, positions.expand_as(position_ids)):
            raise UserError("ponder models need the same position ids in every row of a batch")
        iters = self.num_jacobi(input_ids)
        emb = self.embed(input_ids, position_ids) if self.pre_process else None
        if self.pre_process and self.post_process:
            hidden = self.jacobi_hidden(emb, positions, iters)
        else:
            from megatron_bolt.models.ponder_pipeline import pipelined_jacobi_hidden

            hidden, link = pipelined_jacobi_hidden(self, emb, positions, input_ids.shape[0], iters)
            if not self.post_process:
                return link  # what `ponder_pipeline.forward_backward` runs this stage's backward from
        T = input_ids.shape[1]
        last = hidden.view(T, self.latents + 1, *hidden.shape[1:])[:, -1]  # [T, b, h]
        logits = self.logits(last)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)


def build_ponder(
    model: ModelConfig,
    parallel: ParallelConfig,
    ponder: PonderConfig,
    pre_process: bool = True,
    post_process: bool = True,
    bf16: bool = False,
    seed: int = 0,
) -> PonderGPTModel:
    """One pipeline stage of the ponder model (the whole model when pp == 1)."""
    if parallel.sequence_parallel and parallel.tp > 1:
        raise UserError("model.type=ponder does not support parallel.sequence_parallel")
    return PonderGPTModel(**gpt_model_kwargs(model, parallel, pre_process, post_process, bf16), ponder=ponder, seed=seed)

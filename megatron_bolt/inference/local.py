"""The in-process engine: an HF export run with `transformers`, batched over all (prompt, sample) rows.

Sampling puts every (prompt, sample) pair of a call into left-padded rows (attention mask and
position ids make padding invisible), prefills them together and decodes with one shared KV cache;
rows that hit a stop token are dropped from the cache so late steps only pay for live rows. The
cache is allocated once for prompt + max_new_tokens (`PreallocatedLayer`): a decode step writes one
slot per layer instead of copying the whole cache as transformers' DynamicLayer does (torch.cat).
Tokens are drawn by inverse-CDF from the untempered softmax with a counter-based uniform per
(row seed, step), so a row's random numbers do not depend on its batch neighbours (its logits can, in
the last bits: see base.py for what that means for reproducibility). `generate_greedy` runs
the same loop with argmax instead of a draw (evaluation), and can end a row on a condition of its
tokens so far (a stop string in the decoded text) as well as on stop ids.

A LlamaForCausalLM runs through `LeanLlama` (lean_llama.py): the same modules and weights with fused
projections, oneDNN linears on CPU and the prompt's KV cache stored once per distinct prompt; any
other model (a ponder export, Mistral, Qwen2) runs through transformers' forward with
`PreallocatedLayer`. The two agree to float32 rounding (tests/test_engines.py).

Scoring prefills each distinct prompt once (left-padded, last logits only), fans its KV cache out
to the rows that continue it, runs the continuations (right-padded) on top, and turns the outputs
into log-probs a few rows at a time (on the lean path no [rows, positions, vocab] logits exist at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from megatron_bolt.inference.base import Engine, Sample, per_prompt_seeds, sample_seed, step_uniforms
from megatron_bolt.inference.lean_llama import LeanLlama


def _preallocated_layer_class():
    """`PreallocatedLayer`, defined on first use so importing this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values live in one buffer of `capacity` positions.

        `update` writes the new positions into the buffer (DynamicLayer concatenates, copying the
        whole cache at every decode step); `keys`/`values` are views of the filled part. Dropping
        rows compacts the filled part in place; fanning rows out (repeated indices) re-allocates.
        """

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            b, h, _, d = key_states.shape
            self.device = key_states.device
            self._k = key_states.new_empty((b, h, self.capacity, d))
            self._v = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[-1]))
            self.is_initialized = True

        def _views(self) -> None:
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"KV cache holds {self.capacity} positions, {end} needed")
            self._k[:, :, self.length : end] = key_states
            self._v[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if not self.is_initialized:
                return
            n, used = len(indices), self.length
            if n <= self._k.shape[0] and bool((indices[1:] > indices[:-1]).all()):
                # dropping rows: move the kept rows' filled part to the front of the same buffer
                self._k[:n, :, :used] = self._k[indices, :, :used]
                self._v[:n, :, :used] = self._v[indices, :, :used]
                self._k, self._v = self._k[:n], self._v[:n]
            else:
                self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    return PreallocatedLayer


def preallocated_cache(capacity: int):
    """A transformers DynamicCache whose layers are `PreallocatedLayer`s of `capacity` positions."""
    from transformers import DynamicCache

    layer = _preallocated_layer_class()
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: layer(capacity)
    return cache


# log-probs computed per slice of rows in scoring: about 16 MB of float32 at a time
_LOGPROB_CHUNK_ELEMENTS = 1 << 22


@dataclass
class RowResult:
    """Generation result of one row; input_logprobs[j] is the log-prob of prompt token start+1+j."""

    tokens: list[int]
    logprobs: list[float]
    finished: bool
    stop_token: int | None
    input_logprobs: list[float] | None = None


class LocalEngine(Engine):
    """transformers model in this process (fp32 on CPU by default, or one GPU)."""

    def __init__(
        self,
        model_dir: str,
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
        max_batch_rows: int = 64,
        max_logit_elements: int = 1 << 27,
        max_batch_tokens: int = 2048,
        context_length: int | None = None,
        lean: bool = True,
    ) -> None:
        """context_length: truncate E-step sequences to this many tokens (default, and at most, the
        model's max_position_embeddings). lean: run a LlamaForCausalLM through `LeanLlama` (False:
        always through transformers' forward; the two agree to float rounding). max_batch_tokens:
        positions in one scoring forward (a batch of rows is cut before it holds more; one row
        longer than that still runs alone): on CPU a few thousand keep each layer's activations in
        cache and out of freshly mapped pages (measured: 32 rows x 195 tokens scored 1.2x faster
        in batches of 8 rows than in one)."""
        from transformers import AutoModelForCausalLM

        from megatron_bolt.models.hf_ponder import is_ponder_export

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # a ponder export runs the project's own modeling code, written next to its weights
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=is_ponder_export(model_dir)
        ).to(self.device).eval()
        self.model_dir = model_dir
        self.vocab_size = int(self.model.config.vocab_size)
        # cache entries per token: 1, or K+1 for a ponder export (a token and its K latent slots)
        self.cache_slots_per_token = int(getattr(self.model.config, "latents_per_token", 0) or 0) + 1
        self.max_batch_rows = max_batch_rows
        # Bounds the (rows x kept positions x vocab) logits tensor of one scoring forward.
        self.max_logit_elements = max_logit_elements
        self.max_batch_tokens = max_batch_tokens
        pad = getattr(self.model.config, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        limits = [int(n) for n in (getattr(self.model.config, "max_position_embeddings", None), context_length) if n]
        self._context_length = min(limits) if limits else None
        self._lean = LeanLlama(self.model, rows_hint=max_batch_rows) if lean and LeanLlama.supports(self.model) else None

    @property
    def context_length(self) -> int | None:
        """max_position_embeddings, or the smaller context_length asked for (rotary models run past
        max_position_embeddings, but were not trained to)."""
        return self._context_length

    # ----------------------------------------------------------------------------------- interface
    def sample(
        self,
        prompts: list[list[int]],
        n: int,
        max_new_tokens: int,
        stop: list[int],
        seed: int | list[int] = 0,
    ) -> list[list[Sample]]:
        seeds = per_prompt_seeds(seed, len(prompts))
        rows = [p for p in prompts for _ in range(n)]
        row_seeds = [sample_seed(s, j) for s in seeds for j in range(n)]
        results = self.generate_rows(rows, row_seeds, max_new_tokens, stop)
        out: list[list[Sample]] = []
        for i in range(len(prompts)):
            out.append(
                [
                    Sample(r.tokens, r.logprobs, r.finished, r.stop_token)
                    for r in results[i * n : (i + 1) * n]
                ]
            )
        return out

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: the first continuation token has no context")
        # Rows that share a prompt (the K latents of one chunk share `BOS C`) are grouped so the
        # prompt is prefilled once and its KV cache fanned out to the group's continuations; a
        # batch that is full ends where a prompt's rows begin, when it can, so no prompt is
        # prefilled twice.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), tuple(prompts[i]), len(continuations[i])))
        scores = [0.0] * len(prompts)
        batch: list[int] = []
        starts: list[int] = []  # where each prompt's rows begin in `batch`
        keep = 0  # the longest continuation in `batch`
        for i in order:
            new_prompt = not batch or prompts[i] != prompts[batch[-1]]
            # rows are in prompt-length order, so row i's prompt is the widest
            if batch and not self._fits(len(batch) + 1, max(keep, len(continuations[i])),
                                        len(starts) + new_prompt, len(prompts[i])):
                cut = len(batch) if new_prompt or starts[-1] == 0 else starts[-1]
                self._score_batch(prompts, continuations, batch[:cut], scores)
                batch = batch[cut:]  # the rows of row i's prompt, carried over
                starts = [0] if batch else []
                keep = max((len(continuations[j]) for j in batch), default=0)
                if batch and not self._fits(len(batch) + 1, max(keep, len(continuations[i])), 1, len(prompts[i])):
                    self._score_batch(prompts, continuations, batch, scores)
                    batch, starts, keep = [], [], 0
            if not batch or prompts[i] != prompts[batch[-1]]:
                starts.append(len(batch))
            batch.append(i)
            keep = max(keep, len(continuations[i]))
        if batch:
            self._score_batch(prompts, continuations, batch, scores)
        return scores

    def _fits(self, rows: int, keep: int, distinct: int, width: int) -> bool:
        """Whether a scoring batch of `rows` rows, its longest continuation `keep`, `distinct` prompts
        of up to `width` tokens, is within the bounds on rows, positions per pass and logits."""
        tokens = max(rows * keep, distinct * width)
        return (rows <= self.max_batch_rows and tokens <= self.max_batch_tokens
                and rows * keep * self.vocab_size <= self.max_logit_elements)

    # ------------------------------------------------------------------------------------ internals
    def _new_cache(self, rows: int, capacity: int | None):
        """An empty KV cache for `rows` rows of up to `capacity` tokens (None: growing, transformers only)."""
        if self._lean is not None:
            return self._lean.new_cache(rows, capacity)
        if capacity is None:
            from transformers import DynamicCache

            return DynamicCache()
        return preallocated_cache(capacity * self.cache_slots_per_token)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, keep: int = 0) -> torch.Tensor:
        """float logits of the last `keep` positions (0: all) of `ids` appended to `cache`; mask covers
        the cached positions and ids (1: real token)."""
        if self._lean is not None:
            return self._lean.forward(ids, mask, pos, cache, keep).float()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=keep)
        return out.logits.float()

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    @torch.inference_mode()
    def _score_batch(self, prompts, continuations, idx: list[int], scores: list[float]) -> None:
        """Two passes: the distinct prompts (left-padded, last logits only), then every row's
        continuation (right-padded) on top of its prompt's KV cache."""
        idx = [i for i in idx if len(continuations[i])]
        if not idx:
            return
        uniq: dict[tuple[int, ...], int] = {}
        row_prompt = [uniq.setdefault(tuple(prompts[i]), len(uniq)) for i in idx]
        p_ids, p_mask, p_pos = self._left_pad([list(p) for p in uniq])
        c_len = max(len(continuations[i]) for i in idx)
        capacity = None if self._lean is None else p_ids.shape[1] + c_len
        cache = self._new_cache(len(uniq), capacity)
        first = self._forward(p_ids, p_mask, p_pos, cache, keep=1)[:, -1, :]
        fan = torch.tensor(row_prompt, dtype=torch.long, device=self.device)
        cache.batch_select_indices(fan)
        p_mask, first = p_mask[fan], first[fan]
        c_ids = torch.full((len(idx), c_len), self.pad_id, dtype=torch.long)
        c_mask = torch.zeros((len(idx), c_len), dtype=torch.long)
        for b, i in enumerate(idx):
            c = continuations[i]
            c_ids[b, : len(c)] = torch.tensor(c, dtype=torch.long)
            c_mask[b, : len(c)] = 1
        c_ids, c_mask = c_ids.to(self.device), c_mask.to(self.device)
        plen = p_mask.sum(-1, keepdim=True)
        c_pos = plen + torch.arange(c_len, device=self.device)[None, :]
        mask = torch.cat([p_mask, c_mask], dim=1)
        # Continuation token t is predicted by the prompt's last logits (t = 0) or by the
        # continuation logits at t-1; the last continuation position predicts nothing we need.
        picked = torch.zeros((len(idx), c_len), dtype=torch.float32, device=self.device)
        picked[:, 0] = torch.log_softmax(first, dim=-1).gather(-1, c_ids[:, :1])[:, 0]
        if c_len > 1:
            args = (c_ids[:, :-1], mask[:, :-1], c_pos[:, :-1], cache)
            if self._lean is not None:  # hidden states: logits are made a few rows at a time below
                hidden = self._lean.forward(*args, head=False)
                rows_logits = lambda a, b: self._lean.lm_head(hidden[a:b]).float()  # noqa: E731
            else:
                rest = self._forward(*args)
                rows_logits = lambda a, b: rest[a:b]  # noqa: E731
            # log_softmax + gather over a few rows at a time: the [rows, c_len, vocab] log-probs
            # never exist at once (on CPU a whole-batch pass spent most of its time faulting in
            # hundreds of MB of fresh pages; a few MB stay in cache)
            step = max(1, _LOGPROB_CHUNK_ELEMENTS // ((c_len - 1) * self.vocab_size))
            for a in range(0, len(idx), step):
                b = min(a + step, len(idx))
                logp = torch.log_softmax(rows_logits(a, b), dim=-1)
                picked[a:b, 1:] = logp.gather(-1, c_ids[a:b, 1:, None])[:, :, 0]
        sums = (picked * c_mask).sum(-1).tolist()
        for b, i in enumerate(idx):
            scores[i] = float(sums[b])

    def generate_greedy(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | list[int],
        stop: list[int],
        stop_check: Callable[[list[int]], bool] | None = None,
    ) -> list[RowResult]:
        """Greedy (argmax) continuation of each prompt, batched like sampling. A row ends on a stop
        id (kept as its last token, `stop_token` set), when `stop_check(tokens so far)` is true
        (`finished` with `stop_token` None: the caller cuts the text), or at max_new_tokens."""
        return self.generate_rows(prompts, [0] * len(prompts), max_new_tokens, stop, greedy=True, stop_check=stop_check)

    def generate_rows(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        max_new_tokens: int | list[int],
        stop: list[int],
        input_logprob_start: list[int | None] | None = None,
        greedy: bool = False,
        stop_check: Callable[[list[int]], bool] | None = None,
    ) -> list[RowResult]:
        """Generate one continuation per row; the building block of `sample` and of `bolt serve`.

        input_logprob_start[i] = s asks for the log-probs of prompt tokens s+1..L-1 (SGLang's
        logprob_start_len); None skips them. greedy/stop_check: see `generate_greedy`.
        """
        if isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * len(prompts)
        starts = input_logprob_start or [None] * len(prompts)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        # Similar lengths together: less padding. Results do not depend on the grouping.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[RowResult | None] = [None] * len(prompts)
        for k in range(0, len(order), self.max_batch_rows):
            idx = order[k : k + self.max_batch_rows]
            part = self._generate_batch(
                [prompts[i] for i in idx],
                [seeds[i] for i in idx],
                [max_new_tokens[i] for i in idx],
                set(int(t) for t in stop),
                [starts[i] for i in idx],
                greedy,
                stop_check,
            )
            for i, r in zip(idx, part):
                results[i] = r
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts, seeds, max_new, stop: set[int], starts, greedy=False, stop_check=None) -> list[RowResult]:
        B = len(prompts)
        want_input = [s for s in starts if s is not None]
        # Identical prompts (the n samples of one chunk) are prefilled once and their KV cache
        # fanned out, unless prompt log-probs are wanted (the serve path; rows differ there anyway).
        prefill_rows, fan = prompts, None
        if not want_input:
            uniq: dict[tuple[int, ...], int] = {}
            row_u = [uniq.setdefault(tuple(p), len(uniq)) for p in prompts]
            if len(uniq) < B:
                prefill_rows = [list(u) for u in uniq]
                fan = torch.tensor(row_u, dtype=torch.long, device=self.device)
        ids, mask, pos = self._left_pad(prefill_rows)
        width = ids.shape[1]
        keep = 1
        if want_input:
            keep = max(len(p) - s for p, s in zip(prompts, starts) if s is not None)
            keep = max(1, min(keep, width))
        steps = max(max_new) if max_new else 0
        cache = self._new_cache(ids.shape[0], width + max(steps, 1))
        out = self._forward(ids, mask, pos, cache, keep=keep)
        results = [RowResult([], [], False, None) for _ in range(B)]
        if want_input:
            logp_all = torch.log_softmax(out, dim=-1)
            for b, (p, s) in enumerate(zip(prompts, starts)):
                if s is None:
                    continue
                s = max(0, min(int(s), len(p) - 1))
                # token t (t in [s+1, L)) sits at padded position width-L+t, predicted at one before.
                L = len(p)
                n_tok = L - 1 - s
                if n_tok <= 0:
                    results[b].input_logprobs = []
                    continue
                lp = logp_all[b, keep - 1 - n_tok : keep - 1]
                tgt = ids[b, width - n_tok :]
                results[b].input_logprobs = lp.gather(-1, tgt[:, None])[:, 0].tolist()
        logits = out[:, -1, :]
        del out
        if fan is not None:
            cache.batch_select_indices(fan)
            logits, mask, pos = logits[fan], mask[fan], pos[fan]
        active = np.arange(B)
        seeds_np = np.array([s & ((1 << 64) - 1) for s in seeds], dtype=np.uint64)
        max_new_np = np.array(max_new, dtype=np.int64)
        live = max_new_np[active] > 0
        if not live.all():
            active, logits, mask, pos = self._select(cache, active, live, logits, mask, pos)
        last_pos = pos[:, -1]
        # the attention mask grows by one column per step: fill a preallocated buffer instead of concatenating
        full_mask = torch.ones((len(active), width + max(steps, 1)), dtype=mask.dtype, device=mask.device)
        full_mask[:, :width] = mask
        mask = full_mask
        filled = width
        step = 0
        while len(active):
            tok, tok_lp = self._draw(logits, None if greedy else step_uniforms(seeds_np[active], step))
            tok_list, lp_list = tok.tolist(), tok_lp.tolist()
            live = np.ones(len(active), dtype=bool)
            for j, b in enumerate(active):
                r = results[b]
                r.tokens.append(tok_list[j])
                r.logprobs.append(lp_list[j])
                if tok_list[j] in stop:
                    r.finished, r.stop_token = True, tok_list[j]
                    live[j] = False
                elif stop_check is not None and stop_check(r.tokens):
                    r.finished = True
                    live[j] = False
                elif len(r.tokens) >= max_new_np[b]:
                    live[j] = False
            step += 1
            if not live.all():
                sel = torch.from_numpy(np.nonzero(live)[0]).to(self.device)
                tok = tok[sel]
                last_pos = last_pos[sel]
                active, _, mask, _ = self._select(cache, active, live, None, mask, None)
                if not len(active):
                    break
            filled += 1
            last_pos = last_pos + 1
            logits = self._forward(tok[:, None], mask[:, :filled], last_pos[:, None], cache)[:, -1, :]
        return results

    @staticmethod
    def _draw(logits: torch.Tensor, uniforms: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's token (inverse CDF of softmax(logits) at its uniform; argmax where uniforms is
        None) and its log-prob. The CDF is the running sum of exp(logits - max), unnormalised:
        log_softmax, a normalised exp and then the sum would be two more passes over the vocabulary."""
        top = logits.amax(-1, keepdim=True)
        weights = (logits - top).exp_()
        if uniforms is None:
            tok = logits.argmax(-1, keepdim=True)
            total = weights.sum(-1, keepdim=True)
        else:
            cdf = weights.cumsum_(-1)
            total = cdf[:, -1:]
            u = torch.from_numpy(uniforms).to(cdf)[:, None]
            tok = torch.searchsorted(cdf, u * total, right=True).clamp_(max=logits.shape[-1] - 1)
        return tok[:, 0], (logits.gather(-1, tok) - top - total.log())[:, 0]

    def _select(self, cache, active: np.ndarray, live: np.ndarray, logits, mask, pos):
        """Keep only live rows in the cache and the per-row tensors."""
        sel_np = np.nonzero(live)[0]
        sel = torch.from_numpy(sel_np).to(self.device)
        if len(sel_np):
            cache.batch_select_indices(sel)
        return (
            active[sel_np],
            logits[sel] if logits is not None else None,
            mask[sel],
            pos[sel] if pos is not None else None,
        )

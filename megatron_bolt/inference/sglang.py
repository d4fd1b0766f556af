"""Client of SGLang's native `/generate` API (real SGLang servers, `sglang-router`, or `bolt serve`).

- Samples are requested as duplicated prompts, one request per (prompt, sample), each with its own
  `sampling_seed`, rather than SGLang's `n`: the router spreads them over workers and a failed
  request costs one sample, not the whole group.
- Sampling params are pinned to the untempered distribution (temperature 1, top_p 1, top_k -1,
  min_p 0) with `ignore_eos` so that only `stop` ends a sample, exactly as the local engine.
- Scoring sends prompt+continuation with `logprob_start_len = len(prompt) - 1` and sums the last
  len(continuation) entries of `meta_info.input_token_logprobs` (the first entry, for the last
  prompt token, is null in SGLang's protocol).
- One URL (a router or a single server) or a list of server URLs, used round robin. Bounded
  concurrency, per-request timeouts, retries with exponential backoff on connection errors,
  timeouts and 5xx; a server that fails `failure_threshold` times in a row leaves the rotation for
  `cooldown_s` while the others carry on.
"""

from __future__ import annotations

from typing import Any

from megatron_bolt.inference.base import Engine, Sample, per_prompt_seeds, sample_seed
from megatron_bolt.inference.http import EngineError, HTTPPool

__all__ = ["EngineError", "SGLangEngine"]


class SGLangEngine(Engine):
    def __init__(
        self,
        urls: str | list[str],
        concurrency: int = 64,
        timeout_s: float = 600.0,
        retries: int = 8,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        failure_threshold: int = 2,
        cooldown_s: float = 30.0,
    ) -> None:
        self.http = HTTPPool(urls, concurrency, timeout_s, retries, backoff_s, max_backoff_s, failure_threshold,
                             cooldown_s, name="sglang-client")
        self.pool = self.http.pool

    def close(self) -> None:
        self.http.close()

    def _post(self, payload: dict) -> dict:
        return self.http.post("/generate", payload)

    def _map(self, fn, jobs: list) -> list:
        return self.http.map(fn, jobs)

    # ---------------------------------------------------------------------------------- interface
    @staticmethod
    def sampling_params(max_new_tokens: int, stop: list[int], seed: int | None) -> dict[str, Any]:
        sp: dict[str, Any] = {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "max_new_tokens": int(max_new_tokens),
            "stop_token_ids": [int(t) for t in stop],
            "ignore_eos": True,
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
        if seed is not None:
            sp["sampling_seed"] = int(seed) & ((1 << 63) - 1)
        return sp

    def sample(
        self,
        prompts: list[list[int]],
        n: int,
        max_new_tokens: int,
        stop: list[int],
        seed: int | list[int] = 0,
    ) -> list[list[Sample]]:
        seeds = per_prompt_seeds(seed, len(prompts))
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        stop_set = {int(t) for t in stop}

        def one(job: tuple[int, int]) -> Sample:
            i, j = job
            payload = {
                "input_ids": list(prompts[i]),
                "sampling_params": self.sampling_params(max_new_tokens, stop, sample_seed(seeds[i], j)),
                "return_logprob": True,
                "logprob_start_len": len(prompts[i]) - 1,
            }
            return self._parse_sample(self._post(payload), stop_set)

        flat = self._map(one, jobs)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    @staticmethod
    def _parse_sample(body: dict, stop: set[int]) -> Sample:
        meta = body.get("meta_info") or {}
        entries = meta.get("output_token_logprobs")
        if entries is None:
            raise EngineError("response has no meta_info.output_token_logprobs (server ignored return_logprob?)")
        tokens = [int(e[1]) for e in entries]
        logprobs = [float(e[0]) for e in entries]
        out_ids = body.get("output_ids")
        if out_ids is not None and list(out_ids) != tokens:
            raise EngineError("output_ids and output_token_logprobs disagree")
        reason = meta.get("finish_reason") or {}
        finished = reason.get("type") == "stop" and bool(tokens) and tokens[-1] in stop
        return Sample(tokens, logprobs, finished, tokens[-1] if finished else None)

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")

        def one(i: int) -> float:
            p, c = list(prompts[i]), list(continuations[i])
            if not p:
                raise ValueError(f"prompt {i} is empty: the first continuation token has no context")
            if not c:
                return 0.0
            payload = {
                "input_ids": p + c,
                "sampling_params": self.sampling_params(1, [], 0),
                "return_logprob": True,
                "logprob_start_len": len(p) - 1,
            }
            body = self._post(payload)
            entries = (body.get("meta_info") or {}).get("input_token_logprobs")
            if entries is None or len(entries) < len(c):
                raise EngineError(f"input_token_logprobs has {None if entries is None else len(entries)} entries, need {len(c)}")
            tail = entries[-len(c) :]
            if [int(e[1]) for e in tail] != c or any(e[0] is None for e in tail):
                raise EngineError("input_token_logprobs do not line up with the continuation tokens")
            return float(sum(float(e[0]) for e in tail))

        return self._map(one, list(range(len(prompts))))

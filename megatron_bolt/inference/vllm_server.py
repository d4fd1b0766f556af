"""Client of vLLM's OpenAI-compatible `/v1/completions` (`python -m vllm.entrypoints.openai.api_server`).

The request fields follow `CompletionRequest` and the response `CompletionResponseChoice` in
vllm/entrypoints/openai/completion/protocol.py (vLLM 0.32.0):
- prompts are token ids (`prompt: [int]`), one request per (prompt, sample) with its own `seed`
  (as the SGLang client: the router spreads them, a failure costs one sample);
- sampling is pinned to the untempered distribution (temperature 1, top_p 1, top_k 0, min_p 0),
  `ignore_eos` with `stop_token_ids`: vLLM still stops on stop_token_ids under ignore_eos
  (`check_stop`, vllm/v1/core/sched/utils.py) and keeps the stop token in the output;
- `logprobs: 0` with `return_tokens_as_token_ids` gives `logprobs.tokens` as "token_id:N" and
  `logprobs.token_logprobs`, the sampled tokens' log-probs; the server must run with
  `--logprobs-mode raw_logprobs` (its default) for these to be untempered;
  `return_token_ids` adds `token_ids`, checked against them;
- scoring sends prompt+continuation with `prompt_logprobs: 0` and `max_tokens: 1`; entry t of
  `prompt_logprobs` maps prompt token t's id (a string key in JSON) to its log-prob, entry 0 is null.
Transport (router or URL list, retries, cooldown) is `inference.http.HTTPPool`.
"""

from __future__ import annotations

from typing import Any

import requests

from megatron_bolt.inference.base import Engine, Sample, per_prompt_seeds, sample_seed
from megatron_bolt.inference.http import EngineError, HTTPPool, PoolOptions

_INT64_MAX = (1 << 63) - 1


class VLLMServerEngine(Engine):
    def __init__(
        self,
        urls: str | list[str],
        model: str | None = None,
        options: PoolOptions | None = None,
        context_length: int | None = None,
    ) -> None:
        """model: the served model name, only needed when a router fronts several models;
        options: concurrency, timeouts, retries (PoolOptions); context_length: send no sequence
        longer than this (the server's max_model_len still applies)."""
        self.http = HTTPPool(urls, options, name="vllm-client")
        self.model = model
        self._context_cap = context_length
        self._context_length: int | None = None

    @property
    def context_length(self) -> int | None:
        """The smallest `max_model_len` in the servers' `/v1/models` (vLLM's `ModelCard`), or the
        smaller context_length asked for."""
        if self._context_length is None:
            lens = []
            for url in self.http.pool.urls:
                try:
                    r = requests.get(f"{url}/v1/models", timeout=30)
                    lens += [int(m["max_model_len"]) for m in r.json().get("data", []) if m.get("max_model_len")]
                except (requests.RequestException, ValueError, TypeError, KeyError):
                    continue  # a server that is down now; the others tell
            limits = [n for n in (min(lens) if lens else None, self._context_cap) if n]
            if not limits:
                raise EngineError("no vLLM server answered /v1/models with max_model_len (are they up?)")
            self._context_length = min(limits)
        return self._context_length

    def close(self) -> None:
        self.http.close()

    def _request(self, prompt: list[int], max_tokens: int, stop: list[int], **fields: Any) -> dict:
        payload: dict[str, Any] = {
            "prompt": [int(t) for t in prompt],
            "max_tokens": max(1, int(max_tokens)),
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "stop_token_ids": [int(t) for t in stop],
            "ignore_eos": True,
            "skip_special_tokens": False,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            **fields,
        }
        if self.model is not None:
            payload["model"] = self.model
        body = self.http.post("/v1/completions", payload)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not choices:
            raise EngineError(f"/v1/completions: response has no choices: {str(body)[:200]}")
        return choices[0]

    def sample(
        self,
        prompts: list[list[int]],
        n: int,
        max_new_tokens: int,
        stop: list[int],
        seed: int | list[int] = 0,
    ) -> list[list[Sample]]:
        seeds = per_prompt_seeds(seed, len(prompts))
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        stop_set = {int(t) for t in stop}

        def one(job: tuple[int, int]) -> Sample:
            i, j = job
            choice = self._request(prompts[i], max_new_tokens, stop, logprobs=0,
                                   seed=sample_seed(seeds[i], j) & _INT64_MAX)
            return self._parse_sample(choice, stop_set)

        flat = self.http.map(one, [(i, j) for i in range(len(prompts)) for j in range(n)])
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    @staticmethod
    def _parse_sample(choice: dict, stop: set[int]) -> Sample:
        lp = choice.get("logprobs") or {}
        names, values = lp.get("tokens"), lp.get("token_logprobs")
        if names is None or values is None or len(names) != len(values):
            raise EngineError("response has no logprobs.tokens/token_logprobs (server ignored logprobs?)")
        try:
            tokens = [int(str(t).removeprefix("token_id:")) for t in names]
        except ValueError as exc:
            raise EngineError(f"logprobs.tokens are not 'token_id:N' (return_tokens_as_token_ids ignored?): {exc}") from exc
        ids = choice.get("token_ids")
        if ids is not None and list(ids) != tokens:
            raise EngineError("token_ids and logprobs.tokens disagree")
        logprobs = [float(v) for v in values]
        finished = choice.get("finish_reason") == "stop" and bool(tokens) and tokens[-1] in stop
        return Sample(tokens, logprobs, finished, tokens[-1] if finished else None)

    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")

        def one(i: int) -> float:
            p, c = [int(t) for t in prompts[i]], [int(t) for t in continuations[i]]
            if not p:
                raise ValueError(f"prompt {i} is empty: the first continuation token has no context")
            if not c:
                return 0.0
            choice = self._request(p + c, 1, [], prompt_logprobs=0, temperature=0.0)
            entries = choice.get("prompt_logprobs")
            if entries is None or len(entries) != len(p) + len(c):
                raise EngineError(f"prompt_logprobs has {None if entries is None else len(entries)} entries, "
                                  f"need {len(p) + len(c)}")
            total = 0.0
            for e, t in zip(entries[len(p):], c):
                if not e or str(t) not in e:
                    raise EngineError("prompt_logprobs do not line up with the continuation tokens")
                total += float(e[str(t)]["logprob"])
            return total

        return self.http.map(one, list(range(len(prompts))))

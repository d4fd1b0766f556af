"""Client of SGLang's native `/generate` API (real SGLang servers, `sglang-router`, or `bolt serve`).

What SGLang does, and what the client does about it (SGLang 0.5.x source, functions named):
- Stops: `Req._check_token_based_finish` returns before looking at `stop_token_ids` when
  `ignore_eos` is set, so the client never sends `ignore_eos`; it sends `stop_token_ids=stop`.
  SGLang then also stops on the model's EOS ids (config/generation_config `eos_token_id`, the
  tokenizer's EOS). A sample that stops on such an id before `max_new_tokens` is continued: the
  client sends prompt + tokens so far for the remaining budget, with a seed derived from the
  sample's seed and the tokens so far, so only `stop` ends a sample, as in the local engine.
- Seeds: `sampling_seed` reaches the sampler only when the server runs with
  `--enable-deterministic-inference` (`SamplingBatchInfo.from_schedule_batch`); otherwise samples
  are not reproducible (each is still an exact draw, with its own log-probs).
- Input log-probs: `SchedulerLogprobResultProcessor._process_input_token_logprobs` reports every
  id >= vocab_size-1 as 0 (the values are right). The client knows the ids it sent and uses those;
  a reported id must be the sent one or that 0.
- Length: `TokenizerManager._validate_one_request` refuses an input of >= context_len tokens and
  input + max_new_tokens > context_len (HTTP 400); the scheduler refuses inputs of >=
  `max_req_input_len` tokens (`validate_input_length`) and shortens max_new_tokens to
  max_req_len - input - 1 (`init_req_max_new_tokens`). `context_length` is therefore
  `max_req_input_len - 1` from `/server_info`: the E-step truncates to it (every engine), so no
  request is refused or silently shortened.

Protocol:
- Samples are requested as duplicated prompts, one request per (prompt, sample), each with its own
  `sampling_seed`, rather than SGLang's `n`: the router spreads them over workers and a failed
  request costs one sample, not the whole group.
- Sampling params are pinned to the untempered distribution (temperature 1, top_p 1, top_k -1,
  min_p 0), so the returned log-probs are those of the distribution sampled.
- Scoring sends prompt+continuation with `max_new_tokens=0` and `logprob_start_len = len(prompt) - 1`
  and sums the last len(continuation) entries of `meta_info.input_token_logprobs` (the first entry,
  for the last prompt token, is null in SGLang's protocol).
- One URL (a router or a single server) or a list of server URLs, used round robin. Bounded
  concurrency, per-request timeouts, retries with exponential backoff on connection errors,
  timeouts and 5xx; a server that fails `failure_threshold` times in a row leaves the rotation for
  `cooldown_s` while the others carry on.
"""

from __future__ import annotations

import logging
from typing import Any

import requests

from megatron_bolt.inference.base import Engine, Sample, derive_seed, per_prompt_seeds, sample_seed
from megatron_bolt.inference.http import EngineError, HTTPPool, PoolOptions

__all__ = ["EngineError", "PoolOptions", "SGLangEngine"]

log = logging.getLogger(__name__)


class SGLangEngine(Engine):
    def __init__(
        self,
        urls: str | list[str],
        options: PoolOptions | None = None,
        context_length: int | None = None,
    ) -> None:
        """options: concurrency, timeouts, retries (PoolOptions); context_length: send no sequence
        longer than this (the server's own limit still applies)."""
        self.http = HTTPPool(urls, options, name="sglang-client")
        self.pool = self.http.pool
        self.timeout_s = self.http.timeout_s
        self._context_cap = context_length
        self._context_length: int | None = None
        self._context_known = False

    def close(self) -> None:
        self.http.close()

    @property
    def context_length(self) -> int | None:
        """`max_req_input_len - 1` of the first server that answers `/server_info` (or the older
        `/get_server_info`; behind sglang-router, the smallest of its `/workers`), or the smaller
        context_length asked for; None, with a warning, when neither is known."""
        if not self._context_known:
            limits = [c for c in (self._ask_context_length(), self._context_cap) if c]
            self._context_length = min(limits) if limits else None
            self._context_known = True
        return self._context_length

    def _ask_context_length(self) -> int | None:
        for url in self.pool.healthy() or self.pool.urls:
            limit = self._server_limit(url)
            if limit is None:  # sglang-router: its /get_server_info has no model figures; ask its workers
                limits = [c for w in self._router_workers(url) if (c := self._server_limit(w)) is not None]
                limit = min(limits) if limits else None
            if limit is not None:
                return limit
        log.warning("sglang engine: no server reported max_req_input_len or context_length; no truncation")
        return None

    def _get_json(self, url: str) -> Any:
        try:
            r = self.http.session().get(url, timeout=min(self.timeout_s, 30.0))
            return r.json() if r.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None

    def _server_limit(self, url: str) -> int | None:
        for path in ("/server_info", "/get_server_info"):  # the second is the older servers' name
            info = self._get_json(f"{url}{path}")
            if not isinstance(info, dict):
                continue
            if info.get("max_req_input_len"):
                return int(info["max_req_input_len"]) - 1
            if info.get("context_length"):  # no scheduler figure: keep SGLang's margin of 6
                return int(info["context_length"]) - 7
        return None

    def _router_workers(self, url: str) -> list[str]:
        info = self._get_json(f"{url}/workers")
        workers = info.get("workers") if isinstance(info, dict) else None
        return [str(w["url"]).rstrip("/") for w in workers or [] if isinstance(w, dict) and w.get("url")]

    # ---------------------------------------------------------------------------------- transport
    def _session(self) -> requests.Session:
        return self.http.session()

    def _post(self, payload: dict) -> dict:
        return self.http.post("/generate", payload)

    def _map(self, fn, jobs: list) -> list:
        return self.http.map(fn, jobs)

    # ---------------------------------------------------------------------------------- interface
    @staticmethod
    def sampling_params(max_new_tokens: int, stop: list[int], seed: int | None) -> dict[str, Any]:
        # no ignore_eos: in SGLang it also disables stop_token_ids (see the module docstring)
        sp: dict[str, Any] = {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "max_new_tokens": int(max_new_tokens),
            "stop_token_ids": [int(t) for t in stop],
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
            return self._sample_one(list(prompts[i]), max_new_tokens, stop, stop_set, sample_seed(seeds[i], j))

        flat = self._map(one, jobs)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _sample_one(self, prompt: list[int], max_new_tokens: int, stop: list[int], stop_set: set[int], seed: int) -> Sample:
        """One sample that only `stop` (or the length cap) ends: stops on other ids (the model's
        EOS, which SGLang adds to every request without ignore_eos) are continued."""
        tokens: list[int] = []
        logprobs: list[float] = []
        while True:
            # the first request uses the sample's seed; a continuation one derived from it and the
            # tokens so far (a fresh stream, reproducible under deterministic inference)
            part_seed = seed if not tokens else derive_seed(seed, len(tokens))
            sent = prompt + tokens
            payload = {
                "input_ids": sent,
                "sampling_params": self.sampling_params(max_new_tokens - len(tokens), stop, part_seed),
                "return_logprob": True,
                "logprob_start_len": len(sent) - 1,
            }
            part, reason = self._parse_sample(self._post(payload))
            tokens += part[0]
            logprobs += part[1]
            kind, matched = reason.get("type"), reason.get("matched")
            if kind == "stop" and not isinstance(matched, int):
                # e.g. SGLang's "NaN happened" (an out-of-vocab id replaced by a stop id): not a sample
                raise EngineError(f"/generate stopped on {matched!r}, not on a token; the model's logits are broken")
            if kind == "stop" and tokens and tokens[-1] in stop_set:
                return Sample(tokens, logprobs, True, tokens[-1])
            if kind == "stop" and part[0] and len(tokens) < max_new_tokens:
                continue  # an EOS-type stop that is not ours
            if kind not in ("stop", "length"):
                raise EngineError(f"/generate finished with {reason!r}")
            return Sample(tokens, logprobs, False, None)

    @staticmethod
    def _parse_sample(body: dict) -> tuple[tuple[list[int], list[float]], dict]:
        meta = body.get("meta_info") or {}
        entries = meta.get("output_token_logprobs")
        if entries is None:
            raise EngineError("response has no meta_info.output_token_logprobs (server ignored return_logprob?)")
        tokens = [int(e[1]) for e in entries]
        logprobs = [float(e[0]) for e in entries]
        out_ids = body.get("output_ids")
        if out_ids is not None and list(out_ids) != tokens:
            raise EngineError("output_ids and output_token_logprobs disagree")
        return (tokens, logprobs), (meta.get("finish_reason") or {})

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
                "sampling_params": self.sampling_params(0, [], None),  # prefill only
                "return_logprob": True,
                "logprob_start_len": len(p) - 1,
            }
            body = self._post(payload)
            entries = (body.get("meta_info") or {}).get("input_token_logprobs")
            if entries is None or len(entries) < len(c):
                raise EngineError(f"input_token_logprobs has {None if entries is None else len(entries)} entries, need {len(c)}")
            tail = entries[-len(c) :]
            # SGLang reports ids >= vocab_size-1 as 0 (their values are right): the ids sent are the truth
            if any(int(e[1]) not in (t, 0) for e, t in zip(tail, c)) or any(e[0] is None for e in tail):
                raise EngineError("input_token_logprobs do not line up with the continuation tokens")
            return float(sum(float(e[0]) for e in tail))

        return self._map(one, list(range(len(prompts))))

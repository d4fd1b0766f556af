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

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from megatron_bolt.http_retry import RetriesExhausted, RetryingHTTP, Transient
from megatron_bolt.inference.base import Engine, Sample, per_prompt_seeds, sample_seed

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A request could not be completed (bad request, or every retry failed)."""


class ServerPool:
    """Round-robin over servers; servers that keep failing sit out a cooldown."""

    def __init__(self, urls: list[str], failure_threshold: int = 2, cooldown_s: float = 30.0) -> None:
        if not urls:
            raise ValueError("no server URLs")
        self.urls = [u.rstrip("/") for u in urls]
        self.failure_threshold, self.cooldown_s = failure_threshold, cooldown_s
        self.failures = {u: 0 for u in self.urls}
        self.down_until = {u: 0.0 for u in self.urls}
        self.lock = threading.Lock()
        self.next = 0

    def pick(self) -> str:
        with self.lock:
            now = time.monotonic()
            for k in range(len(self.urls)):
                u = self.urls[(self.next + k) % len(self.urls)]
                if self.down_until[u] <= now:
                    self.next = (self.next + k + 1) % len(self.urls)
                    return u
            # Everyone is cooling down: try the one that comes back first rather than stall.
            return min(self.urls, key=lambda x: self.down_until[x])

    def ok(self, url: str) -> None:
        with self.lock:
            self.failures[url] = 0
            self.down_until[url] = 0.0

    def failed(self, url: str) -> None:
        with self.lock:
            self.failures[url] += 1
            if self.failures[url] >= self.failure_threshold and len(self.urls) > 1:
                if self.down_until[url] <= time.monotonic():
                    log.warning("sglang engine: %s out of rotation for %.0fs", url, self.cooldown_s)
                self.down_until[url] = time.monotonic() + self.cooldown_s

    def healthy(self) -> list[str]:
        now = time.monotonic()
        return [u for u in self.urls if self.down_until[u] <= now]


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
        self.pool = ServerPool([urls] if isinstance(urls, str) else list(urls), failure_threshold, cooldown_s)
        self.timeout_s, self.retries = timeout_s, retries
        self.http = RetryingHTTP(retries, backoff_s, max_backoff_s)
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sglang-client")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------- transport
    def _post(self, payload: dict) -> dict:
        def attempt(_: int) -> dict:
            url = self.pool.pick()
            try:
                r = self.http.post_json(f"{url}/generate", payload, self.timeout_s)
                if r.status_code != 200:
                    raise EngineError(f"{url}/generate: HTTP {r.status_code}: {r.text[:500]}")
                body = r.json()
            except (Transient, ValueError) as exc:
                # ValueError: a truncated/garbled body from a dying server is worth a retry too.
                self.pool.failed(url)
                raise Transient(f"{url}: {type(exc).__name__}: {exc}") from None
            self.pool.ok(url)
            return body

        try:
            return self.http.retry(attempt)
        except RetriesExhausted as exc:
            raise EngineError(f"/generate failed after {exc.attempts} attempts; last error {exc.last}") from None

    def _map(self, fn, jobs: list) -> list:
        return list(self.executor.map(fn, jobs))

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

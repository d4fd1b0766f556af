"""The HTTP side shared by the server-backed engines (SGLang's `/generate`, vLLM's `/v1/completions`).

One URL (a router or a single server) or a list of server URLs, used round robin. Bounded
concurrency, per-request timeouts, retries with exponential backoff on connection errors,
timeouts, 5xx and garbled bodies (megatron_bolt.http_retry); a server that fails `failure_threshold` times in a row leaves
the rotation for `cooldown_s` while the others carry on. A 4xx is the request's fault: no retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from megatron_bolt.http_retry import RetriesExhausted, RetryingHTTP, Transient

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A request could not be completed (bad request, or every retry failed)."""


@dataclass(frozen=True)
class PoolOptions:
    """How a server-backed engine talks to its servers (HTTPPool): the same for every client."""

    concurrency: int = 64  # requests in flight
    timeout_s: float = 600.0  # per request
    retries: int = 8  # attempts after the first, on transient errors
    backoff_s: float = 0.25  # before the first retry, doubled each time
    max_backoff_s: float = 8.0
    failure_threshold: int = 2  # failures in a row that take a server out of the rotation...
    cooldown_s: float = 30.0  # ...for this long


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
                    log.warning("engine client: %s out of rotation for %.0fs", url, self.cooldown_s)
                self.down_until[url] = time.monotonic() + self.cooldown_s

    def healthy(self) -> list[str]:
        now = time.monotonic()
        return [u for u in self.urls if self.down_until[u] <= now]


class HTTPPool:
    """POSTs JSON to a pool of servers from a bounded thread pool, one requests.Session per thread."""

    def __init__(self, urls: str | list[str], options: PoolOptions | None = None, name: str = "engine-client") -> None:
        o = options or PoolOptions()
        self.options = o
        self.pool = ServerPool([urls] if isinstance(urls, str) else list(urls), o.failure_threshold, o.cooldown_s)
        self.timeout_s, self.retries = o.timeout_s, o.retries
        self.http = RetryingHTTP(o.retries, o.backoff_s, o.max_backoff_s)  # sessions, retries and backoff
        self.executor = ThreadPoolExecutor(max_workers=o.concurrency, thread_name_prefix=name)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def session(self) -> requests.Session:
        """This thread's session (connections are reused per thread)."""
        return self.http.session()

    def post(self, path: str, payload: dict) -> Any:
        """POST `payload` to `path` on the next healthy server; the decoded JSON body."""

        def attempt(_: int) -> Any:
            url = self.pool.pick()
            try:
                r = self.http.post_json(f"{url}{path}", payload, self.timeout_s)
                if r.status_code != 200:
                    raise EngineError(f"{url}{path}: HTTP {r.status_code}: {r.text[:500]}")
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
            raise EngineError(f"{path} failed after {exc.attempts} attempts; last error {exc.last}") from None

    def map(self, fn: Callable[[Any], Any], jobs: list) -> list:
        return list(self.executor.map(fn, jobs))

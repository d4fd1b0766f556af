"""HTTP with retries: one `requests.Session` per thread and exponential backoff with jitter.

Used by the engines' server pool (inference/http.py: SGLang and vLLM clients) and the OpenAI-compatible teacher
(latents/teachers.py); it imports nothing from the project, so engines may use it. (Not named
`http`: a module of that name would shadow the standard library's for scripts run from here.)

    http = RetryingHTTP(retries=6, backoff_s=1.0, max_backoff_s=60.0, stop=threading.Event())
    body = http.retry(lambda attempt: http.post_json(url, payload, timeout_s=30).json())

A request that fails transiently (connection error, timeout, HTTP 5xx and, where asked, 429)
raises `Transient` inside the attempt; `retry` waits `Retry-After` when the server sent one, else
backoff * U(0.5, 1.5) with the backoff doubling up to `max_backoff_s`, and gives up with
`RetriesExhausted` after `retries` retries. Any other exception ends the call at once.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import requests

T = TypeVar("T")


class Transient(Exception):
    """A failure worth another attempt; `after`: seconds the server asked us to wait (Retry-After)."""

    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


class RetriesExhausted(Exception):
    """Every attempt failed transiently; `last` is the last failure, `attempts` how many were made."""

    def __init__(self, attempts: int, last: Transient) -> None:
        super().__init__(f"failed after {attempts} attempts; last error {last}")
        self.attempts, self.last = attempts, last


class Stopped(Exception):
    """The call gave up because its stop event was set (another request failed for good)."""


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RetryingHTTP:
    def __init__(self, retries: int, backoff_s: float, max_backoff_s: float, stop: threading.Event | None = None,
                 retry_429: bool = False) -> None:
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.stop = stop
        self.retry_429 = retry_429
        self._local = threading.local()

    def session(self) -> requests.Session:
        """This thread's session (a Session is not safe to share between threads)."""
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def post_json(self, url: str, payload: dict, timeout_s: float, headers: dict | None = None,
                  describe: Callable[[requests.Response], str] | None = None) -> requests.Response:
        """POST `payload` as JSON; connection errors, timeouts, 5xx (and 429 if asked) raise `Transient`
        (the message from `describe(response)`, default the start of the body). Other statuses come
        back for the caller to judge."""
        try:
            r = self.session().post(url, json=payload, headers=headers, timeout=timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None
        if r.status_code >= 500 or (self.retry_429 and r.status_code == 429):
            message = describe(r) if describe is not None else " ".join((r.text or r.reason or "").split())[:200]
            raise Transient(f"HTTP {r.status_code}: {message}", retry_after(r.headers.get("Retry-After")))
        return r

    def retry(self, attempt: Callable[[int], T]) -> T:
        """`attempt(i)` for i = 0, 1, ... until it returns, raises a non-`Transient` error, or the
        retries run out (`RetriesExhausted`)."""
        delay = self.backoff_s
        for i in range(self.retries + 1):
            if self.stop is not None and self.stop.is_set():
                raise Stopped("stopped")
            try:
                return attempt(i)
            except Transient as exc:
                if i == self.retries:
                    raise RetriesExhausted(i + 1, exc) from None
                pause = exc.after if exc.after is not None else delay * (0.5 + random.random())
                delay = min(delay * 2, self.max_backoff_s)
                if self.stop is not None:
                    if self.stop.wait(pause):
                        raise Stopped("stopped") from None
                else:
                    time.sleep(pause)
        raise AssertionError("unreachable")

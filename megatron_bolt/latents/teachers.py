"""Teachers for the warm start (method.md): text in, latent-thought text out, one latent per chunk.

A teacher is anything with `latents(prefixes, chunks) -> list[str]`; `bolt warmstart` feeds it the
decoded text of each chunk and of its prefix (the previous chunks of the same document).

- `toy`: the toy math world's exact teacher (`megatron_bolt.toy.world.teacher_latent`).
- `openai`: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, llama.cpp, ...),
  asked as the BoLT reference asks (`DEFAULT_SYSTEM_PROMPT`, `DEFAULT_PROMPT`, gpt-4o-mini pinned,
  temperature 0.7, up to 6000 tokens). One request per chunk, sent from a thread pool, with retries and exponential backoff on
  connection errors, timeouts, HTTP 5xx and 429 (a `Retry-After` header is honoured), and an
  optional requests-per-minute limit. The API key only ever goes into the Authorization header:
  it is not printed, logged, or put in a repr or an exception message.
"""

from __future__ import annotations

import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from megatron_bolt.config import OpenAITeacherConfig, check_section
from megatron_bolt.errors import UserError
from megatron_bolt.http_retry import RetriesExhausted, RetryingHTTP, Stopped, Transient

# The warm-start request of the BoLT reference (ryoungj/BoLT configs/gen/gpt_latent_thoughts.yaml,
# sent by apps/main/gen_utils/openai_batch.py `prepare_prompts`: a system message, then one user
# message), restated in this project's words. {prefix} and {suffix} are replaced by the texts;
# everything else is sent as written. An empty prefix (a document's first chunk) is sent as
# EMPTY_PREFIX, as the reference does.
DEFAULT_SYSTEM_PROMPT = (
    "You are an expert reader with broad and deep knowledge, able to understand any web document "
    "and to reason through it carefully."
)

DEFAULT_PROMPT = """Below are two consecutive pieces of one web document: a PREFIX and the SUFFIX that follows it. Write the latent thoughts that lie between them: the thinking, given the prefix, from which the suffix was written. They consist of the background knowledge that the suffix relies on without stating it, and the reasoning behind each of its claims, spelled out step by step (derivations, calculations and logical inferences in full).

PREFIX:
{prefix}

SUFFIX:
{suffix}

Now write the latent thoughts. Use short, plain, declarative sentences. Your reply is read by a program, not a person: do not comment on the task and never speak of a prefix or a suffix. No markdown, no formatting, no decoration. Make every sentence carry information; avoid empty statements such as "this is important". Concentrate on the suffix and do not repeat what the prefix already says. Give what the suffix leaves implicit, its unstated knowledge and reasoning, with concrete logic or mathematics wherever they apply.
"""

EMPTY_PREFIX = "N/A"
# The reference's teacher and its decoding settings (gpt_latent_thoughts.yaml).
DEFAULT_MODEL = "gpt-4o-mini-2024-07-18"
DEFAULT_MAX_TOKENS = 6000
DEFAULT_TEMPERATURE = 0.7

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_PLACEHOLDER = re.compile(r"\{(prefix|suffix)\}")

Progress = Callable[[int], None]


class TeacherError(UserError):
    """A teacher request failed for good (a 4xx other than 429, or retries exhausted)."""


class _Stopped(TeacherError):
    """Raised in a thread that gave up because another request failed for good."""


class Teacher(ABC):
    """Latent text for chunks given their prefixes. `requests` / `retries` count HTTP requests sent
    and how many of them were retries (0 for teachers that send none)."""

    name: str = "teacher"
    model: str = ""
    requests: int = 0
    retries: int = 0
    truncated: int = 0  # answers cut off by max_tokens (kept as they are)

    @abstractmethod
    def latents(self, prefixes: list[str], chunks: list[str], progress: Progress | None = None) -> list[str]:
        """One latent text per chunk; `progress(n)` is called as chunks finish."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class ToyTeacher(Teacher):
    """The toy math world's teacher: the working of every problem answered in the chunk."""

    name = "toy"
    model = "megatron_bolt.toy.world.teacher_latent"

    def latents(self, prefixes: list[str], chunks: list[str], progress: Progress | None = None) -> list[str]:
        from megatron_bolt.toy.world import teacher_latent

        out = [teacher_latent(p, c) for p, c in zip(prefixes, chunks, strict=True)]
        if progress is not None:
            progress(len(out))
        return out


def render_prompt(template: str, prefix: str, suffix: str) -> str:
    """The template with {prefix} and {suffix} filled in one pass (so a text that itself contains
    "{suffix}" is not substituted again); other braces are left alone."""
    return _PLACEHOLDER.sub(lambda m: prefix if m.group(1) == "prefix" else suffix, template)


def load_prompt_template(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--prompt-file {path}: cannot read ({exc.strerror or exc})") from None
    if "{suffix}" not in text:
        raise UserError(f"--prompt-file {path}: the template has no {{suffix}} placeholder")
    return text


class _RateLimiter:
    """At most `per_minute` request starts per minute, spread evenly, shared by all threads."""

    def __init__(self, per_minute: float | None) -> None:
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


class _Secret:
    """Holds the API key; its repr (and so any repr or vars() of its owner) shows only ***."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__


def _server_message(response) -> str:
    """The server's error message: OpenAI's {"error": {"message": ...}} if present, else the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    msg = None
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else body.get("message")
    text = str(msg) if msg else (response.text or response.reason or "")
    return " ".join(text.split())[:300] or "(empty body)"


class OpenAITeacher(Teacher):
    """A chat-completions client: per chunk, the system message (if any) and one user message (the
    rendered prompt)."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        temperature: float = DEFAULT_TEMPERATURE,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        concurrency: int = 8,
        requests_per_minute: float | None = None,
        max_retries: int = 6,
        timeout_s: float = 120.0,
        prompt_template: str = DEFAULT_PROMPT,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        if not base_url:
            raise UserError("openai teacher: no base URL (--base-url or OPENAI_BASE_URL)")
        if not model:
            raise UserError("openai teacher: no model name (--model or OPENAI_MODEL)")
        if not api_key:
            raise UserError("openai teacher: no API key")
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise UserError("openai teacher: need --concurrency >= 1, --max-retries >= 0, --timeout > 0")
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise UserError("openai teacher: --requests-per-minute must be > 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._key = _Secret(api_key)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self.template = prompt_template
        self.system_prompt = system_prompt or None
        self.limiter = _RateLimiter(requests_per_minute)
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._http = RetryingHTTP(max_retries, backoff_s, max_backoff_s, stop=self._stop, retry_429=True)
        self.requests = self.retries = 0

    def __repr__(self) -> str:
        return f"OpenAITeacher(url={self.url!r}, model={self.model!r}, temperature={self.temperature})"

    def close(self) -> None:
        # Do not wait for requests still in flight (an interrupt would otherwise hang for up to
        # --timeout); they see the stop flag and make no further attempts.
        self._stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------- requests
    def _scrub(self, text: str) -> str:
        """A server or library message with the key, should it echo it, masked."""
        return text.replace(self._key.value, "***")

    def messages(self, prefix: str, chunk: str) -> list[dict]:
        user = {"role": "user", "content": render_prompt(self.template, prefix or EMPTY_PREFIX, chunk)}
        if self.system_prompt is None:
            return [user]
        return [{"role": "system", "content": self.system_prompt}, user]

    def payload(self, prefix: str, chunk: str) -> dict:
        body = {"model": self.model, "messages": self.messages(prefix, chunk), "temperature": self.temperature}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        return body

    def _count(self, retry: bool) -> None:
        with self._lock:
            self.requests += 1
            self.retries += int(retry)

    def _attempt(self, payload: dict) -> str:
        headers = {"Authorization": f"Bearer {self._key.value}", "Content-Type": "application/json"}
        r = self._http.post_json(self.url, payload, self.timeout_s, headers=headers, describe=_server_message)
        if r.status_code != 200:
            raise TeacherError(self._scrub(f"openai teacher: POST {self.url}: HTTP {r.status_code}: {_server_message(r)}"))
        try:
            body = r.json()
            choice = body["choices"][0]
            content = choice["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            # A truncated or garbled body from an overloaded proxy is worth another try.
            raise Transient(f"HTTP 200 without choices[0].message: {r.text[:200]!r}") from None
        if choice.get("finish_reason") == "length":
            with self._lock:
                self.truncated += 1
        return (content or "").strip()

    def complete(self, prefix: str, chunk: str) -> str:
        """The teacher's latent for one chunk, retrying transient failures (http_retry)."""
        payload = self.payload(prefix, chunk)

        def attempt(i: int) -> str:
            self.limiter.wait()
            self._count(retry=i > 0)
            return self._attempt(payload)

        try:
            return self._http.retry(attempt)
        except TeacherError:
            self._stop.set()  # a permanent failure: the other threads stop sending too
            raise
        except RetriesExhausted as exc:
            self._stop.set()
            raise TeacherError(self._scrub(
                f"openai teacher: POST {self.url} failed after {exc.attempts} attempts; last error {exc.last}"
            )) from None
        except Stopped:
            raise _Stopped("openai teacher: stopped") from None

    def latents(self, prefixes: list[str], chunks: list[str], progress: Progress | None = None) -> list[str]:
        if len(prefixes) != len(chunks):
            raise ValueError(f"{len(prefixes)} prefixes but {len(chunks)} chunks")
        futures = [self.executor.submit(self.complete, p, c) for p, c in zip(prefixes, chunks)]
        if progress is not None:
            for f in futures:
                f.add_done_callback(lambda f: not f.cancelled() and f.exception() is None and progress(1))
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            # Stop spending requests on a batch that cannot be written anyway.
            self._stop.set()
            for f in pending:
                f.cancel()
            wait(pending)
            self._stop.clear()
            # Report the failure itself, not a thread that stopped because of it.
            errors = [f.exception() for f in failed]
            raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        return [f.result() for f in futures]


def make_teacher(kind: str, openai: OpenAITeacherConfig | None = None) -> Teacher:
    """A teacher by name; the openai one reads OPENAI_BASE_URL (default OpenAI's own), OPENAI_MODEL
    (default DEFAULT_MODEL, the reference's pinned gpt-4o-mini) and the key variable from the
    environment where the config leaves them out."""
    if kind == "toy":
        return ToyTeacher()
    if kind == "openai":
        o = openai or OpenAITeacherConfig()
        check_section(o, "warmstart.openai.")
        key = os.environ.get(o.api_key_env, "")
        if not key:
            raise UserError(f"openai teacher: no API key: environment variable {o.api_key_env} is not set "
                            f"(set it, or name another variable with --api-key-env)")
        template = load_prompt_template(o.prompt_file) if o.prompt_file else DEFAULT_PROMPT
        return OpenAITeacher(
            o.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            o.model or os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL,
            key,
            temperature=o.temperature, max_tokens=o.max_tokens or None, concurrency=o.concurrency,
            requests_per_minute=o.requests_per_minute, max_retries=o.max_retries, timeout_s=o.timeout,
            prompt_template=template, backoff_s=o.retry_backoff,
            system_prompt=DEFAULT_SYSTEM_PROMPT if o.system_prompt is None else o.system_prompt,
        )
    raise UserError(f"unknown teacher {kind!r} (choose toy or openai)")

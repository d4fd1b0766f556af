"""`bolt serve`: the local engine behind the subset of SGLang's native HTTP API that the E-step client
and SGLang's router use, so a CPU machine (or several) can stand in for an SGLang fleet.

Protocol kept as SGLang speaks it:
- POST /generate: `input_ids` (one list or a list of lists), `sampling_params` (one dict or one per
  prompt: temperature, top_p, top_k, min_p, max_new_tokens, stop_token_ids, ignore_eos,
  sampling_seed), `return_logprob`, `logprob_start_len` (default -1, meaning only the last prompt
  token), `rid`. Response: `{"text", "output_ids", "meta_info": {"id", "finish_reason",
  "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency",
  "input_token_logprobs", "output_token_logprobs"}}` (a list of those for a batch). Logprob
  entries are `[logprob, token_id, null]`; `input_token_logprobs` covers prompt tokens from
  `logprob_start_len` on and its first entry's logprob is null (SGLang drops it).
  `finish_reason` is `{"type": "stop", "matched": id}` or `{"type": "length", "length": n}`.
- GET /health, /health_generate, /get_model_info (/model_info), /get_server_info (/server_info),
  /v1/models, /get_load; POST /flush_cache.

SGLang's rules, reproduced (SGLang 0.5.x, the function each follows):
- Stops (`Req._check_token_based_finish`): `ignore_eos` switches every token stop off,
  `stop_token_ids` included; without it a request also stops on the model's EOS ids (config and
  generation_config `eos_token_id`, `ModelConfig._get_hf_eos_token_id`, and the tokenizer's EOS).
- Seeds (`SamplingBatchInfo.from_schedule_batch`): `sampling_seed` is used only when the server was
  started with `--enable-deterministic-inference` (a request without one then gets 42); otherwise
  every request draws fresh randomness. Seeded draws here are keyed by (seed, step), SGLang's by
  (seed, position): the client relies on neither.
- Input log-prob ids (`SchedulerLogprobResultProcessor._process_input_token_logprobs`): every id
  >= vocab_size-1 is reported as 0; the log-prob values are those of the real ids.
- Length (`TokenizerManager._validate_one_request`, then the scheduler's `validate_input_length`
  and `init_req_max_new_tokens`): an input of >= context_length tokens, or input + max_new_tokens
  > context_length, gets HTTP 400 with SGLang's message; so does an input of >= max_req_input_len
  (context_length - 6, SGLang's max_req_len - 5 with max_req_len = context_length - 1); and
  max_new_tokens is cut to max_req_len - input - 1. `/server_info` reports all three figures.

Only untempered sampling is implemented (temperature 1, top_p 1, top_k -1 or 0, min_p 0): other
settings get a 400, never a silently different distribution. Concurrent requests are merged by
a batching thread into one engine call, as SGLang's scheduler would.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megatron_bolt.inference.local import LocalEngine, RowResult

VERSION = "0.5.0-bolt"
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default
DETERMINISTIC_DEFAULT_SEED = 42  # SamplingBatchInfo.from_schedule_batch: a seedless request under deterministic inference


class BadRequest(ValueError):
    pass


@dataclass
class _Item:
    prompt: list[int]
    seed: int
    max_new: int
    stop: frozenset[int]
    start: int | None
    future: Future


class Batcher:
    """Collects rows from concurrent requests and runs them as few engine calls as possible."""

    def __init__(self, engine: LocalEngine, max_rows: int = 256, wait_s: float = 0.003) -> None:
        self.engine, self.max_rows, self.wait_s = engine, max_rows, wait_s
        self.queue: queue.Queue[_Item | None] = queue.Queue()
        self.running = 0
        self.thread = threading.Thread(target=self._loop, name="bolt-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, item: _Item) -> Future:
        self.queue.put(item)
        return item.future

    def stop(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            items = [first]
            deadline = time.monotonic() + self.wait_s
            while len(items) < self.max_rows:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                items.append(nxt)
            groups: dict[frozenset[int], list[_Item]] = {}
            for it in items:
                groups.setdefault(it.stop, []).append(it)
            self.running = len(items)
            for stop, group in groups.items():
                try:
                    results = self.engine.generate_rows(
                        [g.prompt for g in group],
                        [g.seed for g in group],
                        [g.max_new for g in group],
                        sorted(stop),
                        [g.start for g in group],
                    )
                except Exception as exc:  # one bad batch must not kill the server
                    for g in group:
                        g.future.set_exception(exc)
                    continue
                for g, r in zip(group, results):
                    g.future.set_result(r)
            self.running = 0


def _as_list(value: Any, n: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


class GenerateHandler:
    """Turns /generate JSON into engine rows and engine rows back into SGLang's response shape."""

    def __init__(self, engine: LocalEngine, batcher: Batcher, tokenizer=None, deterministic: bool = False,
                 context_length: int | None = None) -> None:
        self.engine, self.batcher, self.tokenizer = engine, batcher, tokenizer
        self.deterministic = deterministic
        self.eos_ids: set[int] = set()
        for source in (engine.model.config, getattr(engine.model, "generation_config", None), tokenizer):
            eos = getattr(source, "eos_token_id", None)
            self.eos_ids |= set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        self.vocab_size = int(engine.model.config.vocab_size)
        self.context_length = int(context_length or engine.context_length or 1 << 30)
        self.max_req_len = self.context_length - 1
        self.max_req_input_len = self.max_req_len - 5

    def _check_length(self, n_input: int, max_new: int) -> int:
        """SGLang's length rules: 400 messages as SGLang words them; returns the max_new_tokens kept."""
        c = self.context_length
        if n_input >= c:
            raise BadRequest(f"The input ({n_input} tokens) is longer than the model's context length ({c} tokens).")
        if n_input + max_new > c:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {c} tokens. You requested a "
                f"total of {n_input + max_new} tokens: {n_input} tokens from the input messages and {max_new} tokens "
                "for the completion. Please reduce the number of tokens in the input messages or the completion to "
                "fit within the limit.")
        if n_input >= self.max_req_input_len:
            raise BadRequest(f"Input length ({n_input} tokens) exceeds the maximum allowed length "
                             f"({self.max_req_input_len} tokens). Use a shorter input or enable --allow-auto-truncate.")
        return max(0, min(max_new, self.max_req_len - n_input - 1))

    def handle(self, req: dict) -> Any:
        if req.get("stream"):
            raise BadRequest("stream=true is not supported by bolt serve")
        ids = req.get("input_ids")
        single = False
        if ids is None and req.get("text") is not None:
            if self.tokenizer is None:
                raise BadRequest("text input needs a tokenizer in the model directory; send input_ids")
            text = req["text"]
            single = isinstance(text, str)
            ids = [self.tokenizer.encode(t) for t in ([text] if single else text)]
        elif ids is None:
            raise BadRequest("request has neither input_ids nor text")
        elif ids and isinstance(ids[0], int):
            single, ids = True, [ids]
        if not ids or any(not isinstance(p, list) or not p or not all(isinstance(t, int) for t in p) for p in ids):
            raise BadRequest("input_ids must be a non-empty list of ints or a list of such lists")
        n = len(ids)
        sps = _as_list(req.get("sampling_params") or {}, n, "sampling_params")
        ret_lp = _as_list(req.get("return_logprob", False), n, "return_logprob")
        starts = _as_list(req.get("logprob_start_len", -1), n, "logprob_start_len")
        tops = _as_list(req.get("top_logprobs_num", 0), n, "top_logprobs_num")
        rids = _as_list(req.get("rid"), n, "rid")
        t0 = time.monotonic()
        rows = []
        for i, (prompt, sp) in enumerate(zip(ids, sps)):  # every row is checked before any runs
            self._check_sampling(sp or {}, i)
            if tops[i]:
                raise BadRequest("top_logprobs_num is not supported by bolt serve")
            sp = sp or {}
            max_new = sp.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
            max_new = self._check_length(len(prompt), int(max_new if max_new is not None else 1 << 30))
            # ignore_eos: no token stop at all, stop_token_ids included (Req._check_token_based_finish)
            stop: set[int] = set()
            if not sp.get("ignore_eos", False):
                stop = {int(t) for t in (sp.get("stop_token_ids") or [])} | self.eos_ids
            start = None
            if ret_lp[i]:
                s = int(starts[i]) if starts[i] is not None else -1
                start = len(prompt) - 1 if s < 0 else min(s, len(prompt) - 1)
            seed = sp.get("sampling_seed")
            if not self.deterministic:  # SGLang's sampler never sees the seed then
                seed = int.from_bytes(os.urandom(8), "little") >> 1
            elif seed is None:
                seed = DETERMINISTIC_DEFAULT_SEED
            rows.append((prompt, int(seed), max_new, frozenset(stop), start, rids[i] or uuid.uuid4().hex))
        futures, metas = [], []
        for prompt, seed, max_new, stop, start, rid in rows:
            futures.append(self.batcher.submit(_Item(prompt, seed, max_new, stop, start, Future())))
            metas.append((prompt, max_new, start, rid))
        out = []
        for fut, (prompt, max_new, start, rid) in zip(futures, metas):
            r: RowResult = fut.result()
            out.append(self._response(prompt, max_new, start, rid, r, time.monotonic() - t0))
        return out[0] if single else out

    @staticmethod
    def _check_sampling(sp: dict, i: int) -> None:
        checks = {
            "temperature": (1.0, lambda v: float(v) == 1.0),
            "top_p": (1.0, lambda v: float(v) == 1.0),
            "top_k": (-1, lambda v: int(v) in (-1, 0)),
            "min_p": (0.0, lambda v: float(v) == 0.0),
            "frequency_penalty": (0.0, lambda v: float(v) == 0.0),
            "presence_penalty": (0.0, lambda v: float(v) == 0.0),
            "repetition_penalty": (1.0, lambda v: float(v) == 1.0),
        }
        for key, (default, ok) in checks.items():
            v = sp.get(key, default)
            if v is not None and not ok(v):
                raise BadRequest(f"sampling_params[{i}].{key}={v!r}: bolt serve only samples untempered ({key}={default})")
        for key in ("stop", "regex", "json_schema", "ebnf"):
            if sp.get(key):
                raise BadRequest(f"sampling_params[{i}].{key} is not supported by bolt serve (use stop_token_ids)")

    def _response(self, prompt, max_new, start, rid, r: RowResult, latency: float) -> dict:
        if r.finished:
            finish = {"type": "stop", "matched": r.stop_token}
        else:
            finish = {"type": "length", "length": max_new}
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(r.tokens),
            "cached_tokens": 0,
            "e2e_latency": latency,
        }
        if start is not None:
            vals = [None] + list(r.input_logprobs or [])
            clip = self.vocab_size - 1  # ids >= vocab_size-1 are reported as 0, as SGLang does
            meta["input_token_logprobs"] = [[v, t if t < clip else 0, None] for v, t in zip(vals, prompt[start:])]
            meta["output_token_logprobs"] = [[v, t, None] for v, t in zip(r.logprobs, r.tokens)]
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        return {"text": text, "output_ids": list(r.tokens), "meta_info": meta}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(model_dir: str, host: str, port: int, device: str | None = None, deterministic: bool = False,
                context_length: int | None = None) -> tuple[_Server, Batcher]:
    """deterministic: SGLang's --enable-deterministic-inference (honour sampling_seed);
    context_length: SGLang's --context-length (default the model's max_position_embeddings)."""
    engine = LocalEngine(model_dir, device=device)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # a model dir without tokenizer files still serves input_ids
        tokenizer = None
    batcher = Batcher(engine)
    gen = GenerateHandler(engine, batcher, tokenizer, deterministic, context_length)
    started = time.time()
    model_type = getattr(engine.model.config, "model_type", None)
    archs = getattr(engine.model.config, "architectures", None) or [type(engine.model).__name__]
    max_len = gen.context_length

    def model_info() -> dict:
        return {
            "model_path": model_dir,
            "tokenizer_path": model_dir if tokenizer is not None else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": model_type,
            "architectures": archs,
        }

    def server_info() -> dict:
        return {
            "model_path": model_dir,
            "tokenizer_path": model_dir if tokenizer is not None else None,
            "served_model_name": model_dir,
            "context_length": max_len,
            "max_req_len": gen.max_req_len,
            "max_req_input_len": gen.max_req_input_len,
            "enable_deterministic_inference": deterministic,
            "dp_size": 1,
            "tp_size": 1,
            "version": VERSION,
            "engine": "bolt-local",
            "device": str(engine.device),
            "internal_states": [{"last_gen_throughput": 0.0}],
        }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet by default; BOLT_SERVE_LOG=1 logs requests
            if os.environ.get("BOLT_SERVE_LOG"):
                super().log_message(fmt, *args)

        def _send(self, code: int, body: Any = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _read_json(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            return json.loads(raw) if raw else {}

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path in ("/health", "/ping"):
                self._send(200)
            elif path == "/health_generate":
                try:
                    gen.handle({"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "ignore_eos": True}})
                    self._send(200)
                except Exception as exc:
                    self._send(503, {"error": {"message": str(exc)}})
            elif path in ("/get_model_info", "/model_info"):
                self._send(200, model_info())
            elif path in ("/get_server_info", "/server_info"):
                self._send(200, server_info())
            elif path == "/v1/models":
                card = {"id": model_dir, "object": "model", "created": int(started), "owned_by": "sglang",
                        "root": model_dir, "max_model_len": max_len}
                self._send(200, {"object": "list", "data": [card]})
            elif path == "/get_load":
                waiting = batcher.queue.qsize()
                self._send(200, [{"dp_rank": 0, "num_reqs": batcher.running + waiting,
                                  "num_waiting_reqs": waiting, "num_tokens": 0}])
            else:
                self._send(404, {"error": {"message": f"no route {path}"}})

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            try:
                body = self._read_json()
            except (ValueError, UnicodeDecodeError) as exc:
                self._send(400, {"error": {"message": f"invalid JSON: {exc}"}})
                return
            if path == "/generate":
                try:
                    self._send(200, gen.handle(body))
                except BadRequest as exc:
                    self._send(400, {"error": {"message": str(exc)}})
                except Exception as exc:
                    self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})
            elif path == "/flush_cache":
                self._send(200)
            else:
                self._send(404, {"error": {"message": f"no route {path}"}})

    return _Server((host, port), Handler), batcher


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 30000, device: str | None = None,
          deterministic: bool = False, context_length: int | None = None) -> None:
    """Serve until interrupted."""
    server, batcher = make_server(model_dir, host, port, device, deterministic, context_length)
    seeds = "sampling_seed honoured" if deterministic else "sampling_seed ignored (no --enable-deterministic-inference)"
    print(f"bolt serve: {model_dir} on http://{host}:{server.server_address[1]}; {seeds}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        batcher.stop()

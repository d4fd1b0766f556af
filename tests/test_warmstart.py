"""`bolt warmstart`: toy teacher end to end into `bolt merge`; the openai teacher against a local
stand-in of the chat-completions API (real HTTP, injected 429/500/dropped connections); resume;
bad input as one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import REPO, bolt
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_bolt.cli import main as bolt_main
from megatron_bolt.errors import UserError
from megatron_bolt.http_retry import retry_after as _retry_after
from megatron_bolt.latents.teachers import DEFAULT_PROMPT, DEFAULT_SYSTEM_PROMPT, OpenAITeacher
from megatron_bolt.latents.warmstart import run_warmstart
from megatron_bolt.stores.chunk_store import ChunkStore
from megatron_bolt.stores.latent_store import LatentStore
from megatron_bolt.tokenizer import load_tokenizer, train_bpe_tokenizer
from megatron_bolt.toy.world import make_documents, teacher_latent, write_jsonl

KEY = "sk-test-7f3a9c1e5b2d4f60a8c9e1d2"
MODEL = "stand-in-1"
TEMPLATE = "PREFIX<<{prefix}>>\nSUFFIX<<{suffix}>>\n"
SOL, EOL, PRIOR, POST = "<|START_OF_LATENT|>", "<|END_OF_LATENT|>", "<|PRIOR_PREFIX|>", "<|POSTERIOR_PREFIX|>"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Toy documents -> JSONL -> small BPE -> `bolt preprocess --chunk-store`."""
    d = tmp_path_factory.mktemp("toy")
    docs = make_documents(12, seed=3)
    data = write_jsonl(d / "docs.jsonl", [{"text": t} for t in docs])
    tok_dir = d / "tok"
    train_bpe_tokenizer([str(data)], 320, str(tok_dir))
    chunks = str(d / "chunks.zarr")
    rc = bolt_main(["preprocess", "--input", str(data), "--output-prefix", str(d / "raw"), "--tokenizer-model",
                    str(tok_dir), "--append-eod", "--chunk-store", chunks, "--no-progress"])
    assert rc == 0
    return {"docs": docs, "chunks": chunks, "tokenizer": str(tok_dir), "dir": d}


def chunk_texts(corpus) -> list[list[str]]:
    """Each document's chunks as text; checks they concatenate back to the original document."""
    cs, tok = ChunkStore.open(corpus["chunks"]), load_tokenizer(corpus["tokenizer"])
    out = []
    for d, doc in enumerate(corpus["docs"]):
        a, b = cs.doc_chunk_range(d)
        texts = [tok.decode(cs.chunk_tokens(i)) for i in range(a, b)]
        assert "".join(texts) == doc
        out.append(texts)
    return out


def stored_latents(path: str, tok) -> list[str]:
    store = LatentStore.open(path, mode="r")
    assert store.blocks_done() == set(range(store.num_blocks))
    out = []
    for i in range(store.num_chunks):
        rec = store.read_chunk(i)
        assert len(rec["latents"]) == 1 and rec["chosen"] == 0
        assert rec["log_q"].tolist() == rec["log_p"].tolist() == rec["log_w"].tolist() == [0.0]
        assert np.array_equal(rec["latents"][0], store.chosen_latent(i))
        out.append(tok.decode(rec["latents"][0]))
    return out


# ----------------------------------------------------------------------------------------- toy
def test_toy_teacher_end_to_end_into_merge(corpus, tmp_path, capsys):
    out = str(tmp_path / "lat.zarr")
    assert bolt_main(["warmstart", "--chunks", corpus["chunks"], "--out", out, "--teacher", "toy",
                      "--block-size", "8", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "bolt warmstart:" in err and "0 requests" in err
    tok = load_tokenizer(corpus["tokenizer"])
    got = stored_latents(out, tok)
    store = LatentStore.open(out, mode="r")
    assert store.attrs["engine"] == "teacher:toy" and store.attrs["prefix_chunks"] == 1 and store.samples == 1

    # Recomputed independently: the prefix is the previous chunk's text of the original document.
    i = 0
    for d, texts in enumerate(chunk_texts(corpus)):
        for j, x in enumerate(texts):
            assert got[i] == teacher_latent(texts[j - 1] if j else "", x), (d, j)
            i += 1
    assert i == len(got)
    assert any(z == "" for z in got) and any(z != "" for z in got)  # empty latents are stored too

    # bolt merge reads the store: every chunk in prior or posterior form with its latent.
    prefix = str(tmp_path / "merged")
    assert bolt_main(["merge", "--chunks", corpus["chunks"], "--latents", out, "--output-prefix", prefix,
                      "--quiet"]) == 0
    ds = IndexedDataset(f"{prefix}_text_document")
    merged = [tok.decode(ds[k].tolist()) for k in range(len(ds))]
    assert len(merged) == len(corpus["docs"])
    i = 0
    for doc, texts in zip(merged, chunk_texts(corpus)):
        forms = []
        for x in texts:
            z = got[i]
            forms.append(f"(?:{re.escape(SOL + PRIOR + z + EOL + x)}|{re.escape(SOL + EOL + x + SOL + POST + z + EOL)})")
            i += 1
        assert re.fullmatch("<s>" + "".join(forms) + "</s>", doc), doc


# ----------------------------------------------------------------------------------------- stand-in
def answer_for(prompt: str) -> str:
    """The stand-in's deterministic reply to a prompt: sometimes empty, sometimes with a special
    token spelled out (which warmstart must drop)."""
    h = hashlib.sha256(prompt.encode()).hexdigest()
    if h[0] in "01":
        return ""
    extra = f" {EOL}" if h[1] in "01234" else ""
    return f"  Thought {h[:6]}: {len(prompt)} chars, so {int(h[2:4], 16) % 10} + 1 = {(int(h[2:4], 16) + 1) % 10}.{extra}\n"


def cut_off(prompt: str) -> bool:
    """Whether the stand-in reports finish_reason "length" for this prompt."""
    return hashlib.sha256(prompt.encode()).hexdigest()[2] in "012"


class StandIn:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 with fault injection.

    faults: request number (1-based) -> "429" | "500" | "drop"; fail_after: once this many answers
    were given, every request gets HTTP 400 ("quota exhausted")."""

    def __init__(self, key: str = KEY, faults: dict[int, str] | None = None, fail_after: int | None = None,
                 retry_after: str = "1", delay_s: float = 0.0, model: str = MODEL) -> None:
        self.key, self.faults, self.fail_after, self.retry_after = key, faults or {}, fail_after, retry_after
        self.model = model
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.log: list[dict] = []  # one entry per request: n, time, prompt, status, body
        self.answers: dict[str, str] = {}
        self.answered = 0
        self.bad: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                outer.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def send(h, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def error(self, h, status: int, message: str, kind: str, headers: dict | None = None) -> None:
        self.send(h, status, {"error": {"message": message, "type": kind, "param": None, "code": None}}, headers)

    def handle(self, h) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self.lock:
            n = len(self.log) + 1
            entry = {"n": n, "time": time.monotonic(), "prompt": None, "status": None, "body": body}
            self.log.append(entry)
        if h.path != "/v1/chat/completions":
            entry["status"] = 404
            return self.error(h, 404, f"no route {h.path}", "invalid_request_error")
        if h.headers.get("Authorization") != f"Bearer {self.key}":
            entry["status"] = 401
            return self.error(h, 401, "Incorrect API key provided.", "invalid_request_error")
        msgs = body.get("messages")
        # An optional system message, then the user's prompt.
        ok = (body.get("model") == self.model and isinstance(msgs, list) and 1 <= len(msgs) <= 2
              and [m.get("role") for m in msgs] in (["user"], ["system", "user"])
              and all(isinstance(m.get("content"), str) for m in msgs)
              and body.get("temperature") == 0.7 and isinstance(body.get("max_tokens"), int))
        if not ok:
            self.bad.append(json.dumps(body)[:300])
            entry["status"] = 400
            return self.error(h, 400, "malformed request", "invalid_request_error")
        prompt = msgs[-1]["content"]
        entry["prompt"] = prompt
        fault = self.faults.get(n)
        if fault == "429":
            entry["status"] = 429
            return self.error(h, 429, "Rate limit reached", "requests", {"Retry-After": self.retry_after})
        if fault == "500":
            entry["status"] = 500
            return self.error(h, 500, "The server had an error", "server_error")
        if fault == "drop":
            entry["status"] = "drop"
            h.close_connection = True  # no status line at all: the client sees the connection drop
            return
        with self.lock:
            if self.fail_after is not None and self.answered >= self.fail_after:
                entry["status"] = 400
                return self.error(h, 400, "You exceeded your current quota.", "insufficient_quota")
            self.answered += 1
        time.sleep(self.delay_s)
        answer = answer_for(prompt)
        self.answers[prompt] = answer
        entry["status"] = 200
        self.send(h, 200, {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "length" if cut_off(prompt) else "stop"}],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(answer) // 4,
                      "total_tokens": (len(prompt) + len(answer)) // 4},
        })

    def answered_prompts(self) -> list[str]:
        return [e["prompt"] for e in self.log if e["status"] == 200]


def expected_latent(template: str, prefix: str, x: str, tok) -> str:
    """What the store must hold for a chunk: the server's answer to exactly this prompt, stripped,
    spelled-out special tokens removed."""
    prompt = template.replace("{prefix}", prefix or "N/A").replace("{suffix}", x)
    return answer_for(prompt).strip().replace(EOL, "")


def expected_latents(corpus, template: str, tok) -> list[str]:
    return [expected_latent(template, texts[j - 1] if j else "", x, tok)
            for texts in chunk_texts(corpus) for j, x in enumerate(texts)]


@pytest.mark.slow
def test_openai_teacher_over_http_with_faults(corpus, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(TEMPLATE)
    out = str(tmp_path / "lat.zarr")
    with StandIn(faults={1: "429", 3: "500", 5: "drop"}) as server:
        proc = bolt("warmstart", "--chunks", corpus["chunks"], "--out", out, "--teacher", "openai",
                    "--base-url", server.url, "--model", MODEL, "--prompt-file", str(prompt_file),
                    "--block-size", "8", "--concurrency", "3", "--retry-backoff", "0.05", "--max-retries", "3",
                    env={"OPENAI_API_KEY": KEY}, timeout=120)
    assert not server.bad
    tok = load_tokenizer(corpus["tokenizer"])
    got = stored_latents(out, tok)
    want = expected_latents(corpus, TEMPLATE, tok)
    assert got == want
    # every stored latent is what the server answered for that chunk's prompt (each prompt once)
    assert sorted(server.answered_prompts()) == sorted(set(server.answered_prompts()))
    assert len(server.answered_prompts()) == len(got)
    assert any(z == "" for z in got) and any(EOL in a for a in server.answers.values())
    # the three faults were retried; the 429's Retry-After (1 s) was honoured, not the 0.05 s backoff
    statuses = [e["status"] for e in server.log]
    assert statuses.count(429) == statuses.count(500) == statuses.count("drop") == 1
    assert len(server.log) == len(got) + 3
    first = server.log[0]
    again = next(e for e in server.log[1:] if e["prompt"] == first["prompt"])
    assert again["time"] - first["time"] >= 0.9
    cut = sum(cut_off(p) for p in server.answered_prompts())
    assert cut and f"{len(got) + 3} requests, 3 retries, {cut} answers cut at max tokens" in proc.stderr
    assert f"{len(got)} chunks" in proc.stderr
    store = LatentStore.open(out, mode="r")
    assert store.attrs["engine"] == "teacher:openai" and store.attrs["model"] == MODEL
    assert KEY not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_openai_teacher_sends_the_reference_request(corpus, tmp_path):
    """Without --model, --prompt-file or decoding flags the request is the reference's: the pinned
    gpt-4o-mini, a system message, the prompt with "N/A" for a first chunk's empty prefix, the
    previous chunk as the prefix otherwise, temperature 0.7, max_tokens 6000."""
    out = str(tmp_path / "lat.zarr")
    env = {"OPENAI_API_KEY": KEY, "OPENAI_MODEL": "", "OPENAI_BASE_URL": ""}
    with StandIn(model="gpt-4o-mini-2024-07-18") as server:
        bolt("warmstart", "--chunks", corpus["chunks"], "--out", out, "--teacher", "openai",
             "--base-url", server.url, "--block-size", "64", "--quiet", env=env, timeout=120)
    assert not server.bad
    texts = chunk_texts(corpus)
    bodies = {e["prompt"]: e["body"] for e in server.log if e["status"] == 200}
    assert len(bodies) == sum(map(len, texts))
    for doc in texts:
        for j, x in enumerate(doc):
            prompt = DEFAULT_PROMPT.replace("{prefix}", doc[j - 1] if j else "N/A").replace("{suffix}", x)
            body = bodies[prompt]
            assert body["messages"] == [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                        {"role": "user", "content": prompt}]
            assert (body["temperature"], body["max_tokens"]) == (0.7, 6000)
    assert "background knowledge" in DEFAULT_PROMPT and "step by step" in DEFAULT_PROMPT
    assert stored_latents(out, load_tokenizer(corpus["tokenizer"])) == expected_latents(corpus, DEFAULT_PROMPT, None)


@pytest.mark.slow
def test_resume_after_failure_redoes_no_block(corpus, tmp_path):
    tok = load_tokenizer(corpus["tokenizer"])
    num_chunks = ChunkStore.open(corpus["chunks"]).num_chunks
    interrupted = str(tmp_path / "interrupted.zarr")
    with StandIn(fail_after=10) as server:  # blocks 0-1 (8 chunks) complete, block 2 fails part-way
        proc = bolt("warmstart", "--chunks", corpus["chunks"], "--out", interrupted, "--teacher", "openai",
                    "--base-url", server.url, "--model", MODEL, "--block-size", "4", "--concurrency", "1",
                    "--quiet", env={"OPENAI_API_KEY": KEY}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "HTTP 400" in lines[0] and "You exceeded your current quota." in lines[0] and "2 blocks written" in lines[0]
    assert KEY not in proc.stdout + proc.stderr
    assert LatentStore.open(interrupted, mode="r").blocks_done() == {0, 1}

    def teacher(url: str, **kw) -> OpenAITeacher:
        return OpenAITeacher(url, MODEL, KEY, concurrency=2, backoff_s=0.05, **kw)

    with StandIn() as server:
        t = teacher(server.url)
        summary = run_warmstart(corpus["chunks"], interrupted, t, block_size=4, progress=False)
        t.close()
        assert summary.requests == len(server.log) == num_chunks - 8  # blocks 0 and 1 not asked again
        assert summary.skipped_blocks == 2 and summary.chunks == num_chunks - 8

    with StandIn() as server:
        t = teacher(server.url, requests_per_minute=3000)  # 20 ms apart
        summary = run_warmstart(corpus["chunks"], str(tmp_path / "whole.zarr"), t, block_size=4, progress=False)
        t.close()
        times = [e["time"] for e in server.log]
        assert times[-1] - times[0] >= 0.9 * 0.02 * (len(times) - 1)
    assert summary.requests == num_chunks and summary.retries == 0
    resumed, whole = stored_latents(interrupted, tok), stored_latents(str(tmp_path / "whole.zarr"), tok)
    assert resumed == whole == expected_latents(corpus, DEFAULT_PROMPT, tok)
    # the default prompt carries both texts
    assert "SUFFIX:\n" in server.log[0]["prompt"]


@pytest.mark.slow
def test_resume_after_kill(corpus, tmp_path):
    """SIGKILL part-way through a block: the re-run redoes only unfinished blocks, and the store
    ends up as an uninterrupted run's."""
    tok = load_tokenizer(corpus["tokenizer"])
    num_chunks = ChunkStore.open(corpus["chunks"]).num_chunks
    out = str(tmp_path / "lat.zarr")
    with StandIn(delay_s=0.05) as server:
        cmd = [sys.executable, "-m", "megatron_bolt", "warmstart", "--chunks", corpus["chunks"], "--out", out,
               "--teacher", "openai", "--base-url", server.url, "--model", MODEL, "--block-size", "4",
               "--concurrency", "1", "--quiet"]
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OPENAI_API_KEY": KEY},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if len(LatentStore.open(out, mode="r").blocks_done()) >= 2:
                        break
                except (UserError, KeyError, FileNotFoundError):
                    pass  # not created yet, or being created
                time.sleep(0.02)
            time.sleep(0.1)  # into the next block
        finally:
            proc.kill()
            proc.wait()
    done = LatentStore.open(out, mode="r").blocks_done()
    finished_chunks = sum(len(LatentStore.open(out, mode="r").block_range(b)) for b in done)
    assert 2 <= len(done) and finished_chunks < num_chunks
    with StandIn() as server:
        t = OpenAITeacher(server.url, MODEL, KEY, concurrency=2)
        summary = run_warmstart(corpus["chunks"], out, t, block_size=4, progress=False)
        t.close()
    assert summary.requests == len(server.log) == num_chunks - finished_chunks
    assert stored_latents(out, tok) == expected_latents(corpus, DEFAULT_PROMPT, tok)


def test_sharded_runs_fill_one_store(corpus, tmp_path):
    out = str(tmp_path / "lat.zarr")
    for shard in ("1/2", "0/2"):
        assert bolt_main(["warmstart", "--chunks", corpus["chunks"], "--out", out, "--teacher", "toy",
                          "--block-size", "4", "--shard", shard, "--quiet"]) == 0
        done = LatentStore.open(out, mode="r").blocks_done()
        if shard == "1/2":
            assert done and all(b % 2 == 1 for b in done)
    tok = load_tokenizer(corpus["tokenizer"])
    assert stored_latents(out, tok) == [teacher_latent(t[j - 1] if j else "", x)
                                        for t in chunk_texts(corpus) for j, x in enumerate(t)]


# ----------------------------------------------------------------------------------------- bad input
def one_line_error(capsys, argv: list[str]) -> str:
    assert bolt_main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bolt warmstart: error: "), cap.err
    assert KEY not in cap.out + cap.err
    return lines[0]


def test_bad_input_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "lat.zarr")
    base = ["warmstart", "--chunks", corpus["chunks"], "--out", out, "--quiet"]
    line = one_line_error(capsys, ["warmstart", "--chunks", str(tmp_path / "nope.zarr"), "--out", out,
                                   "--teacher", "toy"])
    assert "nope.zarr: no chunk store there" in line

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    line = one_line_error(capsys, [*base, "--teacher", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", MODEL])
    assert "OPENAI_API_KEY is not set" in line
    monkeypatch.setenv("MY_KEY", KEY)

    with StandIn(key="sk-the-right-one") as server:
        line = one_line_error(capsys, [*base, "--teacher", "openai", "--base-url", server.url, "--model", MODEL,
                                       "--api-key-env", "MY_KEY", "--concurrency", "1"])
    assert "HTTP 401" in line and "Incorrect API key provided." in line
    assert len(server.log) == 1  # a 401 is not retried, and nothing more is sent
    with StandIn(key="sk-the-right-one") as server:  # 8 threads: the 401 is reported, not a stopped thread
        line = one_line_error(capsys, [*base, "--teacher", "openai", "--base-url", server.url, "--model", MODEL,
                                       "--api-key-env", "MY_KEY", "--concurrency", "8"])
    assert "HTTP 401" in line and 1 <= len(server.log) <= 8

    (tmp_path / "p.txt").write_text("no placeholders here")
    line = one_line_error(capsys, [*base, "--teacher", "openai", "--model", MODEL, "--api-key-env", "MY_KEY",
                                   "--prompt-file", str(tmp_path / "p.txt")])
    assert "p.txt" in line and "{suffix}" in line

    line = one_line_error(capsys, [*base, "--teacher", "toy", "--shard", "2/2"])
    assert "--shard" in line
    # the run that got the 401 created the store: it resumes only with the same settings and teacher
    line = one_line_error(capsys, [*base, "--teacher", "toy"])
    assert "teacher:openai" in line and "teacher:toy" in line
    line = one_line_error(capsys, [*base, "--teacher", "toy", "--prefix-chunks", "3"])
    assert "prefix_chunks=1" in line and "prefix_chunks=3" in line
    line = one_line_error(capsys, [*base, "--teacher", "toy", "--tokenizer", str(tmp_path)])
    assert str(tmp_path) in line


def test_teacher_repr_and_retry_after():
    t = OpenAITeacher("http://127.0.0.1:9/v1", MODEL, KEY)
    assert KEY not in repr(t) and KEY not in str(vars(t))
    t.close()
    assert _retry_after("3") == 3.0 and _retry_after(None) is None and _retry_after("soon") is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < _retry_after(date) <= 31

"""Local engine vs a plain transformers forward pass, `bolt serve` protocol, and the SGLang client."""

from __future__ import annotations

import threading

import pytest
import requests
import torch
from conftest import tiny_llama as tiny_model
from transformers import LlamaForCausalLM

from megatron_bolt.inference.base import derive_seed
from megatron_bolt.inference.local import LocalEngine
from megatron_bolt.inference.sglang import SGLangEngine
from megatron_bolt.inference.sglang_standin import make_server

VOCAB = 48
STOP = [3, 17, 29]  # several stop ids so that samples end at different lengths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def reference(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


PROMPTS = [[0, 5, 6, 7, 8, 9], [0, 11], [0, 20, 21, 22, 23, 24, 25, 26, 27, 28, 30], [0, 40, 41]]


def forward_logprobs(ref, prompt: list[int], cont: list[int]) -> list[float]:
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([prompt + cont])).logits[0].float(), -1)
    return [lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(cont)]


def test_local_sample_logprobs_match_forward(model_dir, reference):
    eng = LocalEngine(model_dir)
    out = eng.sample(PROMPTS, n=3, max_new_tokens=24, stop=STOP, seed=7)
    assert [len(s) for s in out] == [3] * len(PROMPTS)
    lengths = set()
    for prompt, samples in zip(PROMPTS, out):
        for s in samples:
            assert 1 <= len(s.tokens) <= 24 and len(s.logprobs) == len(s.tokens)
            assert s.finished == (s.tokens[-1] in STOP)
            assert not any(t in STOP for t in s.tokens[:-1])
            ref = forward_logprobs(reference, prompt, s.tokens)
            assert max(abs(a - b) for a, b in zip(ref, s.logprobs)) < 1e-3
            lengths.add(len(s.tokens))
    assert len(lengths) > 2, "samples should stop at different lengths (exercises row pruning)"


def test_local_score_matches_forward(model_dir, reference):
    eng = LocalEngine(model_dir, max_batch_rows=3)
    conts = [[4, 5, 6], [7], [8, 9, 10, 11, 12, 13, 14], []]
    got = eng.score(PROMPTS, conts)
    for p, c, g in zip(PROMPTS, conts, got):
        assert abs(sum(forward_logprobs(reference, p, c)) - g) < 1e-3


def test_local_sampling_is_seeded_and_batch_independent(model_dir):
    eng = LocalEngine(model_dir, max_batch_rows=5)
    a = eng.sample(PROMPTS, 2, 16, STOP, seed=3)
    b = eng.sample(PROMPTS, 2, 16, STOP, seed=3)
    c = eng.sample(PROMPTS, 2, 16, STOP, seed=4)
    toks = lambda res: [[s.tokens for s in ss] for ss in res]  # noqa: E731
    assert toks(a) == toks(b) and toks(a) != toks(c)
    # prompt 2 alone, with the seed it had in the batch, draws the same samples
    alone = eng.sample([PROMPTS[2]], 2, 16, STOP, seed=[derive_seed(3, 2)])
    assert toks(alone)[0] == toks(a)[2]


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    order = torch.argsort(expected)
    # merge the smallest bins until each has >= 5 expected counts
    obs_b, exp_b, o, e = [], [], 0.0, 0.0
    for i in order.tolist():
        o, e = o + counts[i].item(), e + expected[i].item()
        if e >= 5:
            obs_b.append(o)
            exp_b.append(e)
            o, e = 0.0, 0.0
    if e > 0:
        obs_b[-1] += o
        exp_b[-1] += e
    obs_t, exp_t = torch.tensor(obs_b, dtype=torch.float64), torch.tensor(exp_b, dtype=torch.float64)
    stat = ((obs_t - exp_t) ** 2 / exp_t).sum()
    df = len(obs_b) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def test_local_sampling_is_untempered(model_dir, reference):
    """First-token frequencies over many seeds match softmax(logits) at temperature 1."""
    eng = LocalEngine(model_dir, max_batch_rows=512)
    prompt = PROMPTS[0]
    out = eng.sample([prompt], n=3000, max_new_tokens=1, stop=[], seed=11)[0]
    counts = torch.bincount(torch.tensor([s.tokens[0] for s in out]), minlength=VOCAB).double()
    with torch.no_grad():
        probs = torch.softmax(reference(torch.tensor([prompt])).logits[0, -1].double(), -1)
    assert chi_square_pvalue(counts, probs) > 1e-3
    # and the same frequencies are far from a tempered distribution (the test can fail)
    tempered = torch.softmax(reference(torch.tensor([prompt])).logits[0, -1].double() / 0.7, -1).detach()
    assert chi_square_pvalue(counts, tempered) < 1e-6


@pytest.fixture(scope="module")
def servers(model_dir):
    started = []
    for _ in range(2):
        server, batcher = make_server(model_dir, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append((server, batcher))
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s, _ in started]
    for s, b in started:
        s.shutdown()
        s.server_close()
        b.stop()


def test_serve_generate_protocol(servers, reference):
    url = servers[0]
    prompt = PROMPTS[0]
    body = requests.post(f"{url}/generate", json={
        "input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "max_new_tokens": 5,
                            "stop_token_ids": STOP, "ignore_eos": True, "sampling_seed": 5},
    }, timeout=60).json()
    meta = body["meta_info"]
    assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == len(body["output_ids"])
    inp = meta["input_token_logprobs"]
    assert [e[1] for e in inp] == prompt and inp[0][0] is None and all(e[2] is None for e in inp)
    ref = forward_logprobs(reference, prompt[:1], prompt[1:])
    assert max(abs(a - e[0]) for a, e in zip(ref, inp[1:])) < 1e-3
    out = meta["output_token_logprobs"]
    assert [e[1] for e in out] == body["output_ids"]
    ref_out = forward_logprobs(reference, prompt, body["output_ids"])
    assert max(abs(a - e[0]) for a, e in zip(ref_out, out)) < 1e-3
    fr = meta["finish_reason"]
    if body["output_ids"][-1] in STOP:
        assert fr == {"type": "stop", "matched": body["output_ids"][-1]}
    else:
        assert fr == {"type": "length", "length": 5}
    # batch form, logprob_start_len > 0: entries from that token on, the first one null
    batch = requests.post(f"{url}/generate", json={
        "input_ids": [prompt, PROMPTS[2]], "return_logprob": True, "logprob_start_len": 3,
        "sampling_params": {"max_new_tokens": 2, "ignore_eos": True},
    }, timeout=60).json()
    assert isinstance(batch, list) and len(batch) == 2
    inp = batch[1]["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in inp] == PROMPTS[2][3:] and inp[0][0] is None
    ref = forward_logprobs(reference, PROMPTS[2][:4], PROMPTS[2][4:])
    assert max(abs(a - e[0]) for a, e in zip(ref, inp[1:])) < 1e-3
    # default logprob_start_len (-1): only the last prompt token, null
    last = requests.post(f"{url}/generate", json={"input_ids": prompt, "return_logprob": True,
                                                    "sampling_params": {"max_new_tokens": 1}}, timeout=60).json()
    assert last["meta_info"]["input_token_logprobs"] == [[None, prompt[-1], None]]
    # tempered or filtered sampling is refused, not silently changed
    r = requests.post(f"{url}/generate", json={"input_ids": prompt, "sampling_params": {"temperature": 0.7}}, timeout=60)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert requests.get(f"{url}/health_generate", timeout=30).status_code == 200
    assert requests.get(f"{url}/get_model_info", timeout=10).json()["is_generation"] is True
    assert requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["object"] == "model"


def test_sglang_engine_matches_local(servers, model_dir):
    local = LocalEngine(model_dir)
    client = SGLangEngine(servers, concurrency=8)
    try:
        a = local.sample(PROMPTS, 3, 20, STOP, seed=9)
        b = client.sample(PROMPTS, 3, 20, STOP, seed=9)
        for sa, sb in zip(a, b):
            for x, y in zip(sa, sb):
                assert x.tokens == y.tokens and x.finished == y.finished
                assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-3
        conts = [s[0].tokens for s in a]
        sl, sc = local.score(PROMPTS, conts), client.score(PROMPTS, conts)
        assert max(abs(p - q) for p, q in zip(sl, sc)) < 1e-3
    finally:
        client.close()


def test_sglang_engine_skips_dead_server(servers, model_dir):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = SGLangEngine([dead, servers[0]], concurrency=4, backoff_s=0.01, cooldown_s=60)
    try:
        out = client.sample(PROMPTS, 2, 8, STOP, seed=1)
        assert all(len(s) == 2 for s in out)
        assert client.pool.healthy() == [servers[0]]
    finally:
        client.close()

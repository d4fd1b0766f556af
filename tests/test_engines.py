"""Local engine vs a plain transformers forward pass, `bolt serve` protocol and SGLang's rules, and the
SGLang client against them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import requests
import torch
from conftest import tiny_llama as tiny_model
from transformers import LlamaForCausalLM

from megatron_bolt.inference.base import derive_seed
from megatron_bolt.inference.local import LocalEngine
from megatron_bolt.inference.sglang import PoolOptions, SGLangEngine
from megatron_bolt.inference.sglang_standin import make_server

VOCAB = 48
STOP = [3, 17, 29]  # several stop ids so that samples end at different lengths
EOS = 1  # the tiny model's eos_token_id: SGLang stops on it unless ignore_eos


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


def test_lean_llama_logprobs_match_transformers_forward(model_dir, reference):
    """The engine's own Llama forward (fused projections, prompt keys shared by a prompt's samples)
    gives transformers' log-probs to float32 rounding, for sampled, scored and prompt tokens."""
    eng = LocalEngine(model_dir)
    assert eng._lean is not None, "a LlamaForCausalLM export should take the lean path"
    out = eng.sample(PROMPTS, n=3, max_new_tokens=20, stop=STOP, seed=5)
    for prompt, samples in zip(PROMPTS, out):
        for s in samples:
            ref = forward_logprobs(reference, prompt, s.tokens)
            assert max(abs(a - b) for a, b in zip(ref, s.logprobs)) < 1e-5
    conts = [s.tokens for ss in out for s in ss]
    prompts = [p for p in PROMPTS for _ in range(3)]
    for p, c, g in zip(prompts, conts, eng.score(prompts, conts)):
        assert abs(sum(forward_logprobs(reference, p, c)) - g) < 1e-4
    rows = eng.generate_rows(PROMPTS, [1] * 4, 4, STOP, input_logprob_start=[0, None, 3, 1])
    for p, s, r in zip(PROMPTS, [0, None, 3, 1], rows):
        if s is not None:
            ref = forward_logprobs(reference, p[: s + 1], p[s + 1 :])
            assert len(r.input_logprobs) == len(ref) and max(abs(a - b) for a, b in zip(ref, r.input_logprobs)) < 1e-5


@pytest.mark.parametrize("lean", [True, False])
def test_scoring_a_few_rows_at_a_time_gives_the_same_sums(model_dir, reference, monkeypatch, lean):
    """Scoring computes the continuation log-probs a slice of rows at a time; slices of one row
    and of the whole batch give the same sums, and both are transformers' (both forward paths)."""
    import megatron_bolt.inference.local as local

    eng = LocalEngine(model_dir, lean=lean)
    prompts = [p for p in PROMPTS for _ in range(3)]
    conts = [[(7 * i + j) % 40 + 4 for j in range(2 + i % 5)] for i in range(len(prompts))]
    whole = eng.score(prompts, conts)
    monkeypatch.setattr(local, "_LOGPROB_CHUNK_ELEMENTS", 1)
    assert eng.score(prompts, conts) == whole
    for p, c, g in zip(prompts, conts, whole):
        assert abs(sum(forward_logprobs(reference, p, c)) - g) < 1e-4


def test_scoring_batches_end_where_a_prompt_begins(model_dir, monkeypatch):
    """With a small bound on positions per forward, scoring runs in many batches; a full batch ends
    at a prompt boundary, so every prompt's rows are scored (and its prompt prefilled) in one batch,
    and the scores are those of one big batch."""
    eng = LocalEngine(model_dir)
    prompts = [p for p in PROMPTS for _ in range(3)]
    conts = [[(3 * i + j) % 40 + 4 for j in range(4 + i % 3)] for i in range(len(prompts))]
    whole = eng.score(prompts, conts)
    batches = []
    score_batch = eng._score_batch
    monkeypatch.setattr(eng, "_score_batch", lambda p, c, idx, out: (batches.append(list(idx)),
                                                                       score_batch(p, c, idx, out)))
    eng.max_batch_tokens = 30  # 5 rows of up to 6 positions: a second prompt's third row does not fit
    assert eng.score(prompts, conts) == pytest.approx(whole, abs=1e-5)
    assert len(batches) > 1 and sorted(i for b in batches for i in b) == list(range(len(prompts)))
    for b in batches:
        assert len(b) * max(len(conts[i]) for i in b) <= 30
    for k in range(len(PROMPTS)):
        rows = set(range(3 * k, 3 * k + 3))
        assert sum(bool(rows & set(b)) for b in batches) == 1, f"prompt {k}'s rows were split"


def test_lean_rope_per_call_equals_the_table(model_dir, reference, monkeypatch):
    """cos/sin from the per-cache table (static RoPE) or per call (RoPE types whose frequencies
    depend on the length) give the same tokens and transformers' log-probs."""
    import megatron_bolt.inference.lean_llama as lean_llama

    table = LocalEngine(model_dir).sample(PROMPTS, n=2, max_new_tokens=12, stop=STOP, seed=4)
    monkeypatch.setattr(lean_llama, "_LENGTH_DEPENDENT_ROPE", ("default",))
    eng = LocalEngine(model_dir)
    per_call = eng.sample(PROMPTS, n=2, max_new_tokens=12, stop=STOP, seed=4)
    assert eng._lean is not None and eng._lean._rope_table is None
    assert [[s.tokens for s in ss] for ss in per_call] == [[s.tokens for s in ss] for ss in table]
    for prompt, samples in zip(PROMPTS, per_call):
        for s in samples:
            assert max(abs(a - b) for a, b in zip(forward_logprobs(reference, prompt, s.tokens), s.logprobs)) < 1e-5


def test_lean_attention_and_mlp_in_blocks_match_forward(model_dir, reference, monkeypatch):
    """Multi-token passes attend a block of queries at a time over the keys up to the block's end,
    and run the MLP a slice of token rows at a time (blocks of 3 and 5 here, so prompts, scored
    continuations and prompt log-probs span several): the same log-probs as transformers' forward,
    and as one block."""
    import megatron_bolt.inference.lean_llama as lean_llama

    eng = LocalEngine(model_dir)
    prompts = [p for p in PROMPTS for _ in range(2)]
    conts = [[(5 * i + j) % 40 + 4 for j in range(3 + 2 * i)] for i in range(len(prompts))]
    whole = eng.score(prompts, conts)
    rows = eng.generate_rows(PROMPTS, [1] * 4, 2, STOP, input_logprob_start=[0, 0, 1, 0])
    monkeypatch.setattr(lean_llama, "_QUERY_BLOCK", 3)
    monkeypatch.setattr(lean_llama, "_MLP_ROWS", 5)
    assert eng.score(prompts, conts) == pytest.approx(whole, abs=1e-5)
    for p, c, g in zip(prompts, conts, eng.score(prompts, conts)):
        assert abs(sum(forward_logprobs(reference, p, c)) - g) < 1e-4
    for p, s, r, r1 in zip(PROMPTS, [0, 0, 1, 0], eng.generate_rows(PROMPTS, [1] * 4, 2, STOP,
                                                                     input_logprob_start=[0, 0, 1, 0]), rows):
        ref = forward_logprobs(reference, p[: s + 1], p[s + 1 :])
        assert max(abs(a - b) for a, b in zip(ref, r.input_logprobs)) < 1e-5
        assert r.tokens == r1.tokens


def test_decode_attention_gathered_and_reshaped_layouts_agree(model_dir, monkeypatch):
    """While every prompt has as many live rows, decode attention regroups rows by reshapes; once
    rows end unevenly it gathers them into per-prompt slots. Forcing the gathering path throughout
    changes no token and no log-prob beyond float rounding, with and without rows ending early."""
    import megatron_bolt.inference.lean_llama as lean_llama

    eng = LocalEngine(model_dir)
    attend, slots = lean_llama.KVCache.decode_attention, lean_llama.KVCache._slots
    seen = set()

    def recording(self, *args):
        seen.add(self.uniform)
        return attend(self, *args)

    monkeypatch.setattr(lean_llama.KVCache, "decode_attention", recording)
    runs = [(stop, eng.sample(PROMPTS, n=4, max_new_tokens=20, stop=stop, seed=13)) for stop in ([], STOP)]
    assert seen == {True, False}, "both layouts should have been used"

    def gathered(self):
        slots(self)
        self.uniform = False

    monkeypatch.setattr(lean_llama.KVCache, "_slots", gathered)
    for stop, fast in runs:
        slow = eng.sample(PROMPTS, n=4, max_new_tokens=20, stop=stop, seed=13)
        assert [[s.tokens for s in ss] for ss in slow] == [[s.tokens for s in ss] for ss in fast]
        for ss, tt in zip(slow, fast):
            for s, t in zip(ss, tt):
                assert max(abs(x - y) for x, y in zip(s.logprobs, t.logprobs)) < 1e-5


def test_lean_llama_plain_linear_path_matches_forward(model_dir, reference, monkeypatch):
    """The kernels a GPU gets (F.linear over the fused weights, which the modules then view): the
    same log-probs, and transformers' own forward over the re-bound module weights is unchanged."""
    import megatron_bolt.inference.lean_llama as lean_llama

    monkeypatch.setattr(lean_llama, "_cpu_packed_linear", lambda *a: None)
    eng = LocalEngine(model_dir)
    for prompt, samples in zip(PROMPTS, eng.sample(PROMPTS, n=2, max_new_tokens=12, stop=STOP, seed=9)):
        for s in samples:
            ref = forward_logprobs(reference, prompt, s.tokens)
            assert max(abs(a - b) for a, b in zip(ref, s.logprobs)) < 1e-5
            assert forward_logprobs(eng.model, prompt, s.tokens) == pytest.approx(ref, abs=1e-6)


def test_lean_and_transformers_paths_give_the_same_tokens(model_dir):
    """Same seeds, same samples whichever forward runs them: rows of different prompt lengths, fanned
    out, stopping at different steps (whole prompts' rows ending compacts the shared prompt keys)."""
    lean, plain = LocalEngine(model_dir, max_batch_rows=7), LocalEngine(model_dir, max_batch_rows=7, lean=False)
    assert lean._lean is not None and plain._lean is None
    many = PROMPTS + [[0, 4 + i, 9 + 2 * i, 13][: 2 + i % 3] for i in range(5)]
    a, b = lean.sample(many, 4, 24, STOP, seed=21), plain.sample(many, 4, 24, STOP, seed=21)
    assert [[s.tokens for s in ss] for ss in a] == [[s.tokens for s in ss] for ss in b]
    assert len({len(s.tokens) for ss in a for s in ss}) > 3
    for ss, tt in zip(a, b):
        for s, t in zip(ss, tt):
            assert max(abs(x - y) for x, y in zip(s.logprobs, t.logprobs)) < 1e-5
    assert [r.tokens for r in lean.generate_greedy(many, 12, STOP)] == \
        [r.tokens for r in plain.generate_greedy(many, 12, STOP)]


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


def test_local_batch_composition_changes_a_sample_only_at_a_cdf_boundary(model_dir, reference):
    """What base.py promises: a row draws the same uniforms in any batch, so its sample can differ
    between batch layouts only where a draw lies within float rounding of a CDF boundary."""
    from megatron_bolt.inference.base import sample_seed, step_uniforms

    many = [[0, 4 + i % 40, 5 + (7 * i) % 37, 6 + i % 11][: 2 + i % 3] for i in range(8)]  # padding varies
    layouts = [LocalEngine(model_dir, max_batch_rows=r).sample(many, 3, 16, STOP, seed=8) for r in (2, 5, 24)]
    assert layouts[2] == LocalEngine(model_dir, max_batch_rows=24).sample(many, 3, 16, STOP, seed=8)  # same call
    boundary_hits = 0
    for i, prompt in enumerate(many):
        for j in range(3):
            ref = layouts[0][i][j].tokens
            for other in (layouts[1][i][j].tokens, layouts[2][i][j].tokens):
                if other == ref:
                    continue
                t = next(k for k, (a, b) in enumerate(zip(ref, other)) if a != b)
                with torch.no_grad():
                    logits = reference(torch.tensor([prompt + ref[:t]])).logits[0, -1].double()
                cdf = torch.softmax(logits, -1).cumsum(-1)
                seed = np.array([sample_seed(derive_seed(8, i), j) & ((1 << 64) - 1)], dtype=np.uint64)
                target = float(step_uniforms(seed, t)[0]) * float(cdf[-1])
                lo, hi = sorted((ref[t], other[t]))
                assert min(abs(target - float(cdf[k])) for k in range(lo, hi)) < 1e-5, (i, j, t)
                boundary_hits += 1
    assert boundary_hits <= 4, "more than rounding: rows should almost never change with the layout"


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


def start_servers(model_dir, n: int, **kwargs):
    started = []
    for _ in range(n):
        server, batcher = make_server(model_dir, "127.0.0.1", 0, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append((server, batcher))
    return started, [f"http://127.0.0.1:{s.server_address[1]}" for s, _ in started]


def stop_servers(started) -> None:
    for s, b in started:
        s.shutdown()
        s.server_close()
        b.stop()


@pytest.fixture(scope="module")
def servers(model_dir):
    """Two stand-ins with --enable-deterministic-inference (seeds honoured)."""
    started, urls = start_servers(model_dir, 2, deterministic=True)
    yield urls
    stop_servers(started)


@pytest.fixture(scope="module")
def plain_server(model_dir):
    """A stand-in started as SGLang is by default: no deterministic inference, context 32."""
    started, urls = start_servers(model_dir, 1, context_length=32)
    yield urls[0]
    stop_servers(started)


def generate(url, prompt, **sp):
    return requests.post(f"{url}/generate", json={"input_ids": prompt, "sampling_params": sp}, timeout=60)


def test_serve_generate_protocol(servers, reference):
    url = servers[0]
    prompt = PROMPTS[0]
    body = requests.post(f"{url}/generate", json={
        "input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "max_new_tokens": 5,
                            "stop_token_ids": STOP, "sampling_seed": 5},
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
    if body["output_ids"][-1] in STOP + [EOS]:
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


def test_standin_ignore_eos_disables_stop_token_ids(servers):
    """SGLang's Req._check_token_based_finish: ignore_eos returns before stop_token_ids are looked at."""
    prompt = PROMPTS[0]
    ran = generate(servers[0], prompt, max_new_tokens=60, stop_token_ids=STOP, ignore_eos=True, sampling_seed=2).json()
    assert ran["meta_info"]["finish_reason"] == {"type": "length", "length": 60}
    assert any(t in STOP for t in ran["output_ids"][:-1]), "the stop ids occur, and did not stop it"
    stopped = generate(servers[0], prompt, max_new_tokens=60, stop_token_ids=STOP, sampling_seed=2).json()
    first = next(i for i, t in enumerate(ran["output_ids"]) if t in STOP + [EOS])
    assert stopped["output_ids"] == ran["output_ids"][: first + 1]  # same seed: the same tokens, up to the stop
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": ran["output_ids"][first]}


def test_standin_stops_on_eos_without_ignore_eos(servers):
    """Without ignore_eos the model's EOS ends a request even when it is not in stop_token_ids."""
    ends = set()
    for seed in range(40):
        body = generate(servers[0], PROMPTS[1], max_new_tokens=30, stop_token_ids=[], sampling_seed=seed).json()
        out = body["output_ids"]
        assert EOS not in out[:-1]
        if out[-1] == EOS:
            ends.add(body["meta_info"]["finish_reason"]["matched"])
    assert ends == {EOS}


def test_standin_sampling_seed_needs_deterministic_inference(servers, plain_server):
    """SamplingBatchInfo.from_schedule_batch builds the seed tensor only with --enable-deterministic-inference."""
    sp = dict(max_new_tokens=20, sampling_seed=123, ignore_eos=True)  # 6 + 20 fits the context of 32
    det = [generate(servers[0], PROMPTS[0], **sp).json()["output_ids"] for _ in range(2)]
    det.append(generate(servers[1], PROMPTS[0], **sp).json()["output_ids"])
    assert det[0] == det[1] == det[2]
    plain = [generate(plain_server, PROMPTS[0], **sp).json()["output_ids"] for _ in range(2)]
    assert plain[0] != plain[1] and det[0] not in plain
    info = requests.get(f"{plain_server}/server_info", timeout=10).json()
    assert info["enable_deterministic_inference"] is False
    assert requests.get(f"{servers[0]}/server_info", timeout=10).json()["enable_deterministic_inference"] is True


def test_standin_clips_high_ids_in_input_logprobs(servers, reference):
    """SchedulerLogprobResultProcessor._process_input_token_logprobs reports ids >= vocab_size-1 as 0."""
    prompt = [0, 5, VOCAB - 1, 7, VOCAB - 2, VOCAB - 1]
    body = requests.post(f"{servers[0]}/generate", json={
        "input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 0}}, timeout=60).json()
    inp = body["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in inp] == [0, 5, 0, 7, VOCAB - 2, 0]
    ref = forward_logprobs(reference, prompt[:1], prompt[1:])  # the values are those of the real ids
    assert max(abs(a - e[0]) for a, e in zip(ref, inp[1:])) < 1e-3


def test_standin_length_rules(plain_server):
    """TokenizerManager._validate_one_request, then the scheduler's validate_input_length and
    init_req_max_new_tokens, at context 32 (max_req_len 31, max_req_input_len 26)."""
    info = requests.get(f"{plain_server}/server_info", timeout=10).json()
    assert (info["context_length"], info["max_req_len"], info["max_req_input_len"]) == (32, 31, 26)
    r = generate(plain_server, [0] + [5] * 31, max_new_tokens=0)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "The input (32 tokens) is longer than the model's context length (32 tokens)."
    r = generate(plain_server, [0] + [5] * 19, max_new_tokens=13)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(
        "Requested token count exceeds the model's maximum context length of 32 tokens. You requested a total of 33 "
        "tokens: 20 tokens from the input messages and 13 tokens for the completion.")
    r = generate(plain_server, [0] + [5] * 25, max_new_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "Input length (26 tokens) exceeds the maximum allowed length (26 tokens). Use a shorter input or enable "
        "--allow-auto-truncate.")
    # within both checks, max_new_tokens is cut to max_req_len - input - 1 = 10
    body = generate(plain_server, [0] + [5] * 19, max_new_tokens=12, ignore_eos=True).json()
    assert len(body["output_ids"]) == 10 and body["meta_info"]["finish_reason"] == {"type": "length", "length": 10}


def test_sglang_engine_matches_local(servers, model_dir):
    """Same seeds, same samples, until a sample meets the model's EOS: SGLang stops there, and the
    client continues it with a derived seed, so only the stop ids end a sample (as locally)."""
    local = LocalEngine(model_dir)
    client = SGLangEngine(servers, PoolOptions(concurrency=8))
    try:
        a = local.sample(PROMPTS, 4, 20, STOP, seed=9)
        b = client.sample(PROMPTS, 4, 20, STOP, seed=9)
        continued = 0
        for prompt, sa, sb in zip(PROMPTS, a, b):
            for x, y in zip(sa, sb):
                assert y.finished == (y.tokens[-1] in STOP) and not any(t in STOP for t in y.tokens[:-1])
                assert y.finished or len(y.tokens) == 20
                cut = x.tokens.index(EOS) + 1 if EOS in x.tokens else len(x.tokens)
                assert y.tokens[:cut] == x.tokens[:cut]
                continued += EOS in y.tokens[:-1]
                # the log-probs are those of the tokens held
                assert abs(sum(y.logprobs) - local.score([prompt], [y.tokens])[0]) < 1e-3
                if cut == len(x.tokens):
                    assert y.tokens == x.tokens and y.finished == x.finished
                    assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-3
        assert continued > 0, "some sample should meet EOS and be continued"
        assert client.sample(PROMPTS, 4, 20, STOP, seed=9)[1][2].tokens == b[1][2].tokens  # reproducible
        conts = [s[0].tokens for s in a]
        sl, sc = local.score(PROMPTS, conts), client.score(PROMPTS, conts)
        assert max(abs(p - q) for p, q in zip(sl, sc)) < 1e-3
    finally:
        client.close()


def test_sglang_engine_scores_ids_sglang_clips(servers, model_dir):
    """Continuations with ids >= vocab_size-1 (hf_to_mcore puts <|POSTERIOR_PREFIX|> there) score
    like locally; SGLang's 0 in their place is not a misalignment."""
    local = LocalEngine(model_dir)
    client = SGLangEngine(servers, PoolOptions(concurrency=4))
    try:
        prompts = [[0, 5, 6], [0, VOCAB - 1]]
        conts = [[VOCAB - 4, VOCAB - 1, 9, VOCAB - 2], [VOCAB - 1, 0, 3]]
        got, want = client.score(prompts, conts), local.score(prompts, conts)
        assert max(abs(p - q) for p, q in zip(got, want)) < 1e-3
    finally:
        client.close()


def test_sglang_engine_context_and_unseeded_samples(plain_server, model_dir):
    """The client's context is the server's max_req_input_len - 1; without deterministic inference
    samples are not reproducible, but each one is exact (its log-probs are those of its tokens)."""
    local = LocalEngine(model_dir)
    client = SGLangEngine(plain_server, PoolOptions(concurrency=4))
    capped = SGLangEngine(plain_server, context_length=20)
    try:
        assert client.context_length == 25 and capped.context_length == 20
        prompt = [0, 5, 6, 7]
        runs = [client.sample([prompt], 6, 21, STOP, seed=4)[0] for _ in range(2)]
        assert [s.tokens for s in runs[0]] != [s.tokens for s in runs[1]]
        for s in runs[0] + runs[1]:
            assert abs(s.logprob_sum - local.score([prompt], [s.tokens])[0]) < 1e-3
    finally:
        client.close()
        capped.close()


def test_local_engine_context_length(model_dir):
    assert LocalEngine(model_dir).context_length == 256
    assert LocalEngine(model_dir, context_length=64).context_length == 64
    assert LocalEngine(model_dir, context_length=1000).context_length == 256


def test_sglang_engine_skips_dead_server(servers, model_dir):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = SGLangEngine([dead, servers[0]], PoolOptions(concurrency=4, backoff_s=0.01, cooldown_s=60))
    try:
        out = client.sample(PROMPTS, 2, 8, STOP, seed=1)
        assert all(len(s) == 2 for s in out)
        assert client.pool.healthy() == [servers[0]]
    finally:
        client.close()

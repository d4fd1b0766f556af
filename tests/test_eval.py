"""`bolt eval`: prompt layouts, greedy batched decoding vs transformers, graders, end to end, bad input.

The model is a tiny Llama with a toy-trained BPE saved next to it (as the project's HF exports carry
their tokenizer); one fixture trains it for a few seconds on toy documents, in both the raw and the
latent layout, so that its generations contain `Final Answer:` and some answers are right.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import bolt, tiny_llama
from transformers import LlamaForCausalLM

from megatron_bolt.cli import main as bolt_main
from megatron_bolt.evaluation.evaluate import build_prompt, evaluate
from megatron_bolt.evaluation.exemplars import GSM8K
from megatron_bolt.evaluation.tasks import (
    LAYOUTS,
    Item,
    fixed_exemplars,
    grade,
    last_boxed,
    load_items,
    toy_items,
)
from megatron_bolt.inference.local import LocalEngine
from megatron_bolt.tokenizer import load_tokenizer, train_bpe_tokenizer
from megatron_bolt.toy.world import (
    ToyWorld,
    make_documents,
    make_eval_items,
    problem_text,
    solve,
    write_jsonl,
)
from megatron_bolt.toy.world import grade as toy_grade

# Problems with five possible answers: a model trained for seconds gets some right, which the
# end-to-end test checks (in the full world a guess is right 1% of the time).
SMALL_WORLD = ToyWorld(min_count=2, max_count=2, max_start=4)


def tiny_model_with_tokenizer(path) -> str:
    """A random tiny Llama (sharpened lm_head: clear argmax margins) saved with a toy BPE."""
    docs = path.parent / f"{path.name}-docs.jsonl"
    write_jsonl(docs, [{"text": t} for t in make_documents(50, 0)])
    tok = train_bpe_tokenizer([str(docs)], 320, str(path))
    return tiny_llama(path, vocab_size=tok.vocab_size, max_positions=512, bos_id=tok.bos_id, eos_id=tok.eos_id)


def latent_document(tok, seed: int) -> list[int]:
    """A training document in the latent layout of the evaluation prompts (exemplars all the way)."""
    *first, last = toy_items(3, seed)
    ids = build_prompt(last, first, "latent", tok)
    return ids + tok.encode(last.reasoning) + [tok.latent.eol] + tok.encode(f"Final Answer: {last.answer}") + [tok.eos_id]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses get (OMP_NUM_THREADS=1): on the shared 2-core
    machine more threads made these tiny models ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("eval") / "hf")


@pytest.fixture(scope="module")
def trained_dir(random_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "trained"
    shutil.copytree(random_dir, out)
    tok = load_tokenizer(str(out))
    model = LlamaForCausalLM.from_pretrained(str(out))
    length = 128
    raw = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in make_documents(300, 1, SMALL_WORLD)]
    latent = [latent_document(tok, 1000 + i) for i in range(300)]
    seqs = torch.tensor([d[:length] for d in raw + latent if len(d) >= length])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for _ in range(200):
        batch = seqs[torch.randint(len(seqs), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    return str(out)


# ------------------------------------------------------------------------------------ prompt layout
EXEMPLARS = [
    Item(0, 1, "3 + 4 * 2", "3 + 4 * 2 = 7 * 2 = 4.", "", "4"),
    Item(1, 2, "9 - 5 - 7", "9 - 5 - 7 = 4 - 7 = 7.", "", "7"),
]
QUERY = Item(2, 3, "6 * 6 + 1", "6 * 6 + 1 = 6 + 1 = 7.", "", "7")


def test_latent_prompt_layout(random_dir):
    """toy: the thought follows the question's blank line (the chunker keeps a paragraph's blank
    line with it); the text around the latents is the document's own tokenization."""
    tok = load_tokenizer(random_dir)
    lat = tok.latent
    got = build_prompt(QUERY, EXEMPLARS, "latent", tok)
    assert tok.decode(got) == (
        "<s>Problem:\n3 + 4 * 2\n\n<|START_OF_LATENT|><|PRIOR_PREFIX|>3 + 4 * 2 = 7 * 2 = 4.<|END_OF_LATENT|>"
        "Final Answer: 4\n\nProblem:\n9 - 5 - 7\n\n<|START_OF_LATENT|><|PRIOR_PREFIX|>9 - 5 - 7 = 4 - 7 = 7."
        "<|END_OF_LATENT|>Final Answer: 7\n\nProblem:\n6 * 6 + 1\n\n<|START_OF_LATENT|><|PRIOR_PREFIX|>"
    )
    # Without the latents, the prompt's text tokens are the start of the tokenized document that
    # holds the same text (the query's answer following), exactly as merge writes a document.
    text_ids, inside = [], False
    for i in got[1:]:
        inside = (inside or i == lat.prior) and i != lat.eol
        if not inside and i not in (lat.sol, lat.eol):
            text_ids.append(i)
    doc = ("Problem:\n3 + 4 * 2\n\nFinal Answer: 4\n\nProblem:\n9 - 5 - 7\n\nFinal Answer: 7\n\n"
           "Problem:\n6 * 6 + 1\n\nFinal Answer: 7")
    assert tok.encode(doc)[: len(text_ids)] == text_ids and tok.decode(text_ids) == doc[: doc.rindex("Final")]
    # zero-shot: just the problem and the opening of the latent
    zero = build_prompt(QUERY, [], "latent", tok)
    assert zero[-2:] == [lat.sol, lat.prior] and tok.decode(zero[1:-2]) == "Problem:\n6 * 6 + 1\n\n"


def test_raw_prompt_layout(random_dir):
    tok = load_tokenizer(random_dir)
    got = build_prompt(QUERY, EXEMPLARS, "raw", tok)
    specials = {tok.eos_id, tok.latent.sol, tok.latent.eol, tok.latent.prior, tok.latent.posterior}
    assert got[0] == tok.bos_id and not specials & set(got) and tok.bos_id not in got[1:]
    # toy: exactly the corpus layout (toy.world.problem_text), blank-line separated ...
    problems = [solve(r["question"]) for r in make_eval_items(3, 0)]
    toy = toy_items(3, 0)
    prompt = build_prompt(toy[2], toy[:2], "raw", tok)
    text = "\n\n".join(problem_text(p) for p in problems)
    head = "\n\n".join(problem_text(p) for p in problems[:2]) + f"\n\nProblem:\n{problems[2].question}\n\n"
    assert tok.decode(prompt) == "<s>" + head
    # ... and its tokens are a prefix of the tokenization of the whole document (no boundary effect)
    assert [tok.bos_id, *tok.encode(text)][: len(prompt)] == prompt
    # gsm8k: the plain-text solution between the question and the final answer line
    gsm = Item(0, 1, "How many?", "2 + 2 = 4.", "2 + 2 = 4.", "4")
    assert tok.decode(build_prompt(Item(1, 2, "And now?", "", "", "5"), [gsm], "raw", tok, "gsm8k")) == (
        "<s>Question: How many?\nFinal Answer: 2 + 2 = 4. The final answer is 4. I hope it is correct."
        "\n\n\n\n##Problem\nQuestion: And now?\nFinal Answer:"
    )


def test_fixed_exemplar_prompts_in_the_reference_layout(random_dir):
    tok = load_tokenizer(random_dir)
    q = Item(0, 1, "Sue has 3 cats. How many legs?", "", "", "12")
    text = tok.decode(build_prompt(q, fixed_exemplars("gsm8k"), "latent", tok, "gsm8k"))
    shots = text.split("\n\n\n\n##Problem\n")
    assert len(shots) == 9 and len(fixed_exemplars("gsm8k")) == 8
    question, latent, answer = GSM8K[0]
    assert shots[0] == (f"<s>Question: {question}\nFinal Answer:<|START_OF_LATENT|><|PRIOR_PREFIX|>{latent}"
                        f"<|END_OF_LATENT|> The final answer is {answer}. I hope it is correct.")
    assert shots[-1] == "Question: Sue has 3 cats. How many legs?\nFinal Answer:<|START_OF_LATENT|><|PRIOR_PREFIX|>"
    # every fixed exemplar grades as right under its own task's grader
    for task in ("gsm8k", "math", "mmlu_stem"):
        exemplars = fixed_exemplars(task)
        assert len(exemplars) == (8 if task == "gsm8k" else 4)
        for e in exemplars:
            f = LAYOUTS[task]
            generation = f"{f.latent(task, e)}<|END_OF_LATENT|>{f.tail(task, e)}"
            assert grade(task, generation, e.answer)[1], (task, e.question)
    math = tok.decode(build_prompt(Item(0, 1, "What is $1+1$?", "", "", "2"), fixed_exemplars("math")[:1],
                                   "latent", tok, "math"))
    assert math.endswith("correct.\n\nProblem:\nWhat is $1+1$?\n<|START_OF_LATENT|><|PRIOR_PREFIX|>")
    assert "\nThe final answer is $6$\n<|END_OF_LATENT|> Final Answer: The final answer is $6$. I hope it is correct." in math
    mmlu = Item(0, 1, "Pick one.", "", "", "B", ("x", "y", "z", "w"))
    text = tok.decode(build_prompt(mmlu, [], "latent", tok, "mmlu_stem"))
    assert text == "<s>Question: Pick one.\n(A) x\n(B) y\n(C) z\n(D) w\nAnswer:<|START_OF_LATENT|><|PRIOR_PREFIX|>"


def test_sentencepiece_prompt_has_no_piece_training_never_shows(tmp_path):
    """Encoding the text after EoL on its own would start it with SentencePiece's dummy-prefix
    `▁`; the prompt instead has the document's own tokens there, as merge writes them."""
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join([f"Question: How many {w}?\nFinal Answer: The final answer is {n}. I hope it is correct."
                                 for n, w in enumerate(["cats", "dogs", "apples", "coins", "pens"] * 40)]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=330,
                                   model_type="bpe", byte_fallback=True, minloglevel=2,
                                   # as Llama's: newlines kept, spaces never merged
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    ex = Item(0, None, "How many cats?", "Two and two make four.", "", "4")
    ids = build_prompt(Item(1, None, "How many dogs?", "", "", "3"), [ex], "latent", tok, "gsm8k")
    eol = ids.index(tok.latent.eol)
    doc = "Question: How many cats?\nFinal Answer: The final answer is 4. I hope it is correct."
    doc_ids = sp.encode(doc)
    cut = len(sp.encode("Question: How many cats?\nFinal Answer:"))
    tail = " The final answer is 4. I hope it is correct."
    assert ids[eol + 1 : eol + 1 + len(doc_ids) - cut] == doc_ids[cut:]
    alone = sp.encode(tail)  # what encoding the text after EoL on its own gives: an extra dummy `▁`
    assert alone != doc_ids[cut:] and sp.id_to_piece(alone[0]) == "▁"
    # the text before SoL and after EoL is the document's tokenization, cut in token space
    sol = ids.index(tok.latent.sol)
    assert ids[1:sol] == doc_ids[:cut] and ids[0] == tok.bos_id
    # the latent is encoded on its own, as the warm start encodes a teacher's latent
    assert ids[sol + 2 : ids.index(tok.latent.eol)] == sp.encode(ex.reasoning)


# -------------------------------------------------------------------------------- greedy decoding
def test_greedy_batched_matches_transformers_generate(random_dir):
    tok = load_tokenizer(random_dir)
    texts = ["Problem:\n3", "Problem:\n7 + 5 * 3 - 4\n\nFinal Answer: 2\n\nProblem:\n1 - 9\n", "Final", "6 * 6 + 1 = "]
    prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    ref = LlamaForCausalLM.from_pretrained(random_dir, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    new = 20

    def hf_greedy(prompt, eos=None):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
        toks = out[0, len(prompt):].tolist()
        if eos is not None and eos in toks:
            toks = toks[: toks.index(eos) + 1]
        return toks

    expected = [hf_greedy(p) for p in prompts]
    assert len({tuple(e) for e in expected}) > 1, "different prompts should continue differently"
    eng = LocalEngine(random_dir, device="cpu", max_batch_rows=3)
    got = eng.generate_greedy(prompts, new, stop=[])
    assert [r.tokens for r in got] == expected
    # a stop id ends rows early (kept as the last token), as transformers' eos does
    stop = expected[1][len(expected[1]) // 2]
    expected_stop = [hf_greedy(p, eos=stop) for p in prompts]
    got = eng.generate_greedy(prompts, new, stop=[stop])
    assert [r.tokens for r in got] == expected_stop
    assert [r.stop_token for r in got] == [stop if stop in e else None for e in expected_stop]
    assert any(len(e) < new for e in expected_stop)
    # a condition on the tokens so far (the stop-string hook) ends a row right where it first holds
    mark = expected[0][3]
    got = eng.generate_greedy(prompts, new, stop=[], stop_check=lambda toks: mark in toks)
    for r, e in zip(got, expected):
        assert r.tokens == (e[: e.index(mark) + 1] if mark in e else e)
        assert r.finished == (mark in e) and r.stop_token is None


# ---------------------------------------------------------------------------------------- graders
def test_gsm8k_grader_and_items(tmp_path):
    # The last number of the latent (the text before the first EoL), as the reference grades.
    assert grade("gsm8k", "So 1,000 + 234 = 1,234.<|END_OF_LATENT|> The final answer is 9.", "1234") == ("1234", True)
    assert grade("gsm8k", "Down by 10, it is -10.<|END_OF_LATENT|>", "-10") == ("-10", True)
    assert grade("gsm8k", "It is $5.00<|END_OF_LATENT|> The final answer is 5.", "5") == ("5.00", False)
    assert grade("gsm8k", "First 12, then 13 apples<|END_OF_LATENT|>", "12") == ("13", False)
    assert grade("gsm8k", "the answer is 13 The final answer is 13.", "13") == (None, False)  # no EoL
    f = tmp_path / "gsm.jsonl"
    write_jsonl(f, [{"question": "Q?", "answer": "He has 2,000+125=<<2000+125=2125>>2,125 coins.\n#### 2,125"}])
    (item,) = load_items(str(f), "gsm8k").items
    assert (item.answer, item.reasoning, item.line) == ("2125", "He has 2,000+125=2,125 coins.", 1)
    assert grade("gsm8k", "So 2,125.<|END_OF_LATENT|>", item.answer)[1]


def test_math_grader_and_items(tmp_path):
    sol = "So $x = \\boxed{\\frac{1}{\\sqrt{2}}}$.The answer is: \\frac{1}{\\sqrt{2}}"
    assert last_boxed(sol) == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("first \\boxed{1} then \\boxed{\\{a, b\\}^{2}}") == "\\{a, b\\}^{2}"
    # math-verify on the whole generation
    right = "x = 1/sqrt2\n<|END_OF_LATENT|> Final Answer: The final answer is $\\frac{\\sqrt{2}}{2}$. I hope it is correct."
    assert grade("math", right, "\\frac{1}{\\sqrt{2}}")[1]
    assert not grade("math", right.replace("sqrt{2}}{2}", "sqrt{3}}{2}"), "\\frac{1}{\\sqrt{2}}")[1]
    assert grade("math", "no answer here", "1") == (None, False)
    f = tmp_path / "math.jsonl"
    write_jsonl(f, [{"problem": "P?", "solution": sol}, {"question": "Q?", "answer": "It is $\\boxed{3}$."}])
    a, b = load_items(str(f), "math").items
    assert (a.question, a.answer, a.reasoning) == ("P?", "\\frac{1}{\\sqrt{2}}", "So $x = \\boxed{\\frac{1}{\\sqrt{2}}}$.")
    assert (b.question, b.answer) == ("Q?", "3")


def test_mmlu_stem_grader_and_items(tmp_path):
    assert grade("mmlu_stem", "Not (A) but (C).<|END_OF_LATENT|> The answer is (C) z.", "C") == ("C", True)
    assert grade("mmlu_stem", "Thus (B).<|END_OF_LATENT|> The answer is (D) w.", "B") == ("D", False)
    assert grade("mmlu_stem", "no letter", "A") == (None, False)
    f = tmp_path / "mmlu.jsonl"
    write_jsonl(f, [{"question": "Q1", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "college_physics"},
                    {"question": "Q2", "choices": ["a", "b", "c", "d"], "answer": 0, "subject": "philosophy"},
                    {"question": "Q3", "choices": ["a", "b"], "answer": "B"}])
    loaded = load_items(str(f), "mmlu_stem")
    assert [(i.question, i.answer, i.choices) for i in loaded.items] == [("Q1", "C", ("a", "b", "c", "d")),
                                                                         ("Q3", "B", ("a", "b"))]
    assert (loaded.skipped, loaded.reason) == (1, "not a STEM subject")


def test_toy_grader():
    assert grade("toy", "<|END_OF_LATENT|> Final Answer: 7\n\n", "7") == ("7", True)
    assert grade("toy", "Final Answer: 3", "7") == ("3", False)
    assert grade("toy", "Final Answer 7", "7") == (None, False)


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_bolt_eval_end_to_end(trained_dir, tmp_path):
    data = tmp_path / "toy.jsonl"
    write_jsonl(data, make_eval_items(32, 5, SMALL_WORLD))
    out = tmp_path / "out"
    proc = bolt("eval", "--model", trained_dir, "--task", "toy", "--data", str(data), "--format", "raw",
                "--shots", "2", "--out", str(out), "--max-new-tokens", "12", "--batch-size", "8")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    acc = json.loads((out / "accuracy.json").read_text())
    assert len(rows) == acc["n"] == 30 and [r["index"] for r in rows] == list(range(2, 32))
    assert [r["line"] for r in rows] == list(range(3, 33))
    assert acc["correct"] == sum(r["correct"] for r in rows) and acc["accuracy"] == acc["correct"] / 30
    assert all(r["correct"] == toy_grade(r["generation"], r["answer"]) for r in rows)
    assert all("Problem:" not in r["generation"] for r in rows)
    # the trained model writes answers, and some are right
    assert sum(r["extracted"] is not None for r in rows) >= 25 and acc["correct"] > 0
    assert (acc["task"], acc["format"], acc["shots"], acc["model"]) == ("toy", "raw", 2, trained_dir)
    assert "not scored" in acc["exemplars"]
    line = proc.stdout.strip().splitlines()[-1]
    assert line == f"eval toy (raw, 2-shot): accuracy {acc['accuracy']:.3f} ({acc['correct']}/30)"
    assert not list(out.glob("*.tmp*"))


@pytest.mark.slow
def test_evaluate_latent_generated_toy(trained_dir, tmp_path):
    res = evaluate(trained_dir, "toy", None, shots=3, limit=12, out_dir=str(tmp_path), max_new_tokens=48, batch_size=5)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    # limit items are scored; the 3 exemplars come before them and are not scored
    items = make_eval_items(15, 0)
    assert [r["question"] for r in rows] == [r["question"] for r in items[3:]] and res["n"] == 12
    assert res["accuracy"] == sum(r["correct"] for r in rows) / 12
    assert json.loads((tmp_path / "accuracy.json").read_text()) == res
    # the model writes a latent, closes it and answers (not always, after 100 steps), and the text
    # stops before the next problem
    assert any("<|END_OF_LATENT|>Final Answer:" in r["generation"] for r in rows)
    assert all("Problem:" not in r["generation"] and "<|START_OF_LATENT|>" not in r["generation"] for r in rows)


def test_evaluate_gsm8k_skips_unusable_and_uses_exemplar_file(random_dir, tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    write_jsonl(data, [
        {"question": "A?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
        {"question": "B?", "answer": "no final line"},
        {"question": "C?", "answer": "3\n#### 3"},
        {"question": "D?", "answer": "#### -4"},
    ])
    ex = tmp_path / "ex.jsonl"
    write_jsonl(ex, [{"question": "E?", "answer": "5\n#### 5"}])
    res = evaluate(random_dir, "gsm8k", str(data), shots=1, exemplars=str(ex), fmt="raw", max_new_tokens=4)
    assert (res["n"], res["skipped"], res["skipped_first_lines"]) == (3, 1, [2])
    assert "skipped 1 unusable item(s)" in capsys.readouterr().err
    # by default: the 8 fixed exemplars, every item scored, the reference's 1024 new tokens clamped
    # so that half of this model's 512-token context stays for the prompt, which loses its oldest tokens
    res = evaluate(random_dir, "gsm8k", str(data), limit=1)
    err = capsys.readouterr().err
    assert (res["shots"], res["n"], res["max_new_tokens_requested"], res["max_new_tokens"]) == (8, 1, 1024, 256)
    assert "fixed gsm8k exemplar" in res["exemplars"] and "clamped to 256" in err
    assert res["truncated_prompts"] == 1 and "1 prompt(s) longer than" in err
    res = evaluate(random_dir, "gsm8k", str(data), shots=1, fmt="raw", max_new_tokens=4)
    assert res["n"] == 3 and res["truncated_prompts"] == 0 and res["max_new_tokens"] == 4


# ------------------------------------------------------------------------------------- bad input
def one_line_error(capsys, *argv: str) -> str:
    assert bolt_main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bolt eval: error: "), err
    return err


@pytest.mark.parametrize(
    "task, lines, expect",
    [
        ("toy", ['{"question": "1 + 2", "answer": "3"}', "{not json"], r"bad\.jsonl:2: invalid JSON"),
        ("toy", ['{"answer": "3"}'], r"bad\.jsonl:1: missing field 'question'"),
        ("toy", ['{"question": "1 + 2", "answer": 3}'], r"bad\.jsonl:1: field 'answer' must be a string"),
        ("toy", ['{"question": "one plus two", "answer": "3"}'], r"bad\.jsonl:1: field 'question' is not a toy problem"),
        ("gsm8k", ['{"question": "Q", "solution": "#### 3"}'], r"bad\.jsonl:1: missing field 'answer'"),
        ("math", ['{"solution": "\\\\boxed{1}"}'], r"bad\.jsonl:1: missing field 'problem' \(or 'question'\)"),
        ("math", ['{"problem": "P", "solution": "no box"}'] * 3, r"bad\.jsonl: no usable items.*skipped 3 .*no \\boxed.*first lines 1, 2, 3"),
        ("gsm8k", ['[1, 2]'], r"bad\.jsonl:1: expected a JSON object"),
        ("mmlu_stem", ['{"question": "Q", "choices": "abcd", "answer": 0}'], r"bad\.jsonl:1: field 'choices' must be"),
        ("mmlu_stem", ['{"question": "Q", "choices": ["a", "b"], "answer": 2}'], r"bad\.jsonl:1: field 'answer' must be"),
    ],
)
def test_bad_input_one_line_errors(random_dir, tmp_path, capsys, task, lines, expect):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    err = one_line_error(capsys, "--model", random_dir, "--task", task, "--data", str(bad), "--shots", "0")
    assert re.search(expect, err), err


def test_bad_arguments_one_line_errors(random_dir, tmp_path, capsys):
    assert "no such file" in one_line_error(capsys, "--model", random_dir, "--task", "gsm8k", "--data", str(tmp_path / "x.jsonl"))
    assert "--data is required" in one_line_error(capsys, "--model", random_dir, "--task", "math")
    assert "not an HF model directory" in one_line_error(capsys, "--model", str(tmp_path), "--task", "toy")
    assert "--shots must be at least 0" in one_line_error(capsys, "--model", random_dir, "--task", "toy", "--shots", "-1")
    g = tmp_path / "g.jsonl"
    write_jsonl(g, [{"question": "Q?", "answer": "#### 1"}])
    assert "8 fixed exemplars" in one_line_error(capsys, "--model", random_dir, "--task", "gsm8k", "--data", str(g),
                                                 "--shots", "9")
    ex = tmp_path / "ex.jsonl"
    write_jsonl(ex, make_eval_items(1, 0))
    err = one_line_error(capsys, "--model", random_dir, "--task", "toy", "--exemplars", str(ex), "--shots", "2")
    assert "1 usable exemplar(s), --shots 2 needs 2" in err

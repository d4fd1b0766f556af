"""The toy math world: its arithmetic, its working, its teacher and its grader."""

from __future__ import annotations

import re

import numpy as np
import pytest

from megatron_bolt.toy.world import (
    MODULUS,
    STEP,
    ToyWorld,
    grade,
    make_documents,
    make_eval_items,
    sample_problem,
    solve,
    teacher_latent,
)


def test_solve_counts_down_the_additions():
    p = solve("17 * 6 + 23")
    assert p.working == "6: 23; 5: 40; 4: 57; 3: 74; 2: 91; 1: 08; 0: 25"
    assert p.answer == "25" == f"{(17 * 6 + 23) % 100:02d}"


def test_every_sampled_problem_is_its_arithmetic():
    rng = np.random.default_rng(0)
    world = ToyWorld()
    for _ in range(200):
        p = sample_problem(rng, world)
        _, count, _, start = p.question.split()[1:]
        count, start = int(count), int(start)
        assert world.min_count <= count <= world.max_count and 0 <= start <= world.max_start
        assert int(p.answer) == (STEP * count + start) % MODULUS
        steps = p.working.split("; ")
        assert len(steps) == count + 1 and steps[-1] == f"0: {p.answer}"


@pytest.mark.parametrize("bad", ["6 * 17 + 23", "17 * 6 + 3", "17 * 12 + 23", "7 + 5 * 3 - 4", ""])
def test_solve_rejects_other_questions(bad):
    with pytest.raises(ValueError, match="not a toy problem"):
        solve(bad)


def test_teacher_explains_only_the_open_question():
    doc = make_documents(1, 3)[0]
    question = doc.split("\n")[1]
    head, tail = doc.split("\n\nFinal Answer:", 1)
    assert teacher_latent(head, "\n\nFinal Answer:" + tail.split("\n\n")[0]) == solve(question).working
    assert teacher_latent("", head) == ""  # the question itself answers nothing
    assert teacher_latent(head + "\n\nFinal Answer: 01", "\n\nProblem:") == ""
    assert teacher_latent("Problem:\n7 + 5 * 3\n", "\n\nFinal Answer: 2") == ""  # not this world's problem


def test_grade_compares_numbers():
    assert grade("7: 10; 0: 08<|END_OF_LATENT|>\n\nFinal Answer: 08\n", "8")
    assert not grade("Final Answer: 18", "08") and not grade("no answer", "08")


def _pairs_in(text: str) -> set[tuple[int, int]]:
    return {(int(c), int(s)) for c, s in re.findall(rf"{STEP} \* (\d) \+ (\d\d)", text)}


def test_eval_pairs_never_occur_in_the_corpus():
    world = ToyWorld()
    heldout = world.heldout_pairs()
    # 12 of 100 starts for each of the 8 counts, the same split whatever the corpus seed
    assert len(heldout) == 8 * 12 and heldout == ToyWorld().heldout_pairs()
    corpus = set()
    for seed in range(3):
        corpus |= _pairs_in("\n".join(make_documents(300, seed)))
    assert not corpus & heldout
    assert len(corpus) > 0.95 * (800 - len(heldout))  # the corpus covers (nearly) all the other pairs
    items = make_eval_items(len(heldout), seed=7)
    asked = [(int(q.split()[2]), int(q.split()[4])) for q in (r["question"] for r in items)]
    assert set(asked) == heldout  # every held-out pair once, before any repeats
    assert all(solve(r["question"]).answer == r["answer"] for r in items)
    assert len(make_eval_items(200, seed=7)) == 200


def test_a_world_too_small_to_hold_out_evaluates_on_its_pairs():
    small = ToyWorld(min_count=2, max_count=2, max_start=4)
    assert small.heldout_pairs() == frozenset()
    assert set(small.split_pairs("eval")) == set(small.split_pairs("corpus")) == set(small.pairs())

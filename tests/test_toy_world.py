"""The toy math world: its arithmetic, its working, its teacher and its grader."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_bolt.toy.world import (
    MODULUS,
    STEP,
    ToyWorld,
    grade,
    make_documents,
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

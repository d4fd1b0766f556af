"""The toy math world: the embedded default corpus, its teacher and its grader.

A problem is a multiplication and an addition on a hundred-hour clock (results are taken mod 100):
`17 * 6 + 23` is 17 added six times to 23, 125 mod 100 = 25. The 17 is always the same and the
other two numbers vary, so a reader needs 800 facts (start x count) to answer in one step, which a
tiny model does not learn from results alone. Worked out, every step is a single fact:

    6: 23; 5: 40; 4: 57; 3: 74; 2: 91; 1: 08; 0: 25

Each step counts down the additions left and adds 17 to the last value; both are lookups on one
token a fixed distance back, which a tiny transformer learns within a few hundred steps. The
question ends with the count and the start, so the working's first step copies both from the same
distance (five tokens back). Documents state problems and their results *without the working*:

    Problem:
    17 * 6 + 23

    Final Answer: 25

The teacher writes the working as the latent thought of the chunk that holds the answer, so a model
trained with latents can learn the steps, while one trained on the raw text sees only results. The
grader reads the first `Final Answer: n` of a prediction. Numbers on the clock are written with two
digits (`08`) so that a value is always the same token. The problem and answer formats are those of
method.md's latent-space evaluation (`Problem:\\n{q}\\n`, `Final Answer: {a}`).

Evaluation is held out: a fixed share of the (COUNT, START) pairs (`ToyWorld.heldout_fraction`,
the same starts for every seed) never occurs in documents, and evaluation problems use only those
pairs. Answering them in one step would need a fact the corpus never states; worked out, every
step is one the corpus teaches (each value's successor occurs in other problems' workings).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_bolt.atomic import atomic_write_jsonl

STEP = 17
MODULUS = 100

_QUESTION = re.compile(rf"{STEP} \* (\d) \+ (\d\d)")
_PROBLEM = re.compile(r"Problem:\s*\n([0-9+* ]+?)\s*\n")
_ANSWER = re.compile(r"Final Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class ToyProblem:
    question: str  # "17 * 6 + 23"
    working: str  # "6: 23; 5: 40; 4: 57; 3: 74; 2: 91; 1: 08; 0: 25"
    answer: str  # "25"


@dataclass(frozen=True)
class ToyWorld:
    """Knobs of the generator; the defaults are what `make demo` uses."""

    min_count: int = 2  # additions of STEP per problem
    max_count: int = 9
    max_start: int = MODULUS - 1  # starting values 0..max_start
    min_problems_per_doc: int = 4
    max_problems_per_doc: int = 10
    # Share of the START values held out for evaluation, per COUNT (rounded down: a world with
    # fewer than 1 / heldout_fraction starts holds none out, and evaluates on corpus pairs).
    heldout_fraction: float = 0.125

    def pairs(self) -> list[tuple[int, int]]:
        return [(c, s) for c in range(self.min_count, self.max_count + 1) for s in range(self.max_start + 1)]

    def heldout_pairs(self) -> frozenset[tuple[int, int]]:
        """The (COUNT, START) pairs of evaluation: for each COUNT the same number of STARTs, drawn
        with a fixed seed (a world's split does not depend on the corpus seed)."""
        starts = self.max_start + 1
        per_count = int(self.heldout_fraction * starts)
        out = set()
        for count in range(self.min_count, self.max_count + 1):
            rng = np.random.default_rng([STEP, MODULUS, count, starts])
            out.update((count, int(s)) for s in rng.choice(starts, size=per_count, replace=False))
        return frozenset(out)

    def split_pairs(self, split: str) -> tuple[tuple[int, int], ...]:
        """The pairs of `split`: "corpus" (documents) or "eval" (held-out problems)."""
        return _split_pairs(self, split)


@functools.lru_cache(maxsize=16)
def _split_pairs(world: ToyWorld, split: str) -> tuple[tuple[int, int], ...]:
    heldout = world.heldout_pairs()
    if split == "eval":
        return tuple(sorted(heldout)) if heldout else tuple(world.pairs())
    if split == "corpus":
        return tuple(p for p in world.pairs() if p not in heldout)
    raise ValueError(f"split must be 'corpus' or 'eval', got {split!r}")


def _clock(value: int) -> str:
    return f"{value % MODULUS:02d}"


def solve(question: str) -> ToyProblem:
    """Work a question (`17 * COUNT + START`) out step by step; raises ValueError if it is not a toy
    problem. The working lists, for each addition, how many are left and the value so far."""
    m = _QUESTION.fullmatch(question.strip())
    if m is None:
        raise ValueError(f"not a toy problem: {question!r}")
    count, value = int(m.group(1)), int(m.group(2))
    steps = [f"{count}: {_clock(value)}"]
    for left in range(count - 1, -1, -1):
        value += STEP
        steps.append(f"{left}: {_clock(value)}")
    return ToyProblem(question=m.group(0), working="; ".join(steps), answer=_clock(value))


def pair_problem(count: int, start: int) -> ToyProblem:
    return solve(f"{STEP} * {count} + {_clock(start)}")


def sample_problem(rng: np.random.Generator, world: ToyWorld = ToyWorld(), split: str = "corpus") -> ToyProblem:
    """A problem drawn uniformly from the pairs of `split` (see `ToyWorld.split_pairs`)."""
    pairs = world.split_pairs(split)
    return pair_problem(*pairs[int(rng.integers(len(pairs)))])


def problem_text(p: ToyProblem) -> str:
    """How a problem and its result appear in a document (no working)."""
    return f"Problem:\n{p.question}\n\nFinal Answer: {p.answer}"


def make_documents(num_docs: int, seed: int, world: ToyWorld = ToyWorld()) -> list[str]:
    rng = np.random.default_rng([seed, 1])
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(world.min_problems_per_doc, world.max_problems_per_doc + 1))
        docs.append("\n\n".join(problem_text(sample_problem(rng, world)) for _ in range(n)))
    return docs


def make_eval_items(n: int, seed: int, world: ToyWorld = ToyWorld()) -> list[dict]:
    """Held-out problems as evaluation items: {"question", "answer", "working"}. The held-out pairs
    in a seeded order, each once before any repeats (so n up to their number are all distinct)."""
    rng = np.random.default_rng([seed, 2])
    pairs = world.split_pairs("eval")
    out: list[dict] = []
    while len(out) < n:
        for i in rng.permutation(len(pairs))[: n - len(out)]:
            p = pair_problem(*pairs[int(i)])
            out.append({"question": p.question, "answer": p.answer, "working": p.working})
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Atomic JSONL writer (temporary name, then rename)."""
    path = Path(path)
    atomic_write_jsonl(path, rows)
    return path


def teacher_latent(prefix: str, chunk: str) -> str:
    """The teacher's latent thought for `chunk` given the text before it: the working of a problem
    whose question is already in the prefix and whose `Final Answer` lies in the chunk (the thought
    that explains the next result). Chunks that answer nothing from before get an empty latent:
    a thought is only ever about what the reader has seen, which is what evaluation asks of it."""
    questions = list(_PROBLEM.finditer(prefix + "\n"))
    if not questions or _ANSWER.search(prefix[questions[-1].end() - 1 :]):
        return ""  # no question left open by the prefix
    answer = _ANSWER.search(chunk)
    if answer is None or _PROBLEM.search(chunk[: answer.start()] + "\n"):
        return ""
    try:
        return solve(questions[-1].group(1)).working
    except ValueError:
        return ""  # a problem of some other world: nothing this teacher knows


def extract_answer(prediction: str) -> str | None:
    m = _ANSWER.search(prediction)
    return m.group(1) if m else None


def grade(prediction: str, answer: str) -> bool:
    """True when the first `Final Answer: n` of the prediction equals the reference answer."""
    got = extract_answer(prediction)
    return got is not None and int(got) == int(answer)

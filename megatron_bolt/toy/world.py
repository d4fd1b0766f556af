"""The toy math world: the embedded default corpus, its teacher and its grader.

A problem is a chain of single-digit operations on a ten-hour clock (every result is taken mod 10),
evaluated left to right: `7 + 5 * 3 - 4` means ((7 + 5) * 3) - 4 mod 10 = 2. Each step is one of
300 facts a tiny model learns quickly; composing three or four of them in a single forward pass is
what it cannot do. Documents state problems and their results *without the working*:

    Problem:
    7 + 5 * 3 - 4

    Final Answer: 2

The teacher writes the working as a latent thought (`7 + 5 * 3 - 4 = 2 * 3 - 4 = 6 - 4 = 2.`), so a model
trained with latents can learn the steps, while one trained on the raw text sees only results. The
grader reads the first `Final Answer: n` of a prediction. The problem and answer formats are those
of method.md's latent-space evaluation (`Problem:\\n{q}\\n`, `Final Answer: {a}`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPS = ("+", "-", "*")
MODULUS = 10

_PROBLEM = re.compile(r"Problem:\s*\n([0-9+\-* ]+?)\s*\n")
_ANSWER = re.compile(r"Final Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class ToyProblem:
    question: str  # "7 + 5 * 3 - 4"
    working: str  # "7 + 5 * 3 - 4 = 2 * 3 - 4 = 6 - 4 = 2."
    answer: str  # "2"


@dataclass(frozen=True)
class ToyWorld:
    """Knobs of the generator; the defaults are what `make demo` uses."""

    min_ops: int = 2
    max_ops: int = 3
    min_problems_per_doc: int = 4
    max_problems_per_doc: int = 10


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return (a + b) % MODULUS
    if op == "-":
        return (a - b) % MODULUS
    return (a * b) % MODULUS


def solve(question: str) -> ToyProblem:
    """Work a question out step by step; raises ValueError if it is not a toy problem.

    The working rewrites the expression once per step, replacing its first operation by the result
    (`7 + 5 * 3 - 4 = 2 * 3 - 4 = 6 - 4 = 2.`): each step is one fact plus a copy of the rest, the
    kind of step a tiny transformer learns quickly.
    """
    parts = question.split()
    if len(parts) < 3 or len(parts) % 2 == 0 or any(op not in OPS for op in parts[1::2]):
        raise ValueError(f"not a toy problem: {question!r}")
    try:
        numbers = [int(x) for x in parts[0::2]]
    except ValueError as exc:
        raise ValueError(f"not a toy problem: {question!r}") from exc
    ops = parts[1::2]
    value, rewrites = numbers[0], [" ".join(parts)]
    for i, op in enumerate(ops):
        value = _apply(value, op, numbers[i + 1])
        rest = [f"{o} {n}" for o, n in zip(ops[i + 1 :], numbers[i + 2 :])]
        rewrites.append(" ".join([str(value), *rest]))
    return ToyProblem(question=" ".join(parts), working=" = ".join(rewrites) + ".", answer=str(value))


def sample_problem(rng: np.random.Generator, world: ToyWorld = ToyWorld()) -> ToyProblem:
    n_ops = int(rng.integers(world.min_ops, world.max_ops + 1))
    parts = [str(int(rng.integers(0, MODULUS)))]
    for _ in range(n_ops):
        parts += [OPS[int(rng.integers(len(OPS)))], str(int(rng.integers(0, MODULUS)))]
    return solve(" ".join(parts))


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
    """Held-out problems as evaluation items: {"question", "answer", "working"}."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for _ in range(n):
        p = sample_problem(rng, world)
        out.append({"question": p.question, "answer": p.answer, "working": p.working})
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Atomic JSONL writer (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
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
    return solve(questions[-1].group(1)).working


def extract_answer(prediction: str) -> str | None:
    m = _ANSWER.search(prediction)
    return m.group(1) if m else None


def grade(prediction: str, answer: str) -> bool:
    """True when the first `Final Answer: n` of the prediction equals the reference answer."""
    got = extract_answer(prediction)
    return got is not None and int(got) == int(answer)

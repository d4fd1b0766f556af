"""Evaluation tasks: reading items (toy, GSM8K, MATH) and grading model answers.

Every task turns a JSONL row into an `Item` with the same fields, so prompt building and scoring do
not care which task they run:

- toy: `question`, `answer`, optional `working` (the teacher's working, recomputed when absent), as
  written by `megatron_bolt.toy.world.make_eval_items`; graded by `toy.world.grade`.
- gsm8k: the public release, `question` and `answer` = worked solution ending in `#### n`. The
  `<<48/2=24>>` calculator annotations are removed from the reasoning. Graded by the number after
  `Final Answer:` (commas removed), compared numerically.
- math: `problem` or `question`, and `solution` (Hendrycks MATH, MATH-500) or `answer` (mirrors that
  keep the worked solution there) containing `\\boxed{...}`; the reference is the last box. Graded
  with math-verify. A trailing `The answer is: ...` that some mirrors append is dropped.

Rows that are malformed (bad JSON, a missing or non-string field) are errors naming file:line; rows
that are well-formed but carry no usable reference (no `####`, no `\\boxed{}`) are skipped and counted.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from megatron_bolt.errors import UserError

TASKS = ("toy", "gsm8k", "math")

_ANSWER_NUMBER = re.compile(r"Final Answer:\s*\$?\s*(-?[\d,]*\.?\d+)")
_ANSWER_LINE = re.compile(r"Final Answer:[ \t]*([^\n]*)")
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_MIRROR_TAIL = re.compile(r"\s*The answer is:[^\n]*\s*$")
_MATH_DELIMITER = re.compile(r"(?<!\\)\$")  # an unescaped `$` (`\$` is a dollar sign)


@dataclass(frozen=True)
class Item:
    index: int  # position among the usable items of its source (0-based)
    line: int | None  # line in the JSONL file, None for generated items
    question: str
    reasoning: str  # worked solution, put inside the latent in the latent format
    solution: str  # plain-text solution of raw exemplars ("" for toy: its corpus has no working)
    answer: str  # reference answer


@dataclass
class Loaded:
    items: list[Item]
    skipped: int  # well-formed rows without a usable reference
    skipped_lines: list[int]  # the first few of them
    reason: str  # why they were skipped ("" when none were)


class Unusable(Exception):
    """A well-formed row without a usable reference answer: skipped and counted."""


# ------------------------------------------------------------------------------------------ reading
def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line; one-line UserError for a missing file or bad JSON."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    return rows


def _field(row: dict, names: tuple[str, ...], where: str) -> tuple[str, str]:
    """(name, value) of the first of `names` present in the row; it must be a string."""
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str):
                raise UserError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
            return name, value
    raise UserError(f"{where}: missing field '{names[0]}'" + (f" (or '{names[1]}')" if len(names) > 1 else ""))


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _toy_item(row: dict, where: str) -> tuple[str, str, str, str]:
    from megatron_bolt.toy.world import solve

    _, q = _field(row, ("question",), where)
    _, a = _field(row, ("answer",), where)
    if "working" in row:
        _, working = _field(row, ("working",), where)
    else:
        try:
            working = solve(q).working
        except ValueError:
            raise UserError(f"{where}: field 'question' is not a toy problem: {q!r}") from None
    return q, working, "", a


def _gsm8k_item(row: dict, where: str) -> tuple[str, str, str, str]:
    _, q = _field(row, ("question",), where)
    _, text = _field(row, ("answer",), where)
    if "####" not in text:
        raise Unusable("no '####' in field 'answer'")
    body, _, final = text.rpartition("####")
    final = final.strip().replace(",", "").lstrip("$")
    if parse_number(final) is None:
        raise Unusable("the text after '####' is not a number")
    reasoning = _CALCULATOR.sub("", body).strip()
    return q, reasoning, reasoning, final


def _math_item(row: dict, where: str) -> tuple[str, str, str, str]:
    _, q = _field(row, ("problem", "question"), where)
    name, solution = _field(row, ("solution", "answer"), where)
    ref = last_boxed(solution)
    if ref is None or not ref.strip():
        raise Unusable(f"no \\boxed{{...}} in field '{name}'")
    reasoning = _MIRROR_TAIL.sub("", solution).strip()
    return q, reasoning, reasoning, ref.strip()


_READERS = {"toy": _toy_item, "gsm8k": _gsm8k_item, "math": _math_item}


def load_items(path: str, task: str) -> Loaded:
    """All usable items of a JSONL file for `task` (see the module docstring)."""
    if task not in _READERS:
        raise UserError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    items: list[Item] = []
    skipped: list[int] = []
    reason = ""
    for lineno, row in read_jsonl(path):
        try:
            q, reasoning, solution, answer = _READERS[task](row, f"{path}:{lineno}")
        except Unusable as exc:
            skipped.append(lineno)
            reason = reason or str(exc)
            continue
        items.append(Item(len(items), lineno, q, reasoning, solution, answer))
    return Loaded(items, len(skipped), skipped[:5], reason)


def toy_items(n: int, seed: int) -> list[Item]:
    """Generated held-out toy problems (`toy.world.make_eval_items`)."""
    from megatron_bolt.toy.world import make_eval_items

    return [
        Item(i, None, r["question"], r["working"], "", r["answer"]) for i, r in enumerate(make_eval_items(n, seed))
    ]


# ------------------------------------------------------------------------------------------ grading
def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_gsm8k(prediction: str) -> str | None:
    m = _ANSWER_NUMBER.search(prediction)
    return m.group(1).replace(",", "") if m else None


def extract_math(prediction: str) -> str | None:
    m = _ANSWER_LINE.search(prediction)
    if not m:
        return None
    ans = m.group(1).strip().rstrip(".").strip()
    return ans or None


def math_equal(reference: str, answer: str) -> bool:
    """math-verify equivalence of two LaTeX answers (bare, `$...$` or `\\boxed{}`)."""
    from math_verify import parse, verify

    # math-verify's time limits use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parsed(text: str):
        wrapped = text if (_MATH_DELIMITER.search(text) or "\\boxed" in text) else f"${text}$"
        return parse(wrapped, parsing_timeout=timeout) or parse(text, parsing_timeout=timeout)

    gold, pred = parsed(reference), parsed(answer)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def grade(task: str, prediction: str, reference: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) of a generated text against the reference answer."""
    if task == "toy":
        from megatron_bolt.toy.world import extract_answer
        from megatron_bolt.toy.world import grade as toy_grade

        return extract_answer(prediction), toy_grade(prediction, reference)
    if task == "gsm8k":
        got = extract_gsm8k(prediction)
        want, have = parse_number(reference), parse_number(got) if got is not None else None
        return got, want is not None and have is not None and have == want
    if task == "math":
        got = extract_math(prediction)
        return got, got is not None and math_equal(reference, got)
    raise UserError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")

"""Evaluation tasks: reading items (toy, GSM8K, MATH, MMLU-STEM), their prompt layout, and grading.

Every task turns a JSONL row into an `Item` with the same fields, and describes its prompts with a
`TaskLayout` (what goes before the latent, after it, between exemplars, where generation stops),
so prompt building and scoring do not care which task they run. The layouts and graders follow the
BoLT reference's latent evaluation (ryoungj/BoLT configs/eval/task_configs, the `latent_*` tasks);
`megatron_bolt.evaluation.exemplars` holds the project's own fixed exemplars for them.

- toy: `question`, `answer`, optional `working` (the teacher's working, recomputed when absent), as
  written by `megatron_bolt.toy.world.make_eval_items`; graded by `toy.world.grade`.
- gsm8k: the public release, `question` and `answer` = worked solution ending in `#### n`. The
  `<<48/2=24>>` calculator annotations are removed from the reasoning. Prompt `Question: {q}\nFinal
  Answer:` SoL PRIOR; graded as the reference's "latent-flexible-extract": the last number in the
  generated latent (the text before the first EoL), `,` `$` and a final `.` removed, compared as a
  string with the reference number. No EoL: no answer.
- math: `problem` or `question`, and `solution` (Hendrycks MATH, MATH-500) or `answer` (mirrors that
  keep the worked solution there) containing `\\boxed{...}`; the reference is the last box. Prompt
  `Problem:\n{q}\n` SoL PRIOR; graded with math-verify on the whole generation, as the reference
  does. A trailing `The answer is: ...` that some mirrors append is dropped.
- mmlu_stem: the public MMLU test format, `question`, `choices` (list of strings) and `answer` (the
  index of the right choice, or its letter); rows whose `subject` (or `type`) is not one of the STEM
  subjects are skipped. Prompt `Question: {q}\n(A) ...\n(D) ...\nAnswer:` SoL PRIOR; graded by the
  last `(X)` letter in the generation (the reference's "flexible-extract").

Rows that are malformed (bad JSON, a missing or non-string field) are errors naming file:line; rows
that are well-formed but carry no usable reference (no `####`, no `\\boxed{}`) are skipped and counted.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from megatron_bolt.errors import UserError

TASKS = ("toy", "gsm8k", "math", "mmlu_stem")
EOL_TEXT = "<|END_OF_LATENT|>"  # how EoL reads in decoded text

# lm-evaluation-harness's MMLU "stem" category (the reference evaluates its `*_stem` group).
MMLU_STEM_SUBJECTS = frozenset("""
abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science
college_mathematics college_physics computer_security conceptual_physics electrical_engineering
elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
high_school_mathematics high_school_physics high_school_statistics machine_learning
""".split())

# The reference's GSM8K number pattern: a run of digits, `$`, `.` and `,` (two or more), or an integer.
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_CHOICE = re.compile(r"\(([A-Z])\)")
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_MIRROR_TAIL = re.compile(r"\s*The answer is:[^\n]*\s*$")


@dataclass(frozen=True)
class Item:
    index: int  # position among the usable items of its source (0-based)
    line: int | None  # line in the JSONL file, None for generated items
    question: str
    reasoning: str  # worked solution, put inside the latent in the latent format
    solution: str  # plain-text solution of raw exemplars ("" for toy: its corpus has no working)
    answer: str  # reference answer (a number, LaTeX, or a choice letter)
    choices: tuple[str, ...] = ()  # mmlu_stem


@dataclass(frozen=True)
class TaskLayout:
    """How a task's prompts look: `head` + SoL PRIOR + latent + EoL + `tail` per exemplar, joined
    by `separator`; generation stops at any of `stops` (SoL and EOS always stop it)."""

    separator: str
    stops: tuple[str, ...]
    shots: int  # default number of exemplars
    raw_join: str  # between head and solution in the raw (no latent) layout

    def head(self, task: str, item: Item) -> str:
        if task == "gsm8k":
            return f"Question: {item.question}\nFinal Answer:"
        if task == "math":
            return f"Problem:\n{item.question}\n"
        if task == "mmlu_stem":
            options = "".join(f"({chr(65 + i)}) {c}\n" for i, c in enumerate(item.choices))
            return f"Question: {item.question.strip()}\n{options}Answer:"
        # toy: the chunker keeps a paragraph's blank line with it, so the thought follows it
        return f"Problem:\n{item.question}\n\n"

    def latent(self, task: str, item: Item) -> str:
        if task == "math":  # the reference puts the final answer inside the thought too
            return f"{item.reasoning}\nThe final answer is ${item.answer}$\n"
        return item.reasoning

    def tail(self, task: str, item: Item) -> str:
        if task == "gsm8k":
            return f" The final answer is {item.answer}. I hope it is correct."
        if task == "math":
            return f" Final Answer: The final answer is ${item.answer}$. I hope it is correct."
        if task == "mmlu_stem":
            k = ord(item.answer) - 65
            return f" The answer is ({item.answer}) {item.choices[k]}."
        return f"Final Answer: {item.answer}"


_QA_SEPARATOR = "\n\n\n\n##Problem\n"  # the reference's GSM8K and MMLU exemplar separator
LAYOUTS = {
    "toy": TaskLayout("\n\n", ("Problem:",), 4, ""),
    "gsm8k": TaskLayout(_QA_SEPARATOR, ("Question:", "Q:"), 8, " "),
    "math": TaskLayout("\n\n", ("Problem:",), 4, ""),
    "mmlu_stem": TaskLayout(_QA_SEPARATOR, ("Question:",), 4, " "),
}


def fixed_exemplars(task: str) -> list[Item]:
    """The project's fixed exemplars for a task (`exemplars.py`); none for toy."""
    from megatron_bolt.evaluation import exemplars as ex

    if task == "gsm8k":
        return [Item(i, None, q, z, z, a) for i, (q, z, a) in enumerate(ex.GSM8K)]
    if task == "math":
        return [Item(i, None, q, z, f"{z}\nFinal Answer: ${a}$", a) for i, (q, z, a) in enumerate(ex.MATH)]
    if task == "mmlu_stem":
        return [Item(i, None, q, z, z, chr(65 + k), tuple(c)) for i, (q, c, k, z) in enumerate(ex.MMLU_STEM)]
    return []


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
    return q, working, "", a, ()


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
    return q, reasoning, reasoning, final, ()


def _math_item(row: dict, where: str) -> tuple[str, str, str, str]:
    _, q = _field(row, ("problem", "question"), where)
    name, solution = _field(row, ("solution", "answer"), where)
    ref = last_boxed(solution)
    if ref is None or not ref.strip():
        raise Unusable(f"no \\boxed{{...}} in field '{name}'")
    reasoning = _MIRROR_TAIL.sub("", solution).strip()
    return q, reasoning, reasoning, ref.strip(), ()


def _mmlu_item(row: dict, where: str) -> tuple:
    subject = row.get("subject", row.get("type"))
    if isinstance(subject, str) and subject not in MMLU_STEM_SUBJECTS:
        raise Unusable("not a STEM subject")
    _, q = _field(row, ("question",), where)
    choices = row.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: field 'choices' must be a list of 2 to 26 strings")
    answer = row.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer.isupper():
        answer = ord(answer) - 65
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where}: field 'answer' must be the index (or letter) of one of the {len(choices)} choices")
    return q, "", "", chr(65 + answer), tuple(choices)


_READERS = {"toy": _toy_item, "gsm8k": _gsm8k_item, "math": _math_item, "mmlu_stem": _mmlu_item}


def load_items(path: str, task: str) -> Loaded:
    """All usable items of a JSONL file for `task` (see the module docstring)."""
    if task not in _READERS:
        raise UserError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    items: list[Item] = []
    skipped: list[int] = []
    reason = ""
    for lineno, row in read_jsonl(path):
        try:
            q, reasoning, solution, answer, choices = _READERS[task](row, f"{path}:{lineno}")
        except Unusable as exc:
            skipped.append(lineno)
            reason = reason or str(exc)
            continue
        items.append(Item(len(items), lineno, q, reasoning, solution, answer, choices))
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


def _normalize_number(text: str) -> str:
    """The reference's GSM8K normalization before exact match: no `,` or `$`, no final `.`."""
    return re.sub(r"\.$", "", text.replace(",", "").replace("$", "")).strip().lower()


def extract_gsm8k(prediction: str) -> str | None:
    """The last number in the latent (the text before the first EoL); None without an EoL."""
    if EOL_TEXT not in prediction:
        return None
    found = [a or b for a, b in _NUMBER.findall(prediction.split(EOL_TEXT, 1)[0])]
    return _normalize_number(found[-1]) if found else None


def extract_choice(prediction: str) -> str | None:
    """The last `(X)` choice letter in the generation."""
    found = _CHOICE.findall(prediction)
    return found[-1] if found else None


@lru_cache(maxsize=1)
def _math_verify():
    """math-verify's parse and verify, warmed up once with a generous time limit: its first parse
    loads the LaTeX grammar, which on a busy machine can exceed the per-answer limit."""
    from math_verify import parse, verify

    slow = 120 if threading.current_thread() is threading.main_thread() else None
    verify(parse("$\\boxed{1}$", parsing_timeout=slow), parse("$1$", parsing_timeout=slow), timeout_seconds=slow)
    return parse, verify


def math_verify_generation(reference: str, generation: str) -> bool:
    """math-verify of the whole generation against the reference answer (the reference's MATH grading)."""
    parse, verify = _math_verify()
    # math-verify's time limits use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"$\\boxed{{{reference}}}$", parsing_timeout=timeout)
    pred = parse(generation, parsing_timeout=timeout)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))


def grade(task: str, prediction: str, reference: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) of a generated text against the reference answer."""
    if task == "toy":
        from megatron_bolt.toy.world import extract_answer
        from megatron_bolt.toy.world import grade as toy_grade

        return extract_answer(prediction), toy_grade(prediction, reference)
    if task == "gsm8k":
        got = extract_gsm8k(prediction)
        return got, got is not None and got == _normalize_number(reference)
    if task == "math":
        parse, _ = _math_verify()
        correct = math_verify_generation(reference, prediction)
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        found = parse(prediction, parsing_timeout=timeout)
        return (str(found[-1]) if found else None), correct
    if task == "mmlu_stem":
        got = extract_choice(prediction)
        return got, got == reference
    raise UserError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")

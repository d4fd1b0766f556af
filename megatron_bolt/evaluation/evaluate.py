"""Few-shot evaluation of an HF export, in latent space (method.md) or on raw text.

`evaluate` builds one prompt per item (the task's `TaskLayout` says what goes where,
`megatron_bolt.data.formats` lays the pieces out and encodes them as merge writes training
sequences), decodes them greedily in batches with the KV-cached `LocalEngine`, cuts each
continuation at the task's first stop string (`Question:` / `Problem:`; SoL and EOS end a row as
stop ids), grades it and optionally writes `predictions.jsonl` and `accuracy.json`.

Exemplars are the first `shots` items of `exemplars` if given, else the task's fixed exemplars
(`evaluation/exemplars.py`; GSM8K 8 shots, MATH and MMLU-STEM 4, as the reference), else (toy) the
first `shots` items of the data, which are then not scored. Every item of the data is scored unless
`limit` says otherwise. `max_new_tokens` (default 1024, the reference's) is clamped so that at
least half of the model's context stays for the prompt; prompts longer than the rest lose their
oldest tokens (counted in the result as `truncated_prompts`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_bolt.atomic import atomic_write_text
from megatron_bolt.data.formats import encode_eval_prompt, latent_eval_pieces, raw_eval_pieces
from megatron_bolt.errors import UserError
from megatron_bolt.evaluation.tasks import LAYOUTS, TASKS, Item, fixed_exemplars, grade, load_items, toy_items

FORMATS = ("latent", "raw")
DEFAULT_TOY_ITEMS = 200
DEFAULT_MAX_NEW_TOKENS = 1024


def build_prompt(item: Item, exemplars: list[Item], fmt: str, tokenizer, task: str = "toy") -> list[int]:
    """Token ids of one item's few-shot prompt, BOS first (training documents start with BOS)."""
    layout = LAYOUTS[task]
    head = layout.head(task, item)
    if fmt == "latent":
        if tokenizer.latent is None:
            raise UserError(f"tokenizer {tokenizer.name} has no latent tokens: use --format raw")
        shots = [(layout.head(task, e), layout.latent(task, e), layout.tail(task, e)) for e in exemplars]
        pieces = latent_eval_pieces(head, shots, tokenizer.latent, layout.separator)
    elif fmt == "raw":
        shots = [(layout.head(task, e), layout.raw_join + e.solution, layout.tail(task, e)) for e in exemplars]
        pieces = raw_eval_pieces(head, shots, layout.separator)
    else:
        raise UserError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    # In a training document the text after a question's latent is its answer (the tail); tokenize
    # the prompt's end as if that text followed, as it does in every exemplar.
    follow = layout.tail(task, item) if fmt == "latent" else layout.raw_join + layout.tail(task, item)
    return encode_eval_prompt(pieces, tokenizer, bos=tokenizer.bos_id, continuation=follow)


def completion_text(tokens: list[int], stop_token: int | None, tokenizer, stops: tuple[str, ...]) -> str:
    """The decoded continuation without its stop token, cut before the first stop string."""
    body = tokens[:-1] if stop_token is not None else tokens
    text = tokenizer.decode(body)
    cuts = [c for c in (text.find(s) for s in stops) if c >= 0]
    return text[: min(cuts)] if cuts else text


def _select_items(task, data, shots, limit, exemplars, seed) -> tuple[list[Item], list[Item], dict]:
    """(exemplar items, scored items, what the result records about them)."""
    info: dict = {"data": data, "skipped": 0}
    skip_note = ""
    if data is None:
        if task != "toy":
            raise UserError(f"--data is required for task {task} (only toy can generate its items)")
        n = limit or DEFAULT_TOY_ITEMS
        pool = toy_items(n + (0 if exemplars else shots), seed)
        info["data"] = f"toy.world.make_eval_items(seed={seed})"
    else:
        loaded = load_items(data, task)
        pool = loaded.items
        if loaded.skipped:
            info.update(skipped=loaded.skipped, skipped_reason=loaded.reason, skipped_first_lines=loaded.skipped_lines)
            skip_note = (f"skipped {loaded.skipped} unusable item(s) of {data} ({loaded.reason}; "
                         f"first lines {', '.join(map(str, loaded.skipped_lines))})")
    if exemplars:
        ex = load_items(exemplars, task).items
        if len(ex) < shots:
            raise UserError(f"{exemplars}: {len(ex)} usable exemplar(s), --shots {shots} needs {shots}")
        shot_items, scored = ex[:shots], pool
        info["exemplars"] = f"first {shots} item(s) of {exemplars}"
    elif fixed_exemplars(task):
        fixed = fixed_exemplars(task)
        if shots > len(fixed):
            raise UserError(f"--shots {shots}: task {task} has {len(fixed)} fixed exemplars; "
                            f"give more with --exemplars FILE")
        shot_items, scored = fixed[:shots], pool
        info["exemplars"] = f"the {shots} fixed {task} exemplar(s) of megatron_bolt/evaluation/exemplars.py"
    else:
        if len(pool) <= shots:
            raise UserError(f"{info['data']}: {len(pool)} usable item(s), none left to score after {shots} "
                            f"exemplar(s)" + (f"; {skip_note}" if skip_note else ""))
        shot_items, scored = pool[:shots], pool[shots:]
        info["exemplars"] = f"first {shots} item(s) of the data, not scored" if shots else "none (zero-shot)"
    if not scored:
        raise UserError(f"{info['data']}: no usable items" + (f"; {skip_note}" if skip_note else ""))
    if skip_note:
        print(f"eval: {skip_note}", file=sys.stderr)
    if limit is not None:
        scored = scored[:limit]
    return shot_items, scored, info


_write_atomic = atomic_write_text


ENGINES = ("local", "vllm")


def _check_args(task, fmt, shots, limit, max_new_tokens, batch_size, model_dir) -> None:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    for name, value, low in (("shots", shots, 0), ("max-new-tokens", max_new_tokens, 1), ("batch-size", batch_size, 1)):
        if value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"{model_dir}: not an HF model directory (no config.json)")


def evaluate(
    model_dir: str,
    task: str,
    data: str | None,
    shots: int | None = None,
    limit: int | None = None,
    out_dir: str | None = None,
    fmt: str = "latent",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 32,
    exemplars: str | None = None,
    seed: int = 0,
    engine: str = "local",
    kv_cache_gib: float = 2.0,
) -> dict:
    """Few-shot greedy evaluation of the HF export `model_dir` on `task` (toy, gsm8k, math, mmlu_stem).

    engine: "local" (transformers in this process) or "vllm" (vLLM in this process, with a KV cache
    of kv_cache_gib); both decode greedily and stop at the same token.

    data: a JSONL file in the task's public format; None for toy generates `limit` (default 200)
    held-out problems with `seed`. shots: None = the task's default (8 for gsm8k, else 4).
    Returns {"task", "format", "accuracy", "correct", "n", "shots", "model", ...} and, with out_dir, writes out_dir/predictions.jsonl and out_dir/accuracy.json.
    """
    from tqdm import tqdm
    from transformers import AutoConfig

    from megatron_bolt.tokenizer import load_tokenizer

    if task in LAYOUTS and shots is None:
        shots = LAYOUTS[task].shots
    _check_args(task, fmt, shots, limit, max_new_tokens, batch_size, model_dir)
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    shot_items, items, info = _select_items(task, data, shots, limit, exemplars, seed)
    tokenizer = load_tokenizer(model_dir)
    prompts = [build_prompt(it, shot_items, fmt, tokenizer, task) for it in items]
    stops = LAYOUTS[task].stops

    # Checked on the config before the weights load, so that these errors come fast and alone.
    from megatron_bolt.models.hf_ponder import is_ponder_export

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=is_ponder_export(model_dir))
    top = max(max(p) for p in prompts)
    if top >= config.vocab_size:
        raise UserError(f"{model_dir}: token id {top} of the tokenizer is outside the model's vocabulary "
                        f"({config.vocab_size}); was the model exported with the latent tokens?")
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    truncated = 0
    requested = max_new_tokens
    if context:
        # Keep at least half the context for the prompt: a small model's context cannot hold the
        # reference's 1024 new tokens after an 8-shot prompt.
        longest = max(len(p) for p in prompts)
        max_new_tokens = max(1, min(max_new_tokens, context - min(longest, context // 2)))
        if max_new_tokens < requested:
            print(f"eval: --max-new-tokens {requested} clamped to {max_new_tokens}: the model's context is {context} "
                  f"tokens and the longest prompt {longest}", file=sys.stderr)
        budget = context - max_new_tokens
        truncated = sum(len(p) > budget for p in prompts)
        prompts = [p[-budget:] for p in prompts]
        if truncated:
            print(f"eval: {truncated} prompt(s) longer than the model's context ({context}) less --max-new-tokens "
                  f"({max_new_tokens}) lost their oldest tokens; fewer --shots would keep them whole", file=sys.stderr)
    if engine == "vllm":
        from megatron_bolt.inference.vllm import VLLMEngine

        runner = VLLMEngine(model_dir, kv_cache_gib=kv_cache_gib, max_num_seqs=batch_size)
    else:
        from megatron_bolt.inference.local import LocalEngine

        runner = LocalEngine(model_dir, max_batch_rows=batch_size)

    stop_ids = [tokenizer.eos_id] + ([tokenizer.latent.sol] if tokenizer.latent is not None else [])
    # A stop string can only have appeared in the last few tokens (each token adds >= 1 byte).
    tail = 2 * max(map(len, stops)) + 4

    def stop_check(tokens: list[int]) -> bool:
        recent = tokenizer.decode(tokens[-tail:])
        return any(s in recent for s in stops)

    # Longest first, in batches of similar length: less padding, and the slowest batch shows early.
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    rows: list[dict | None] = [None] * len(items)
    bar = tqdm(total=len(items), unit="item", file=sys.stderr, desc=f"eval {task}", dynamic_ncols=True)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        results = runner.generate_greedy([prompts[i] for i in idx], max_new_tokens, stop_ids, stop_check)
        for i, r in zip(idx, results):
            text = completion_text(r.tokens, r.stop_token, tokenizer, stops)
            extracted, correct = grade(task, text, items[i].answer)
            it = items[i]
            rows[i] = {"index": it.index, "line": it.line, "question": it.question, "answer": it.answer,
                       "generation": text, "extracted": extracted, "correct": bool(correct)}
        bar.update(len(idx))
    bar.close()
    runner.close()

    n = len(rows)
    correct = sum(r["correct"] for r in rows)  # type: ignore[index]
    result = {
        "task": task, "format": fmt, "accuracy": correct / n, "correct": correct, "n": n, "shots": shots,
        "model": str(model_dir), **info, "limit": limit, "max_new_tokens": max_new_tokens,
        "max_new_tokens_requested": requested, "seed": seed,
        "truncated_prompts": truncated, "engine": engine,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        _write_atomic(out / "accuracy.json", json.dumps(result, indent=2) + "\n")
    return result


def summary_line(result: dict) -> str:
    return (f"eval {result['task']} ({result['format']}, {result['shots']}-shot): "
            f"accuracy {result['accuracy']:.3f} ({result['correct']}/{result['n']})")

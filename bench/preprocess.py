"""Benchmark: `bolt preprocess` against Megatron-LM's own tools/preprocess_data.py, side by side.

Both tools run as separate processes on the same generated corpus (FineMath-like: paragraphs of
sentences with numbers and inline math) with the same HF tokenizer directory, for each worker count.
Reported per run: wall time of the whole command, tokens/s over it, and tokens/s with each tool's
start-up (imports, tokenizer load; measured on a one-document corpus) subtracted. The outputs are
checked to be byte-identical (same tokens, same dtype, same index), so the comparison is like for like.

  .venv/bin/python bench/preprocess.py --megatron-lm third_party_ref/Megatron-LM

Megatron-LM's script imports `megatron.training`, which needs `six` and `triton` beyond our
environment; put them in a separate folder (never in .venv) and pass it as --megatron-pythonpath:
  .venv/bin/pip install --target third_party_ref/pydeps six triton
The checkout itself: a Megatron-LM tag matching megatron-core (core_v0.16.1), outside git
(third_party_ref/ is gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, n_docs: int, seed: int = 0) -> int:
    """FineMath-like documents: Zipf-distributed words, sentences, paragraphs, numbers, inline math."""
    rng = np.random.default_rng(seed)
    base = ("the of and to a in is that for it as with be on by this are we let find value number sum "
            "equation solve answer prime function derivative integral triangle angle area probability "
            "therefore since because then so if each total step first second problem example").split()
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qu", "an", "er", "in", "on", "ul", "th"]
    extra = ["".join(rng.choice(syll, size=int(rng.integers(2, 5)))) for _ in range(5000)]
    vocab = np.array(base + extra)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    n_bytes = 0
    with open(path, "w") as f:
        for d in range(n_docs):
            paragraphs = []
            for _ in range(int(rng.integers(2, 8))):
                sentences = []
                for _ in range(int(rng.integers(2, 9))):
                    words = list(rng.choice(vocab, size=int(rng.integers(6, 25)), p=p))
                    if rng.random() < 0.3:
                        a, b = rng.integers(1, 1000, size=2)
                        words.append(f"${a} + {b} = {a + b}$")
                    if rng.random() < 0.2:
                        words.insert(int(rng.integers(0, len(words))), f"{rng.random() * 100:.2f}")
                    s = " ".join(words)
                    sentences.append(s[0].upper() + s[1:] + str(rng.choice([".", ".", ".", "?", "!"])))
                paragraphs.append(" ".join(sentences))
            line = json.dumps({"text": "\n\n".join(paragraphs), "id": d}) + "\n"
            n_bytes += len(line)
            f.write(line)
    return n_bytes


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> None:
    subprocess.run([sys.executable, "-m", "megatron_bolt.cli", "tokenizer", "train", "--input", str(corpus),
                    "--vocab-size", str(vocab_size), "--out", str(out)], check=True, cwd=ROOT)


def timed(cmd: list[str], env: dict) -> tuple[float, str, float]:
    """(wall seconds, stderr, CPU seconds of the command and the processes it waited for)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, proc.stderr, cpu


def bolt_cmd(corpus: Path, prefix: Path, tokenizer: Path, workers: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_bolt.cli", "preprocess", "--input", str(corpus), "--output-prefix",
            str(prefix), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer),
            "--append-eod", "--workers", str(workers), "--no-progress", *extra]


def megatron_cmd(mlm: Path, corpus: Path, prefix: Path, tokenizer: Path, workers: int) -> list[str]:
    return [sys.executable, str(mlm / "tools" / "preprocess_data.py"), "--input", str(corpus), "--output-prefix",
            str(prefix), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer),
            "--append-eod", "--workers", str(workers), "--log-interval", "100000000"]


def in_run_rate(stderr: str) -> float | None:
    """tokens/s that `bolt preprocess` reports for its own run (after imports and tokenizer load)."""
    m = re.search(r"^preprocess: .*?, ([\d.]+) tokens/s\)", stderr, re.MULTILINE)
    return float(m.group(1)) if m else None


def count_tokens(prefix: Path) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))  # keep it alive: its arrays are views of its mmap
    return int(ds.sequence_lengths.sum())


def same_output(a: Path, b: Path) -> bool:
    return all(
        Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes() for ext in (".bin", ".idx")
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megatron-lm", type=Path, help="Megatron-LM checkout (tag core_v0.16.1)")
    ap.add_argument("--megatron-pythonpath", type=Path, default=None,
                    help="extra site folder for Megatron-LM's script (six, triton); default <checkout>/../pydeps")
    ap.add_argument("--docs", type=int, default=20_000, help="documents in the generated corpus")
    ap.add_argument("--vocab-size", type=int, default=32_000, help="BPE vocabulary trained for the run")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this HF tokenizer directory instead")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk-store", action="store_true", help="also time bolt with --chunk-store")
    ap.add_argument("--threads-row", action="store_true",
                    help="also time bolt with 1 worker and --tokenizer-threads 2")
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bolt-bench-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, tiny = work / "corpus.jsonl", work / "one_doc.jsonl"
    n_bytes = make_corpus(corpus, args.docs)
    make_corpus(tiny, 1, seed=1)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = work / "tokenizer"
        sample = work / "tokenizer_sample.jsonl"
        make_corpus(sample, min(args.docs, 3000), seed=2)
        train_tokenizer(sample, tokenizer, args.vocab_size)

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    menv = dict(env)
    mlm_reason = None
    if args.megatron_lm is None:
        mlm_reason = "no --megatron-lm checkout given"
    else:
        mlm = args.megatron_lm.resolve()
        deps = args.megatron_pythonpath or mlm.parent / "pydeps"
        if deps.exists():
            menv["PYTHONPATH"] = f"{deps}{os.pathsep}{env['PYTHONPATH']}"

    print(f"corpus: {args.docs} documents, {n_bytes / 1e6:.1f} MB; tokenizer {tokenizer}; cpus {os.cpu_count()}")
    rows = []

    def run(tool: str, workers: int, cmd_for) -> Path:
        prefix = work / f"{tool.replace(' ', '_')}_w{workers}"
        startup, _, startup_cpu = timed(cmd_for(tiny, work / f"startup_{tool.replace(' ', '_')}_w{workers}"),
                                        env_for(tool))
        wall, err, cpu = timed(cmd_for(corpus, prefix), env_for(tool))
        tokens = count_tokens(Path(f"{prefix}_text_document"))
        rate = in_run_rate(err)
        per_cpu = tokens / max(cpu - startup_cpu, 1e-9)  # robust to other users' load on a shared machine
        rows.append((tool, workers, wall, startup, tokens, rate, per_cpu))
        print(f"  {tool:<22} workers={workers}  wall {wall:6.1f}s  startup {startup:5.1f}s  "
              f"{tokens / wall:>10,.0f} tok/s  {tokens / max(wall - startup, 1e-9):>10,.0f} tok/s excl. startup  "
              f"{per_cpu:>10,.0f} tok/CPU-s excl. startup" + (f"  {rate:>10,.0f} tok/s in-run" if rate else ""),
              flush=True)
        return Path(f"{prefix}_text_document")

    def env_for(tool: str) -> dict:
        return menv if tool == "megatron-lm" else env

    identical = {}
    for w in args.workers:
        ours = run("bolt preprocess", w, lambda c, p, w=w: bolt_cmd(c, p, tokenizer, w, []))
        if mlm_reason is None:
            try:
                theirs = run("megatron-lm", w, lambda c, p, w=w: megatron_cmd(mlm, c, p, tokenizer, w))
                identical[w] = same_output(ours, theirs)
            except RuntimeError as exc:
                mlm_reason = f"Megatron-LM's script failed: {str(exc).splitlines()[-1]}"
        if w == 1 and args.threads_row:
            run("bolt, 2 tok. threads", w,
                lambda c, p, w=w: bolt_cmd(c, p, tokenizer, w, ["--tokenizer-threads", "2"]))
        if args.chunk_store:
            run("bolt + chunk store", w,
                lambda c, p, w=w: bolt_cmd(c, p, tokenizer, w, ["--chunk-store", f"{p}.zarr"]))

    print("\n| tool | workers | wall s | tokens/s | tokens/s excl. start-up | in-run tokens/s (bolt's own) "
          "| tokens per CPU-second excl. start-up |")
    print("|---|---|---|---|---|---|---|")
    for tool, w, wall, startup, tokens, rate, per_cpu in rows:
        print(f"| {tool} | {w} | {wall:.1f} | {tokens / wall:,.0f} | {tokens / max(wall - startup, 1e-9):,.0f} | "
              f"{f'{rate:,.0f}' if rate else '-'} | {per_cpu:,.0f} |")
    by_tool = {(t, w): (r, c) for t, w, _, _, _, r, c in rows}
    for w in args.workers:
        plain, chunked = by_tool.get(("bolt preprocess", w)), by_tool.get(("bolt + chunk store", w))
        if plain and chunked:
            ratios = [f"{c / p:.2f}x" if c and p else "-" for c, p in zip(chunked, plain)]
            print(f"workers={w}: the chunk-store path runs at {ratios[0]} plain preprocessing's in-run tokens/s "
                  f"and {ratios[1]} its tokens per CPU-second")
    if mlm_reason:
        print(f"\nMegatron-LM not compared: {mlm_reason}")
    for w, same in identical.items():
        print(f"workers={w}: outputs byte-identical to Megatron-LM's: {same}")
        by = {t: (wall, startup, tokens) for t, ww, wall, startup, tokens, _, _ in rows if ww == w}
        if "megatron-lm" in by:
            (bw, bs, _), (mw, ms, _) = by["bolt preprocess"], by["megatron-lm"]
            print(f"workers={w}: speed-up {mw / bw:.2f}x end to end, {(mw - ms) / max(bw - bs, 1e-9):.2f}x "
                  "excluding start-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())

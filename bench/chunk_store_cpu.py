"""Benchmark: CPU cost of the chunk-store path against plain preprocessing, in one process.

`bench/preprocess.py` times whole commands; on a loaded shared machine their start-up (imports,
~10-40 s there) swamps a small corpus. This runs `preprocess()` itself, all imports done first,
plain and with `--chunk-store` alternately, and reports the best of `--repeats` for each as tokens
per CPU-second (this process and its worker processes, user + system) and per wall second. Punkt's
decision memo is emptied before every chunk-store run, so each one pays for a cold pass over the
corpus as a real run does.

  .venv/bin/python bench/chunk_store_cpu.py --docs 3000 --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from preprocess import make_corpus, train_tokenizer  # noqa: E402  (bench/preprocess.py)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000, help="documents in the generated corpus")
    ap.add_argument("--tokenizer", type=Path, default=None, help="HF tokenizer directory (default: train one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    from megatron.core.datasets import indexed_dataset  # noqa: F401  (imported before timing)

    from megatron_bolt.data import chunking
    from megatron_bolt.data.preprocess import PreprocessConfig, preprocess

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bolt-bench-chunk-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    make_corpus(corpus, args.docs)
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer, sample = work / "tokenizer", work / "tokenizer_sample.jsonl"
        make_corpus(sample, min(args.docs, 3000), seed=2)
        train_tokenizer(sample, tokenizer, 32_000)

    def run(chunk: bool) -> tuple[float, float]:
        store = work / "out.zarr"
        shutil.rmtree(store, ignore_errors=True)
        chunking._punkt.cache_clear()  # a cold decision memo, as in one real pass
        chunking.load_sentence_splitter()
        cfg = PreprocessConfig([str(corpus)], str(work / "out"), str(tokenizer), append_eod=True, progress=False,
                               chunk_store=str(store) if chunk else None)
        cpu, wall = cpu_seconds(), time.perf_counter()
        tokens = preprocess(cfg).tokens
        return tokens / (cpu_seconds() - cpu), tokens / (time.perf_counter() - wall)

    best = {False: (0.0, 0.0), True: (0.0, 0.0)}
    for _ in range(args.repeats):
        for chunk in (False, True):
            cpu, wall = run(chunk)
            best[chunk] = (max(best[chunk][0], cpu), max(best[chunk][1], wall))
    (pc, pw), (cc, cw) = best[False], best[True]
    print(f"plain:       {pc:>10,.0f} tokens/CPU-s  {pw:>10,.0f} tokens/s")
    print(f"chunk store: {cc:>10,.0f} tokens/CPU-s  {cw:>10,.0f} tokens/s")
    print(f"chunk store / plain: {cc / pc:.2f}x per CPU-second, {cw / pw:.2f}x per wall second")
    return 0


if __name__ == "__main__":
    sys.exit(main())

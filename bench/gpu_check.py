"""The Python steps of bench/gpu_check.sh (run that script, not this file).

    gpu_check.py data PREFIX VOCAB DOCS MAXLEN     synthetic token corpus for the run
    gpu_check.py throughput METRICS SKIP           median tokens/s and MFU, peak memory
    gpu_check.py resume FIRST SECOND FROM          losses after FROM agree between the two runs
    gpu_check.py score HF SCORED INPUT DEVICE      `bolt score` against transformers' log-probs
    gpu_check.py sequences OUT VOCAB N LEN         random token lines for `bolt score`
Each prints one `gpu_check: ...` line and exits non-zero when its check fails.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _records(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def data(prefix: str, vocab: str, docs: str, max_len: str) -> None:
    from megatron_bolt.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(prefix, num_docs=int(docs), vocab_size=int(vocab), doc_len=(32, int(max_len)))
    print(f"gpu_check: data {prefix} ({docs} documents, vocab {vocab})")


def throughput(metrics: str, skip: str) -> None:
    """Steps after the first SKIP (compilation, allocator warm-up) only."""
    records = _records(metrics)
    steady = records[int(skip):] or records
    tok = statistics.median(r["tokens_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    peaks = [r["peak_mem_gib"] for r in records if r.get("peak_mem_gib") is not None]
    mfu = f"{statistics.median(mfus):.1%}" if mfus else "n/a (no known peak for this device)"
    peak = f"{max(peaks):.2f} GiB" if peaks else "n/a (CPU)"
    print(f"gpu_check: throughput over steps {steady[0]['step']}-{steady[-1]['step']}: "
          f"{tok:,.0f} tokens/s, MFU {mfu}, peak memory {peak}")


def resume(first: str, second: str, start: str) -> None:
    """The resumed run redoes the steps after FROM; its losses must match the uninterrupted run's."""
    a = {r["step"]: r["loss"] for r in _records(first)}
    b = {r["step"]: r["loss"] for r in _records(second)}
    steps = sorted(s for s in b if s > int(start))
    if not steps or any(s not in a for s in steps):
        sys.exit(f"gpu_check: FAIL resume: resumed run has steps {steps}, first run {sorted(a)}")
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
    ok = worst < 1e-2  # bf16 GPU kernels are not bit-deterministic run to run
    print(f"gpu_check: resume from step {start}: steps {steps[0]}-{steps[-1]} max relative loss "
          f"difference {worst:.2e} {'ok' if ok else 'FAIL'}")
    if not ok:
        sys.exit(1)


def sequences(out: str, vocab: str, n: str, length: str) -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    with open(out, "w") as f:
        for _ in range(int(n)):
            f.write(json.dumps({"tokens": torch.randint(1, int(vocab), (int(length),), generator=gen).tolist()}) + "\n")


def score(hf: str, scored: str, inputs: str, device: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype="auto").to(device).eval()
    got = _records(scored)
    worst = 0.0
    with torch.no_grad():
        for line, g in zip(_records(inputs), got):
            ids = torch.tensor([line["tokens"]], device=device)
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0, :-1]
            want = logp.gather(-1, ids[0, 1:, None]).sum().item()
            worst = max(worst, abs(g["logprob"] - want) / abs(want))
    # Both sides run the checkpoint's dtype; in bf16 the two attention/matmul implementations
    # round differently, so agreement is to about 1e-3 of the summed log-prob, not bitwise.
    ok = worst < 1e-2 and len(got) == len(_records(inputs))
    print(f"gpu_check: bolt score vs transformers ({model.dtype}, {device}): max relative difference "
          f"{worst:.2e} over {len(got)} sequences {'ok' if ok else 'FAIL'}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    commands = {"data": data, "throughput": throughput, "resume": resume, "score": score, "sequences": sequences}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])

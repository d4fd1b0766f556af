"""Which toy-world workings can the demo's tiny model learn within a CPU budget?

    .venv/bin/python bench/toy_learnability.py WORLD {latent,raw} [--steps 300] [--layers 4] [--threads 1]

A probe for designing the toy world (megatron_bolt/toy), outside the product: a word-level
vocabulary (no BPE), documents of 4-10 problems in the layout the EM loop trains on (each problem
in prior or posterior form with probability 1/2, or raw), a `transformers` Llama of the demo's size
trained with the demo's optimiser settings, then greedy 4-shot accuracy on 200 held-out problems.
Worlds (q: question, z: working, a: answer; every step of z looks at tokens a fixed distance back):
- chain:   q = `x kN`; z counts down N applications of a fixed permutation of 0-9 (one-input lookups)
- running: q = four digits; z = running sums mod 10 (a two-input lookup per step)
- repeat:  q = `x + s kN`; z adds s, N times, mod 10 (two-input lookup per step)
- clock:   q = `x kN`, x in 0-99; z adds 17 mod 100 N times (one-input lookups; the demo's arithmetic, word-level)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = (["<s>", "SoL", "EoL", "PRI", "POS", "P:", "FA:", "\n", "+", "="] + [str(i) for i in range(10)]
         + [f"k{i}" for i in range(10)] + [f"n{i:02d}" for i in range(100)])
IDS = {t: i for i, t in enumerate(VOCAB)}


def make_world(name: str):
    perm_rng = np.random.default_rng(123)
    order = perm_rng.permutation(10)
    cycle = np.empty(10, dtype=int)
    cycle[order] = np.roll(order, -1)  # one 10-cycle: f^k(x) is uniform over answers

    def gen(rng):
        if name == "chain":
            x, k = int(rng.integers(10)), int(rng.integers(2, 8))
            z, v = [str(x), f"k{k}"], x
            for c in range(k - 1, -1, -1):
                v = int(cycle[v])
                z += [str(v), f"k{c}"]
            return [str(x), f"k{k}"], z, str(v)
        if name == "running":
            d = [int(x) for x in rng.integers(0, 10, 4)]
            z, s = [str(d[0])], d[0]
            for x in d[1:]:
                s = (s + x) % 10
                z.append(str(s))
            return [str(x) for x in d], z, str(s)
        if name == "repeat":
            x, s, k = int(rng.integers(10)), int(rng.integers(1, 10)), int(rng.integers(2, 6))
            z, v = [str(x)], x
            for c in range(k - 1, -1, -1):
                v = (v + s) % 10
                z += ["+", str(s), "=", str(v), f"k{c}"]
            return [str(x), "+", str(s), f"k{k}"], z, str(v)
        if name == "clock":
            x, k = int(rng.integers(100)), int(rng.integers(2, 10))
            z, v = [f"n{x:02d}", f"k{k}"], x
            for c in range(k - 1, -1, -1):
                v = (v + 17) % 100
                z += [f"n{v:02d}", f"k{c}"]
            return [f"n{x:02d}", f"k{k}"], z, f"n{v:02d}"
        raise SystemExit(f"unknown world {name!r}")

    return gen


def problem(gen, rng, mode: str, form: int | None = None) -> list[str]:
    q, z, a = gen(rng)
    if mode == "raw":
        return ["P:", *q, "\n", "FA:", a, "\n"]
    form = int(rng.integers(2)) if form is None else form
    if form == 0:
        return ["P:", *q, "SoL", "PRI", *z, "EoL", "FA:", a, "\n"]
    return ["P:", *q, "SoL", "EoL", "FA:", a, "SoL", "POS", *z, "EoL", "\n"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("world", choices=("chain", "running", "repeat", "clock"))
    p.add_argument("mode", choices=("latent", "raw"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen, rng = make_world(args.world), np.random.default_rng(args.seed)
    stream = ["<s>"]
    while len(stream) < 3_000_000:
        for _ in range(int(rng.integers(4, 11))):
            stream += problem(gen, rng, args.mode)
        stream.append("<s>")
    ids = np.array([IDS[t] for t in stream], dtype=np.int64)

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=384, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    start = time.time()
    for step in range(args.steps):  # the demo's schedule: 10 warm-up steps, cosine to lr/10
        lr = args.lr * min(1, (step + 1) / 10) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.tensor(np.stack([ids[i:i + 257] for i in rng.integers(0, len(ids) - 257, 16)]))
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).logits.reshape(-1, len(VOCAB)), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)

    model.eval()
    erng = np.random.default_rng(999)
    shots = [t for _ in range(4) for t in problem(gen, erng, args.mode, form=0)]
    correct, n = 0, 200
    for _ in range(n):
        toks = problem(gen, erng, args.mode, form=0)
        answer = toks[toks.index("FA:") + 1]
        cut = toks.index("FA:") + 1 if args.mode == "raw" else toks.index("SoL") + 2
        ctx, out = [IDS["<s>"]] + [IDS[t] for t in shots + toks[:cut]], []
        with torch.no_grad():
            for _ in range(60):
                nxt = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
                ctx.append(nxt)
                out.append(VOCAB[nxt])
                if args.mode == "raw" or out[-2:-1] == ["FA:"] or out[-1] == "\n":
                    break
        got = out[-1] if args.mode == "raw" else (out[out.index("FA:") + 1] if "FA:" in out[:-1] else None)
        correct += got == answer
    print(f"world={args.world} mode={args.mode} steps={args.steps} layers={args.layers} accuracy={correct / n:.3f}")


if __name__ == "__main__":
    main()

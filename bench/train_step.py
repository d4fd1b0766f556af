"""Training throughput: megatron-bolt (Megatron-Core) vs a plain PyTorch loop of the same model.

    .venv/bin/python bench/train_step.py [--layers 4 --hidden 256 --seq 256 --micro-batch 8 --steps 30]

Both sides train the same Llama-style model (RMSNorm, SwiGLU, RoPE, GQA, no biases) on the same
synthetic batches with AdamW and grad clipping, in one process. Reports the median tokens/s over
steps after warm-up; on GPU also the model FLOPs utilisation (MFU) of the Megatron side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, base=10000.0):
    b, h, s, d = x.shape
    inv = 1.0 / base ** (torch.arange(0, d, 2, device=x.device).float() / d)
    freqs = torch.outer(torch.arange(s, device=x.device).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


class Block(nn.Module):
    def __init__(self, d, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
        q = rope(q.view(b, s, self.heads, self.hd).transpose(1, 2))
        k = rope(k.view(b, s, self.kv_heads, self.hd).transpose(1, 2))
        v = v.view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        x = x + self.proj(a)
        gate, up = self.fc1(self.n2(x)).chunk(2, -1)
        return x + self.fc2(F.silu(gate) * up)


class PlainLlama(nn.Module):
    def __init__(self, vocab, d, layers, heads, kv_heads, ffn):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.out = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens, labels):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x)
        logits = self.out(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))


def plain_pytorch(args, data_prefix: str, dev: torch.device) -> list[float]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(data_prefix)
    flat = torch.from_numpy(ds.bin_reader.read(dtype=ds.index.dtype, count=ds.index.sequence_lengths.sum(), offset=0).astype("int64"))
    torch.manual_seed(0)
    model = PlainLlama(args.vocab, args.hidden, args.layers, args.heads, args.kv_heads, args.ffn).to(dev)
    if args.bf16:
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rates = []
    n = args.micro_batch * (args.seq + 1)
    for step in range(args.steps):
        t0 = time.time()
        chunk = flat[(step * n) % (len(flat) - n) :][:n].view(args.micro_batch, args.seq + 1).to(dev)
        loss = model(chunk[:, :-1], chunk[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rates.append(args.micro_batch * args.seq / (time.time() - t0))
    return rates


def megatron_bolt_run(args, data_prefix: str, workdir: Path) -> list[float]:
    out = workdir / "mb"
    overrides = [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.num_attention_heads={args.heads}",
        f"model.num_query_groups={args.kv_heads}", f"model.ffn_hidden_size={args.ffn}", f"model.vocab_size={args.vocab}",
        f"model.seq_len={args.seq}", "model.make_vocab_divisible_by=1", f"train.steps={args.steps}",
        f"train.micro_batch={args.micro_batch}", f"train.global_batch={args.micro_batch}", f"train.bf16={str(args.bf16).lower()}",
        "train.log_interval=1000", f"data.prefixes=[{data_prefix}]", "data.split=100,0,0", f"output_dir={out}",
        "checkpoint.save_optimizer=false",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "megatron_bolt", "train", str(REPO / "examples/tiny/config.yaml"), *overrides],
                   check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return [json.loads(x)["tokens_per_s"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def model_flops_per_token(args) -> float:
    hd = args.hidden // args.heads
    per_layer = 2 * args.hidden * (args.heads + 2 * args.kv_heads) * hd + 2 * args.hidden * args.hidden
    per_layer += 2 * args.hidden * 3 * args.ffn + 2 * args.seq * args.hidden  # attention scores + values
    return 3 * (args.layers * per_layer + 2 * args.hidden * args.vocab)  # forward + backward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak for MFU (H100 SXM bf16 dense: 989)")
    args = p.parse_args()

    from megatron_bolt.data.synthetic import write_synthetic_dataset

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = write_synthetic_dataset(Path(tmp) / "data", num_docs=2000, vocab_size=args.vocab, doc_len=(256, 1024))
        mb = megatron_bolt_run(args, prefix, Path(tmp))[args.warmup_steps :]
        plain = plain_pytorch(args, prefix, dev)[args.warmup_steps :]
    mb_rate, plain_rate = statistics.median(mb), statistics.median(plain)
    result = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "config": vars(args),
        "megatron_bolt_tokens_per_s": round(mb_rate, 1),
        "plain_pytorch_tokens_per_s": round(plain_rate, 1),
        "ratio": round(mb_rate / plain_rate, 3),
    }
    if dev.type == "cuda":
        result["megatron_bolt_mfu"] = round(mb_rate * model_flops_per_token(args) / (args.peak_tflops * 1e12), 4)
    print(json.dumps(result, indent=2))
    assert math.isfinite(mb_rate)


if __name__ == "__main__":
    main()

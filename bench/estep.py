"""E-step throughput of the local engine vs a one-prompt-at-a-time `generate` loop.

Builds a random Llama-style model from a config (no downloads) and a random chunk store, then:
  1. baseline: for every (chunk, sample), `model.generate(do_sample=True, temperature=1, top_k=0)`
     on the posterior prompt, log q from the returned logits (what a straightforward script does);
  2. the E-step's `sample_and_weight` with the local engine: all (chunk, sample) rows batched with a
     KV cache, then batched scoring of `SoL PRIOR Z EoL X`.
Reports latents/s and latent tokens/s of both, the speed-up, and scoring time / sampling time.
A random model rarely emits EoL, so latents mostly run to --max-latent-tokens in both paths.

    .venv/bin/python bench/estep.py [--chunks 16 --samples 4 --max-latent-tokens 64 --layers 4 --hidden 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_bolt.config import EStepConfig
from megatron_bolt.data.formats import posterior_sampling_prompt, prior_scoring_sequence
from megatron_bolt.inference.local import LocalEngine
from megatron_bolt.latents.estep import sample_and_weight
from megatron_bolt.stores.chunk_store import ChunkStore, write_chunk_store
from megatron_bolt.tokenizer import LatentTokenIds


def build(tmp: str, args) -> tuple[str, str]:
    torch.manual_seed(0)
    v = args.vocab
    cfg = LlamaConfig(vocab_size=v, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=1)
    model_dir = f"{tmp}/hf"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    special = {"bos": 0, "eos": 1, "sol": v - 4, "eol": v - 3, "prior": v - 2, "posterior": v - 1}
    rng = np.random.default_rng(0)
    docs = []
    per_doc = args.prefix_chunks + 1
    for _ in range((args.chunks + per_doc - 1) // per_doc):
        docs.append([rng.integers(2, v - 4, size=args.chunk_tokens).astype(np.int32) for _ in range(per_doc)])
    chunks_path = f"{tmp}/chunks.zarr"
    write_chunk_store(chunks_path, docs, {"tokenizer": "bench", "vocab_size": v, "special_tokens": special})
    return model_dir, chunks_path


def baseline(model_dir: str, chunks: ChunkStore, idx: list[int], args) -> tuple[float, float, int]:
    """(sampling seconds, scoring seconds, generated tokens) of the one-at-a-time script."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
    ids = LatentTokenIds.from_special_tokens(chunks.special_tokens, str(chunks.path))
    bos = chunks.special_tokens["bos"]
    tokens = 0
    score_s = 0.0
    t0 = time.perf_counter()
    for i in idx:
        prefix = chunks.prefix_tokens(i, args.prefix_chunks).tolist()
        prompt = [bos] + posterior_sampling_prompt(prefix, chunks.chunk_tokens(i).tolist(), ids)
        inp = torch.tensor([prompt], device=args.device)
        for _ in range(args.samples):
            with torch.no_grad():
                out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=True, temperature=1.0,
                                     top_k=0, top_p=1.0, max_new_tokens=args.max_latent_tokens, eos_token_id=ids.eol,
                                     pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            new = out.sequences[0, len(prompt):]
            logp = torch.stack([torch.log_softmax(s[0].float(), -1)[t] for s, t in zip(out.logits, new)])
            float(logp.sum())
            tokens += len(new)
            # log p(Z, X): one forward over BOS C SoL PRIOR Z EoL X, summed after BOS C
            ts = time.perf_counter()
            z = new.tolist()
            z = z[:-1] if z and z[-1] == ids.eol else z
            seq, start = prior_scoring_sequence(prefix, z, chunks.chunk_tokens(i).tolist(), ids)
            seq = torch.tensor([[bos] + seq], device=args.device)
            with torch.no_grad():
                lp = torch.log_softmax(model(seq).logits[0].float(), -1)
            float(lp[start : seq.shape[1] - 1].gather(-1, seq[0, start + 1 :, None]).sum())
            score_s += time.perf_counter() - ts
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return total - score_s, score_s, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-latent-tokens", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=48)
    ap.add_argument("--prefix-chunks", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--baseline-chunks", type=int, default=None, help="time the baseline on fewer chunks")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU time instead of the wall clock (a loaded shared machine; "
                         "with --threads 1 the two agree on an idle one)")
    args = ap.parse_args()
    if args.cpu_time:
        time.perf_counter = time.process_time  # every timer here and in the E-step reads it
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, chunks_path = build(tmp, args)
        chunks = ChunkStore.open(chunks_path)
        idx = list(range(min(args.chunks, chunks.num_chunks)))
        engine = LocalEngine(model_dir, device=args.device)
        settings = EStepConfig(args.samples, args.prefix_chunks, args.max_latent_tokens, seed=0)
        sample_and_weight(engine, chunks, idx[:2], settings, block=999)  # warm-up
        t0 = time.perf_counter()
        res = sample_and_weight(engine, chunks, idx, settings, block=0)
        local_s = time.perf_counter() - t0
        base_idx = idx[: args.baseline_chunks or len(idx)]
        base_sample_s, base_score_s, base_tokens = baseline(model_dir, chunks, base_idx, args)
    n_lat = len(idx) * args.samples
    n_base = len(base_idx) * args.samples
    lat_tokens = res.latent_tokens + int(res.finished.sum())  # generated tokens incl. EoL
    report = {
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "model": f"llama L{args.layers} d{args.hidden} V{args.vocab}",
        "chunks": len(idx), "samples": args.samples, "max_latent_tokens": args.max_latent_tokens,
        # whole E-step (sample + score + weights + resample) per latent
        "local_latents_per_s": n_lat / local_s,
        "local_latent_tokens_per_s": lat_tokens / local_s,
        "baseline_latents_per_s": n_base / (base_sample_s + base_score_s),
        "speedup": (n_lat / local_s) / (n_base / (base_sample_s + base_score_s)),
        # sampling alone
        "local_sampling_latent_tokens_per_s": lat_tokens / res.sample_seconds,
        "baseline_sampling_latent_tokens_per_s": base_tokens / base_sample_s,
        "sampling_speedup": (n_lat / res.sample_seconds) / (n_base / base_sample_s),
        "sampling_s": res.sample_seconds,
        "scoring_s": res.score_seconds,
        "scoring_share_of_sampling": res.score_seconds / res.sample_seconds,
        "baseline_scoring_share_of_sampling": base_score_s / base_sample_s,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""E-step throughput of the local engine vs a one-prompt-at-a-time `generate` loop, and vs vLLM.

Builds a random Llama-style model from a config (no downloads) and a random chunk store, then:
  1. baseline: for every (chunk, sample), `model.generate(do_sample=True, temperature=1, top_k=0)`
     on the posterior prompt, log q from the returned logits (what a straightforward script does);
  2. the E-step's `sample_and_weight` with the local engine: all (chunk, sample) rows batched with a
     KV cache, then batched scoring of `SoL PRIOR Z EoL X`;
  3. with --vllm, the same `sample_and_weight` with the in-process vLLM engine, side by side with
     the local one: whole E-step, sampling and scoring. Both engines then also score the same
     (prompt, continuation) pairs (the latents vLLM sampled), so scoring is compared on equal work.
Each engine lives in its own process (spawned, each set up as `bolt estep` sets itself up), and the
parent runs them one at a time, alternating: loading vLLM changes its process for every other
kernel (it binds the OpenMP threads, sets a strict NUMA memory policy, replaces
torch.set_num_threads; measured: torch's SiLU 5x slower after vLLM loads), which a user running
either engine alone never sees, while alternating keeps the machine's drift out of the ratios.
Reports latents/s and latent tokens/s, the speed-ups, and scoring time / sampling time.
A random model rarely emits EoL, so latents mostly run to --max-latent-tokens in every path.

    .venv/bin/python bench/estep.py [--chunks 16 --samples 4 --max-latent-tokens 64 --layers 4 --hidden 256]
    .venv/bin/python bench/estep.py --threads 2 --vllm --baseline-chunks 0      # local vs vLLM only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import tempfile
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_bolt.cli import process_defaults, set_torch_threads
from megatron_bolt.config import EStepConfig
from megatron_bolt.data.formats import posterior_sampling_prompt, prior_scoring_sequence
from megatron_bolt.inference.base import Engine
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
    ap.add_argument("--baseline-chunks", type=int, default=None, help="time the baseline on fewer chunks (0: skip it)")
    ap.add_argument("--vllm", action="store_true", help="also run the E-step through the in-process vLLM engine")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM engine's KV cache")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each engine's E-step (and same-pairs scoring) this many times, alternating engines, "
                         "and keep each one's fastest run (a loaded shared machine)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed E-step rounds of every engine before the timed ones")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with each process's own CPU time instead of the wall clock (a loaded shared machine; "
                         "with --threads 1 the two agree on an idle one)")
    args = ap.parse_args()
    if args.cpu_time:
        time.perf_counter = time.process_time  # every timer here and in the E-step reads it
    set_torch_threads(args.threads)  # for the baseline; each engine's process sets its own
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, chunks_path = build(tmp, args)
        chunks = ChunkStore.open(chunks_path)
        idx = list(range(min(args.chunks, chunks.num_chunks)))
        settings = EStepConfig(args.samples, args.prefix_chunks, args.max_latent_tokens, seed=0)
        names = ["local", "vllm"] if args.vllm else ["local"]
        engines = {name: EngineProcess(name, model_dir, chunks_path, idx, settings, args) for name in names}
        runs: dict = {}
        try:
            # one untimed round each first: right after an engine loads, the machine is still busy
            # for some seconds (measured: the local engine's scoring 1.5-1.6x slower just after
            # vLLM started next to it, back to its usual time a few calls later)
            for _ in range(args.warmup):
                for eng in engines.values():
                    eng.call("estep")
            for _ in range(max(1, args.repeats)):
                for name, eng in engines.items():
                    run = eng.call("estep")
                    if name not in runs or run[0] < runs[name][0]:
                        runs[name] = run
            if args.vllm:
                # equal work for scoring: both engines score the latents vLLM sampled
                pairs = scoring_pairs(chunks, idx, runs["vllm"][1], args.prefix_chunks)
                same: dict[str, float] = {}
                for _ in range(max(1, args.repeats)):
                    for name, eng in engines.items():
                        same[name] = min(same.get(name, float("inf")), eng.call("score", pairs))
                for name in engines:
                    runs[name] = (*runs[name], same[name])
        finally:
            for eng in engines.values():
                eng.close()
        base_idx = idx[: len(idx) if args.baseline_chunks is None else args.baseline_chunks]
        if base_idx:
            base_sample_s, base_score_s, base_tokens = baseline(model_dir, chunks, base_idx, args)
    n_lat = len(idx) * args.samples
    local_s, res = runs["local"][:2]
    lat_tokens = res.latent_tokens + int(res.finished.sum())  # generated tokens incl. EoL
    report = {
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "model": f"llama L{args.layers} d{args.hidden} V{args.vocab}",
        "parameters_M": round(params_m(args), 1),
        "chunks": len(idx), "samples": args.samples, "max_latent_tokens": args.max_latent_tokens,
        # whole E-step (sample + score + weights + resample) per latent
        "local_latents_per_s": n_lat / local_s,
        "local_latent_tokens_per_s": lat_tokens / local_s,
        "local_sampling_latent_tokens_per_s": lat_tokens / res.sample_seconds,
        "sampling_s": res.sample_seconds,
        "scoring_s": res.score_seconds,
        "scoring_share_of_sampling": res.score_seconds / res.sample_seconds,
    }
    if base_idx:
        n_base = len(base_idx) * args.samples
        report.update({
            "baseline_latents_per_s": n_base / (base_sample_s + base_score_s),
            "speedup": (n_lat / local_s) / (n_base / (base_sample_s + base_score_s)),
            "baseline_sampling_latent_tokens_per_s": base_tokens / base_sample_s,
            "sampling_speedup": (n_lat / res.sample_seconds) / (n_base / base_sample_s),
            "baseline_scoring_share_of_sampling": base_score_s / base_sample_s,
        })
    if args.vllm:
        v_s, v_res, v_score_same = runs["vllm"]
        v_tokens = v_res.latent_tokens + int(v_res.finished.sum())
        local_score_same = runs["local"][2]
        report.update({
            "vllm_latents_per_s": n_lat / v_s,
            "vllm_latent_tokens_per_s": v_tokens / v_s,
            "vllm_sampling_latent_tokens_per_s": v_tokens / v_res.sample_seconds,
            "vllm_sampling_s": v_res.sample_seconds,
            "vllm_scoring_s": v_res.score_seconds,
            "scoring_same_pairs_s": {"local": local_score_same, "vllm": v_score_same},
            # local speed relative to vLLM's (> 1: local faster); per latent token for the E-step and
            # sampling (the engines draw different latents), on identical pairs for scoring
            "local_vs_vllm": {
                "estep": (lat_tokens / local_s) / (v_tokens / v_s),
                "sampling": (lat_tokens / res.sample_seconds) / (v_tokens / v_res.sample_seconds),
                "scoring": v_score_same / local_score_same,
            },
        })
    print(json.dumps(report, indent=2))


def timed_estep(engine: Engine, chunks: ChunkStore, idx: list[int], settings: EStepConfig):
    """(seconds, BlockResult) of one E-step block over idx, after a two-chunk warm-up (the same
    seeds every time, so repeats draw the same latents)."""
    sample_and_weight(engine, chunks, idx[:2], settings, block=999)
    t0 = time.perf_counter()
    res = sample_and_weight(engine, chunks, idx, settings, block=0)
    return time.perf_counter() - t0, res


def _engine_process(conn, name: str, model_dir: str, chunks_path: str, idx: list[int], settings: EStepConfig,
                    args) -> None:
    """Body of an `EngineProcess`: build the engine, then answer ("estep",) and ("score", pairs)."""
    if args.cpu_time:
        time.perf_counter = time.process_time  # every timer here and in the E-step reads it
    process_defaults()  # what `bolt` sets for its process: vLLM's engine core in this one
    set_torch_threads(args.threads)
    if name == "vllm":
        from megatron_bolt.inference.vllm import VLLMEngine

        engine: Engine = VLLMEngine(model_dir, kv_cache_gib=args.kv_cache_gib)
    else:
        engine = LocalEngine(model_dir, device=args.device)
    chunks = ChunkStore.open(chunks_path)
    conn.send("ready")
    try:
        while (msg := conn.recv())[0] != "close":
            if msg[0] == "estep":
                conn.send(timed_estep(engine, chunks, idx, settings))
            else:
                t0 = time.perf_counter()
                engine.score(*msg[1])
                conn.send(time.perf_counter() - t0)
    finally:
        engine.close()


class EngineProcess:
    """One engine in a spawned process of its own (see the module docstring); `call` runs a request
    there and waits for its answer, so only one engine runs at a time."""

    def __init__(self, name: str, model_dir: str, chunks_path: str, idx: list[int], settings: EStepConfig,
                 args) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_process, args=(child, name, model_dir, chunks_path, idx, settings, args),
                                name=f"bench-{name}")
        self.proc.start()
        self.name = name
        self._recv()

    def _recv(self):
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"the {self.name} engine's process exited with code {self.proc.exitcode}")
        return self.conn.recv()

    def call(self, what: str, payload=None):
        self.conn.send((what, payload))
        return self._recv()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def scoring_pairs(chunks: ChunkStore, idx: list[int], res, prefix_chunks: int):
    """The E-step's log p (prompt, continuation) pairs for the latents in `res`."""
    ids = LatentTokenIds.from_special_tokens(chunks.special_tokens, chunks.path)
    bos = [int(chunks.special_tokens["bos"])]
    prompts, conts = [], []
    for j, i in enumerate(idx):
        prefix = [int(t) for t in chunks.prefix_tokens(i, prefix_chunks)]
        x = [int(t) for t in chunks.chunk_tokens(i)]
        for z in res.latents[j]:
            seq, start = prior_scoring_sequence(prefix, list(z), x, ids)
            prompts.append(bos + seq[:start])
            conts.append(seq[start:])
    return prompts, conts


def params_m(args) -> float:
    h, f, v, L = args.hidden, args.hidden * 11 // 4, args.vocab, args.layers
    kv = max(1, h // 256) * (h // max(1, h // 64))
    return (2 * v * h + L * (2 * h * h + 2 * h * kv + 3 * h * f)) / 1e6


if __name__ == "__main__":
    main()

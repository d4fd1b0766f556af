"""Summed log-probabilities of token sequences under a Megatron checkpoint (any TP, PP = 1), or
under an HF export (`bolt convert mcore-to-hf`, gpt or ponder: transformers, one process).

For validation loss / perplexity, and as the reference that HF conversion is checked against.
Log-probs are over the real vocabulary: the TP padding rows of the output layer are dropped
before the softmax, exactly as an HF export (which has no padding) computes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_bolt import runtime
from megatron_bolt.atomic import atomic_write_jsonl
from megatron_bolt.errors import UserError
from megatron_bolt.training import checkpoint as ckpt


def read_token_lines(path: str | Path, min_tokens: int = 2, purpose: str = "score") -> list[list[int]]:
    """`{"tokens": [...]}` per line; a bad line is an error naming file:line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tokens = json.loads(line)["tokens"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a 'tokens' list") from None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise UserError(f"{path}:{lineno}: field 'tokens' must be a list of integers")
            if len(tokens) < min_tokens:
                raise UserError(f"{path}:{lineno}: need at least {min_tokens} token(s) to {purpose}, got {len(tokens)}")
            out.append(tokens)
    return out


def load_for_inference(ckpt_dir: str | Path, dist_env: runtime.DistEnv | None = None):
    """(model, cfg) at TP = world size, PP = 1, weights from the checkpoint. Collective.

    `dist_env`: this process's rank (default: `runtime.detect_env()`). Without CUDA the caller
    must have installed the CPU compatibility layer (`megatron_bolt.compat.cpu.install()`)."""
    cfg = ckpt.read_run_config(ckpt_dir)
    dist_env = dist_env or runtime.detect_env()
    world = dist.get_world_size() if dist.is_initialized() else dist_env.world_size
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp = world, 1, 1
    from megatron_bolt.config import validate

    validate(cfg)
    runtime.init_distributed(cfg.parallel.tp, 1, cfg.train.seed, env=dist_env)
    from megatron_bolt.training.loop import build_model

    model = build_model(cfg, wrap_ddp=False)
    ckpt.load_checkpoint(ckpt_dir, [model])
    model.eval()
    return model, cfg


@torch.no_grad()
def full_vocab_logprobs(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log-softmax over the real vocabulary at every position: [b, s, vocab]."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, positions, None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)


@torch.no_grad()
def score_sequences(model, vocab_size: int, sequences: list[list[int]], batch_size: int = 8) -> list[tuple[float, int]]:
    """For each sequence: (sum of log p(t_i | t_<i) for i = 2..n, n - 1)."""
    dev = runtime.device()
    results: list[tuple[float, int]] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(s) for s in batch)
        # Right padding is harmless under causal attention: pads come after every scored token.
        tokens = torch.zeros(len(batch), width, dtype=torch.long, device=dev)
        for i, seq in enumerate(batch):
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        logprobs = full_vocab_logprobs(model, tokens, vocab_size)
        picked = logprobs[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        for i, seq in enumerate(batch):
            results.append((float(picked[i, : len(seq) - 1].double().sum()), len(seq) - 1))
    return results


def is_hf_directory(path: str | Path) -> bool:
    """An HF model directory (config.json), not a megatron-bolt checkpoint (run_config.yaml)."""
    return (Path(path) / "config.json").is_file() and not (Path(path) / ckpt.RUN_CONFIG).is_file()


@torch.no_grad()
def score_sequences_hf(model_dir: str | Path, sequences: list[list[int]], batch_size: int = 8) -> list[tuple[float, int]]:
    """`score_sequences` with transformers on an HF export: one full forward per batch (a ponder
    export runs its Jacobi procedure, exactly as the Megatron model does in eval mode)."""
    from transformers import AutoModelForCausalLM

    from megatron_bolt.models.hf_ponder import is_ponder_export

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 trust_remote_code=is_ponder_export(model_dir)).eval()
    vocab = int(model.config.vocab_size)
    bad = [t for s in sequences for t in s if not 0 <= t < vocab]
    if bad:
        raise UserError(f"token id {bad[0]} outside the vocabulary of {model_dir} [0, {vocab})")
    results: list[tuple[float, int]] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(s) for s in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for i, seq in enumerate(batch):
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)  # right padding: after every scored token
        logprobs = torch.log_softmax(model(input_ids=tokens).logits.float(), dim=-1)
        picked = logprobs[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        results += [(float(picked[i, : len(s) - 1].double().sum()), len(s) - 1) for i, s in enumerate(batch)]
    return results


def score_file(ckpt_dir: str, input_path: str, output_path: str, batch_size: int = 8,
               dist_env: runtime.DistEnv | None = None) -> dict:
    """`bolt score`: an HF export with transformers in this process, a checkpoint with Megatron-Core
    (`load_for_inference`: collective over `dist_env`'s ranks)."""
    sequences = read_token_lines(input_path)
    if is_hf_directory(ckpt_dir):
        scores = score_sequences_hf(ckpt_dir, sequences, batch_size)
    else:
        model, cfg = load_for_inference(ckpt_dir, dist_env)
        bad = [t for s in sequences for t in s if not 0 <= t < cfg.model.vocab_size]
        if bad:
            raise UserError(f"{input_path}: token id {bad[0]} outside the model's vocabulary [0, {cfg.model.vocab_size})")
        scores = score_sequences(model, cfg.model.vocab_size, sequences, batch_size)
    total_lp = sum(s for s, _ in scores)
    total_n = sum(n for _, n in scores)
    summary = {"sequences": len(scores), "tokens": total_n, "mean_nll": -total_lp / max(total_n, 1)}
    summary["perplexity"] = math.exp(summary["mean_nll"])
    if runtime.is_main():
        atomic_write_jsonl(output_path, ({"logprob": lp, "num_tokens": n} for lp, n in scores))
    return summary

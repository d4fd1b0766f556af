"""megatron-bolt distributed checkpoint -> HF directory (`save_pretrained` layout).

A `gpt` checkpoint becomes a LlamaForCausalLM (Qwen2ForCausalLM / MistralForCausalLM when it was
imported from one); a `ponder` checkpoint becomes a PonderForCausalLM with its modeling code
(`megatron_bolt/models/hf_ponder`) written next to the weights, loaded with `trust_remote_code=True`.

The checkpoint is loaded at TP=1 in one process (dist_checkpointing reshards whatever TP/PP it
was saved at), then HF tensors are produced one at a time and written shard by shard:
`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` above
`max_shard_bytes`. Peak memory is the model plus one shard. The vocabulary padding is cut off; a
tied model has no `lm_head.weight`, as `save_pretrained` writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_bolt.atomic import commit, temp_path
from megatron_bolt.config import ModelConfig, PonderConfig
from megatron_bolt.convert import llama
from megatron_bolt.convert.hf_to_mcore import HF_CONFIG, TOKENIZER_DIR, TOKENIZER_FILES
from megatron_bolt.errors import UserError
from megatron_bolt.models import hf_ponder

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards in order, each under `max_shard_bytes` unless one tensor
    alone is larger (as `save_pretrained` does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def ponder_hf_config(model: ModelConfig, ponder: PonderConfig, llama_config: dict) -> dict:
    """The exported Llama config.json turned into a PonderForCausalLM one: the same shape fields
    (both RoPE / dtype spellings), plus the latent-thought fields (the run's `ponder:` section)
    and the auto_map to our code."""
    out = dict(llama_config)
    for key in ("mlp_bias", "pretraining_tp", "use_sliding_window", "sliding_window", "max_window_layers"):
        out.pop(key, None)
    out.update(
        architectures=["PonderForCausalLM"],
        model_type=hf_ponder.MODEL_TYPE,
        auto_map=dict(hf_ponder.AUTO_MAP),
        attention_bias=model.qkv_bias,
        latents_per_token=ponder.latents_per_token,
        eval_jacobi_iters=ponder.eval_jacobi_iters,
        embed_scale=float(ponder.scale(model.hidden_size)),
    )
    return out


def convert_mcore_to_hf(
    ckpt_dir: str | Path,
    out: str | Path,
    dtype: str = "auto",
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    step: int | None = None,
    log=print,
) -> Path:
    """Convert the latest (or `step`) checkpoint in `ckpt_dir`; returns the HF directory.

    `dtype` 'auto' keeps the checkpoint's (bf16 or fp32); the tokenizer comes from `tokenizer`, else
    from CKPT/tokenizer/ (written by hf-to-mcore)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from megatron_bolt.convert.megatron_side import build_tp1, single_rank
    from megatron_bolt.training.checkpoint import load_checkpoint, read_run_config

    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: output directory exists and is not empty")
    run = read_run_config(ckpt_dir)
    cfg = run.model
    if cfg.type not in ("gpt", "ponder"):
        raise UserError(f"{ckpt_dir}: model.type is {cfg.type!r}; only 'gpt' and 'ponder' checkpoints export to HF")
    if dtype != "auto" and dtype not in _DTYPES:
        raise UserError(f"--dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")
    bf16 = run.train.bf16
    out_dtype = _DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if bf16 else torch.float32)
    tok_src = Path(tokenizer) if tokenizer else ckpt_dir / TOKENIZER_DIR
    if tokenizer and not tok_src.is_dir():
        raise UserError(f"--tokenizer {tokenizer}: not a directory")
    base = json.loads((ckpt_dir / HF_CONFIG).read_text()) if (ckpt_dir / HF_CONFIG).is_file() else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        with single_rank():
            model = build_tp1(cfg, run.parallel.tp, bf16=bf16)
            loaded_step, _ = load_checkpoint(ckpt_dir, [model], step=step)
            weights = {n: p.detach() for n, p in model.named_parameters()}
            shapes = llama.hf_shapes(cfg)
            shards = plan_shards(shapes, torch.empty((), dtype=out_dtype).element_size(), max_shard_bytes)
            names = [
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                for i in range(len(shards))
            ]
            shard_of = {n: i for i, shard in enumerate(shards) for n in shard}
            tensors = llama.hf_from_mcore(cfg, weights.__getitem__)
            # A shard is written as soon as all its tensors have arrived (the mapping yields a layer's
            # tensors in its own order, so at most two shards are open at a time).
            pending: dict[int, dict[str, torch.Tensor]] = {}
            left = [len(shard) for shard in shards]
            index: dict[str, str] = {}
            total = 0
            for name, tensor in tqdm(tensors, total=len(shapes), desc="mcore -> hf", unit="tensor", leave=False):
                if tuple(tensor.shape) != shapes.get(name):
                    raise UserError(f"'{name}': exported shape {tuple(tensor.shape)} != HF shape {shapes.get(name)}")
                i = shard_of[name]
                # One-to-one tensors are the parameters themselves (no copy until written).
                t = pending.setdefault(i, {})[name] = tensor.to(out_dtype)
                index[name] = names[i]
                total += t.numel() * t.element_size()
                left[i] -= 1
                if left[i] == 0:
                    save_file(pending.pop(i), str(tmp / names[i]), metadata={"format": "pt"})
            if pending or any(left):
                raise UserError(f"HF tensors never produced: {[n for s in shards for n in s if n not in index][:5]}")
            del model, weights, tensors
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n"
            )
        hf_config = llama.hf_config_from_model(cfg, out_dtype, base)
        if cfg.type == "ponder":
            hf_config = ponder_hf_config(cfg, run.ponder, hf_config)
            for path in hf_ponder.code_paths():
                shutil.copy2(path, tmp / path.name)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        copied = []
        if tok_src.is_dir():
            for fname in TOKENIZER_FILES:
                if (tok_src / fname).is_file():
                    shutil.copy2(tok_src / fname, tmp / fname)
                    copied.append(fname)
        commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"wrote {out}: step {loaded_step}, {len(shards)} safetensors file(s), {total / 2**20:.1f} MiB "
        f"{str(out_dtype).removeprefix('torch.')}, tokenizer files: {', '.join(copied) or 'none'}"
    )
    return out

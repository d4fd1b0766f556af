"""HF Llama / Qwen2 / Mistral directory (safetensors) -> megatron-bolt distributed checkpoint at step 0.

Which configs are accepted, and which fields are refused, is `llama.model_config_from_hf`.

The output is a checkpoint directory as `megatron_bolt.training.checkpoint` writes it, plus
    CKPT/hf_config.json   the source config.json (token ids and defaults for the way back)
    CKPT/tokenizer/       the tokenizer files (updated when latent tokens are added)
Weights stream from the safetensors files into the model one tensor (one layer's q/k/v) at a time,
so the conversion holds about one copy of the model plus what dist_checkpointing buffers to save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_bolt.atomic import commit, temp_path
from megatron_bolt.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig, validate
from megatron_bolt.convert import llama
from megatron_bolt.errors import UserError

# Files copied next to the checkpoint so the HF export (and our tokenizer loader) finds them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "bolt_tokenizer.json",
    "generation_config.json",
    "chat_template.jinja",
)
HF_CONFIG = "hf_config.json"
TOKENIZER_DIR = "tokenizer"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None


def resolve_dtype(name: str, hf: dict) -> torch.dtype:
    """'fp32' / 'bf16', or 'auto': bf16 if the HF model is stored in bf16, else fp32 (fp16 widens
    losslessly to fp32; our models train in bf16 or fp32 only)."""
    if name in _DTYPES:
        return _DTYPES[name]
    if name != "auto":
        raise UserError(f"--dtype must be auto, fp32 or bf16, got {name!r}")
    stored = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    return torch.bfloat16 if stored.endswith("bfloat16") else torch.float32


class SafetensorsReader:
    """Tensors of an HF directory by name, across one or many safetensors files, read lazily."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif (hf_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            found = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {', '.join(found)}: re-save with safe_serialization=True)" if found else ""
            raise UserError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")
        self._handles = {}
        self.location: dict[str, str] = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise UserError(f"{index}: lists {name}, which is missing")
            handle = safe_open(str(path), framework="pt")
            self._handles[name] = handle
            for key in handle.keys():
                self.location[key] = name
        self.used: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.location:
            raise UserError(f"HF checkpoint has no tensor '{name}'")
        self.used.add(name)
        return self._handles[self.location[name]].get_tensor(name)

    def close(self) -> None:
        """Drop the memory maps (their pages count towards the process's resident memory)."""
        self._handles.clear()

    def unused(self) -> list[str]:
        return sorted(k for k in self.location if k not in self.used and not k.endswith(llama.IGNORED_HF_SUFFIXES))


def _extend_for_latent_tokens(hf_dir: Path, cfg: ModelConfig, tok_out: Path) -> tuple[int, list[int]]:
    """Add the four latent tokens to the tokenizer (saved to `tok_out`); returns the new vocabulary
    size of the model and the ids of the tokens that were new (their rows get fresh values even
    when they fall inside the model's existing, unused, vocabulary rows)."""
    from megatron_bolt.tokenizer import LATENT_TOKENS, load_tokenizer

    before = load_tokenizer(str(hf_dir), add_latent_tokens=False)
    tok = load_tokenizer(str(hf_dir), add_latent_tokens=True)
    new_ids = sorted(tok.token_to_id(t) for t in LATENT_TOKENS if before.token_to_id(t) is None)
    tok.save(tok_out)
    return max(cfg.vocab_size, tok.vocab_size), new_ids


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "auto",
    add_latent_tokens: bool = False,
    seed: int = 1234,
    log=print,
) -> Path:
    """Convert; returns the checkpoint directory. `tp`/`pp` are checked against the shapes and
    recorded in the run config (and fix the vocabulary padding, which depends on TP)."""
    from megatron_bolt.convert.megatron_side import build_tp1, single_rank
    from megatron_bolt.training.checkpoint import save_checkpoint

    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: output directory exists and is not empty")
    hf = read_hf_config(hf_dir)
    cfg = llama.model_config_from_hf(hf, str(hf_dir / "config.json"))
    torch_dtype = resolve_dtype(dtype, hf)
    reader = SafetensorsReader(hf_dir)
    hf_vocab = cfg.vocab_size
    new_ids: list[int] = []

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    tmp.mkdir()
    try:
        (tmp / TOKENIZER_DIR).mkdir()
        if add_latent_tokens:
            cfg.vocab_size, new_ids = _extend_for_latent_tokens(hf_dir, cfg, tmp / TOKENIZER_DIR)
            log(f"latent tokens: {len(new_ids)} added (ids {new_ids}), vocabulary {hf_vocab} -> {cfg.vocab_size}")
            _copy_files(hf_dir, tmp / TOKENIZER_DIR, only_missing=True)
        else:
            _copy_files(hf_dir, tmp / TOKENIZER_DIR)
        run = RunConfig(
            model=cfg,
            parallel=ParallelConfig(tp=tp, pp=pp),
            train=TrainConfig(bf16=torch_dtype == torch.bfloat16),
        )
        validate(run)
        hf_out = dict(hf, vocab_size=cfg.vocab_size)
        (tmp / HF_CONFIG).write_text(json.dumps(hf_out, indent=2) + "\n")

        def get(name: str) -> torch.Tensor:
            t = reader.get(name)
            if name in ("model.embed_tokens.weight", "lm_head.weight") and new_ids:
                t = llama.pad_rows(t, cfg.vocab_size)
                # Different seeds for the two tables so untied input and output rows differ.
                t[new_ids] = llama.new_vocab_rows(
                    len(new_ids), cfg.hidden_size, t.dtype, seed + (name == "lm_head.weight")
                )
            return t.to(torch_dtype)

        with single_rank():
            model = build_tp1(cfg, tp, bf16=torch_dtype == torch.bfloat16)
            params = dict(model.named_parameters())
            padded = params["embedding.word_embeddings.weight"].shape[0]
            _load_streaming(model, params, llama.mcore_from_hf(cfg, padded, get))
            unused = reader.unused()
            if cfg.tie_embeddings:
                unused = [n for n in unused if n != "lm_head.weight"]  # some tied models store it anyway
            if unused:
                raise UserError(f"{hf_dir}: {len(unused)} unexpected tensors, e.g. {', '.join(unused[:3])}")
            reader.close()
            save_checkpoint(tmp, 0, [model], cfg=run)
            del model, params
        commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"wrote {out}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size} "
        f"(padded {cfg.padded_vocab_size(tp)} for tp={tp}), {str(torch_dtype).removeprefix('torch.')}"
    )
    return out


@torch.no_grad()
def _load_streaming(model: torch.nn.Module, params: dict, tensors) -> None:
    """Copy each mapped tensor into its parameter as it is produced; strict about names and shapes."""
    from tqdm import tqdm

    seen = set()
    for name, tensor in tqdm(tensors, total=len(params), desc="hf -> mcore", unit="tensor", leave=False):
        if name not in params:
            raise UserError(f"mapping produced '{name}', which the Megatron model does not have")
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise UserError(f"'{name}': mapped shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
        param.copy_(tensor)
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise UserError(f"Megatron parameters not filled by the mapping: {', '.join(missing[:5])}")


def _copy_files(src: Path, dst: Path, only_missing: bool = False) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (only_missing and (dst / name).exists()):
            shutil.copy2(src / name, dst / name)

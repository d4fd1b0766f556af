"""The typed run configuration: one dataclass per section, YAML file + dotted `key=value` overrides.

    cfg = load_config("examples/tiny/config.yaml", ["train.steps=20", "parallel.tp=2"])

Unknown keys, wrong types and inconsistent shapes are `UserError`s naming the key, so a typo in a
1000-GPU job fails in the first second instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_bolt.errors import UserError


@dataclass
class ModelConfig:
    type: str = "gpt"  # "gpt" (Llama-style) or "ponder" (continuous latent thoughts)
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA: number of KV heads; None = MHA
    ffn_hidden_size: int | None = None  # None = Llama's rounding of 8/3 * hidden
    vocab_size: int = 512  # real vocabulary; padded for TP inside the model
    seq_len: int = 128
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    make_vocab_divisible_by: int = 128
    transformer_impl: str = "auto"  # "auto" (TE when importable, on GPU), "local", "transformer_engine"
    fp8: str | None = None  # None, "hybrid" or "e4m3" (needs Transformer Engine)
    # ponder (continuous latent thoughts), ignored for type "gpt"
    latents_per_token: int = 1
    jacobi_iters: list[int] = field(default_factory=lambda: [2, 3])
    eval_jacobi_iters: int = 3
    embed_scale: float | None = None  # None = sqrt(2.5 * hidden) as in the reference

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return 64 * ((int(8 * self.hidden_size / 3) + 63) // 64)

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_divisible_by * tp
        return ((self.vocab_size + multiple - 1) // multiple) * multiple


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch: int = 4
    global_batch: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    seed: int = 1234
    bf16: bool = False
    distributed_optimizer: bool = False
    log_interval: int = 1
    eval_interval: int = 0  # 0 = no periodic validation
    eval_iters: int = 2


@dataclass
class DataConfig:
    # Megatron-style blend: [prefix] or [weight, prefix, weight, prefix, ...]
    prefixes: list[Any] = field(default_factory=list)
    split: str = "98,2,0"
    cache_dir: str | None = None  # default: output_dir/data_cache
    eod_id: int = 0  # used only for reset masks; packing is plain causal (method.md)
    num_workers: int = 0


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: output_dir/checkpoints
    save_interval: int = 0  # 0 = only at the end
    load: str | None = None  # a checkpoint to start from (weights only unless it is our own dir)
    finetune: bool = False  # load weights only (no optimizer/step) even from a full checkpoint
    save_optimizer: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs/default"

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.output_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one value against its annotation; errors name the dotted key."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        (inner,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}': expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config key '{key}': expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise UserError(f"unknown config key '{prefix}{key}' (valid: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, build and validate the RunConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{p}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Shape and parallelism checks; `world_size` adds the data-parallel checks."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    if m.type not in ("gpt", "ponder"):
        raise UserError(f"model.type: expected 'gpt' or 'ponder', got {m.type!r}")
    if m.hidden_size % m.num_attention_heads:
        raise UserError(
            f"model.num_attention_heads ({m.num_attention_heads}) must divide model.hidden_size ({m.hidden_size})"
        )
    if m.num_attention_heads % m.kv_heads:
        raise UserError(
            f"model.num_query_groups ({m.kv_heads}) must divide model.num_attention_heads ({m.num_attention_heads})"
        )
    if (m.hidden_size // m.num_attention_heads) % 2:
        raise UserError("model.hidden_size / model.num_attention_heads must be even for RoPE")
    if par.tp < 1 or par.pp < 1:
        raise UserError("parallel.tp and parallel.pp must be >= 1")
    if m.num_attention_heads % par.tp:
        raise UserError(f"parallel.tp ({par.tp}) must divide model.num_attention_heads ({m.num_attention_heads})")
    if m.kv_heads % par.tp:
        raise UserError(f"parallel.tp ({par.tp}) must divide the KV heads (model.num_query_groups = {m.kv_heads})")
    if m.ffn % par.tp:
        raise UserError(f"parallel.tp ({par.tp}) must divide the FFN size ({m.ffn})")
    if m.num_layers % par.pp:
        raise UserError(f"parallel.pp ({par.pp}) must divide model.num_layers ({m.num_layers})")
    if m.fp8 not in (None, "hybrid", "e4m3"):
        raise UserError(f"model.fp8: expected null, 'hybrid' or 'e4m3', got {m.fp8!r}")
    if m.transformer_impl not in ("auto", "local", "transformer_engine"):
        raise UserError(f"model.transformer_impl: expected auto|local|transformer_engine, got {m.transformer_impl!r}")
    if t.global_batch % t.micro_batch:
        raise UserError(f"train.micro_batch ({t.micro_batch}) must divide train.global_batch ({t.global_batch})")
    if m.type == "ponder" and (m.latents_per_token < 1 or not m.jacobi_iters):
        raise UserError("ponder models need model.latents_per_token >= 1 and a non-empty model.jacobi_iters")
    if world_size is not None:
        model_parallel = par.tp * par.pp
        if world_size % model_parallel:
            raise UserError(f"world size {world_size} is not divisible by tp*pp = {model_parallel}")
        dp = world_size // model_parallel
        if t.global_batch % (t.micro_batch * dp):
            raise UserError(
                f"train.global_batch ({t.global_batch}) must be divisible by micro_batch*data_parallel "
                f"({t.micro_batch}*{dp})"
            )

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
    seq_len: int = 128  # training sequence length
    max_position_embeddings: int | None = None  # the model's own context (exported to HF); None = seq_len
    kv_channels: int | None = None  # head dim; None = hidden_size / num_attention_heads (HF head_dim)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    rope_base: float = 10000.0
    # Llama-3 ("llama3") RoPE scaling as Megatron-Core implements it: this factor, low/high frequency
    # factors 1 and 4, original context 8192 (Llama 3.1/3.2/3.3). None = plain RoPE.
    rope_scaling_factor: float | None = None
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
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def context(self) -> int:
        """The longest sequence the model is meant for (HF `max_position_embeddings`)."""
        return self.max_position_embeddings or self.seq_len

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


@dataclass
class CorpusConfig:
    source: str = "toy"  # "toy" (generated by megatron_bolt.toy) or "files"
    warm: list[str] = field(default_factory=list)  # files: documents that get teacher latents
    rest: list[str] = field(default_factory=list)  # files: documents whose latents the E-step infers
    valid: list[str] = field(default_factory=list)  # files: held-out documents for the IWAE bound
    json_key: str = "text"
    tokenizer: str | None = None  # None = train a byte-level BPE on the corpus
    tokenizer_vocab_size: int = 320
    chunk_poisson_mean: float = 7.0  # chunks of min(Poisson(mean) + 1, 20) sentences (bolt preprocess)
    toy_warm_docs: int = 100
    toy_rest_docs: int = 300
    toy_valid_docs: int = 20


@dataclass
class WarmstartConfig:
    teacher: str = "toy"  # "toy" or "openai"
    prefix_chunks: int = 1
    train_steps: int | None = None  # steps of the warm-start training; None = train_config's train.steps
    args: list[str] = field(default_factory=list)  # extra `bolt warmstart` flags, e.g. ["--model", "gpt-4o-mini"]


@dataclass
class EStepConfig:
    samples: int = 4
    prefix_chunks: int = 3
    max_latent_tokens: int = 1024
    args: list[str] = field(default_factory=list)  # extra `bolt estep` flags, e.g. ["--engine", "sglang", ...]


@dataclass
class MergeConfig:
    epochs: int = 1
    posterior_prob: float = 0.5
    raw_mix: float = 0.0
    empty_latents: str = "keep"  # "raw": chunks with an empty chosen latent are written without SoL/EoL


@dataclass
class EvalConfig:
    task: str = "toy"  # toy | gsm8k | math
    data: str | None = None  # None with task toy: held-out problems from the toy world
    limit: int | None = 200
    shots: int = 4
    max_new_tokens: int = 256


@dataclass
class EMConfig:
    """`bolt em`: the BoLT EM loop (method.md). Every training run uses `train_config` with the
    driver's data/output paths and `train_overrides` on top."""

    output_dir: str = "runs/em"
    train_config: str = "examples/toy/train.yaml"
    train_overrides: list[str] = field(default_factory=list)
    iterations: int = 3
    restart: str = "base"  # "base": every iteration trains from train_config's start; "continue": from the last model
    raw_baseline: bool = True  # also train on the raw corpus (no latents) with the same budget
    ablation_samples: list[int] = field(default_factory=list)  # rerun the last iteration with these K (e.g. [1])
    iwae_samples: list[int] = field(default_factory=lambda: [1, 2, 4])
    nproc_per_node: int = 1
    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    estep: EStepConfig = field(default_factory=EStepConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_em_config(path: str | Path | None, overrides: list[str] | None = None) -> EMConfig:
    cfg = _build(EMConfig, read_config_tree(path, overrides), "")
    if cfg.corpus.source not in ("toy", "files"):
        raise UserError(f"config key 'corpus.source': expected 'toy' or 'files', got {cfg.corpus.source!r}")
    if cfg.corpus.source == "files" and not (cfg.corpus.warm and cfg.corpus.rest):
        raise UserError("corpus.source 'files' needs corpus.warm and corpus.rest (lists of JSONL/Parquet files)")
    if cfg.restart not in ("base", "continue"):
        raise UserError(f"config key 'restart': expected 'base' or 'continue', got {cfg.restart!r}")
    if cfg.iterations < 0 or cfg.estep.samples < 1 or any(k < 1 for k in cfg.ablation_samples):
        raise UserError("iterations must be >= 0, estep.samples and ablation_samples >= 1")
    if cfg.warmstart.train_steps is not None and cfg.warmstart.train_steps < 1:
        raise UserError(f"config key 'warmstart.train_steps': expected >= 1 or null, got {cfg.warmstart.train_steps}")
    if not 0 <= cfg.corpus.chunk_poisson_mean <= 100:
        raise UserError(f"config key 'corpus.chunk_poisson_mean': expected 0..100, got {cfg.corpus.chunk_poisson_mean}")
    if cfg.eval.task not in ("toy", "gsm8k", "math"):
        raise UserError(f"config key 'eval.task': expected toy, gsm8k or math, got {cfg.eval.task!r}")
    if cfg.eval.task != "toy" and not cfg.eval.data:
        raise UserError(f"eval.task {cfg.eval.task!r} needs eval.data (a JSONL file)")
    return cfg


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


def read_config_tree(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML file (or nothing) with dotted `key=value` overrides merged in, as plain data."""
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
    return _merge(data, parse_overrides(overrides or []))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, build and validate the RunConfig."""
    cfg = _build(RunConfig, read_config_tree(path, overrides), "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Shape and parallelism checks; `world_size` adds the data-parallel checks."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    if m.type not in ("gpt", "ponder"):
        raise UserError(f"model.type: expected 'gpt' or 'ponder', got {m.type!r}")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise UserError(
            f"model.num_attention_heads ({m.num_attention_heads}) must divide model.hidden_size ({m.hidden_size}), "
            "or set model.kv_channels"
        )
    if m.kv_channels is not None and m.kv_channels < 2:
        raise UserError(f"model.kv_channels must be >= 2, got {m.kv_channels}")
    if m.num_attention_heads % m.kv_heads:
        raise UserError(
            f"model.num_query_groups ({m.kv_heads}) must divide model.num_attention_heads ({m.num_attention_heads})"
        )
    if m.head_dim % 2:
        raise UserError(f"the head dim ({m.head_dim}: model.kv_channels or hidden/heads) must be even for RoPE")
    if m.rope_scaling_factor is not None and m.rope_scaling_factor < 1:
        raise UserError(f"model.rope_scaling_factor must be >= 1 (or null), got {m.rope_scaling_factor}")
    if m.max_position_embeddings is not None and m.max_position_embeddings < 1:
        raise UserError(f"model.max_position_embeddings must be >= 1 (or null), got {m.max_position_embeddings}")
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

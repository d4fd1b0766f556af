"""The typed run configuration: one dataclass per section, YAML file + dotted `key=value` overrides.

    cfg = load_config("examples/tiny/config.yaml", ["train.steps=20", "parallel.tp=2"])

Unknown keys, wrong types and inconsistent shapes are `UserError`s naming the key, so a typo in a
1000-GPU job fails in the first second instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    # FP8 through Transformer Engine (Megatron's --fp8-format, --fp8-recipe, --fp8-amax-*; same defaults)
    fp8: str | None = None  # --fp8-format: None, "hybrid" or "e4m3"
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 (Blackwell) | blockwise
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1  # delayed recipe only
    fp8_amax_compute_algo: str = "most_recent"  # delayed recipe only: most_recent | max
    fp8_wgrad: bool = True  # false: weight gradients in higher precision
    # activation recomputation (Megatron's --recompute-granularity/-method/-num-layers/-modules)
    recompute_granularity: str | None = None  # None, "selective" or "full"
    recompute_method: str | None = None  # full only: "uniform" or "block"
    recompute_num_layers: int | None = None  # full only: layers per unit (uniform) / per stage (block)
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])  # selective only
    # fused kernels: None = on when this machine has the kernel (megatron_bolt.models.gpt.fused_kernels)
    gradient_accumulation_fusion: bool | None = None
    bias_dropout_fusion: bool | None = None
    masked_softmax_fusion: bool | None = None
    apply_rope_fusion: bool | None = None
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
    vp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B); needs pp > 1
    cp: int = 1  # context parallelism (Megatron's --context-parallel-size); needs Transformer Engine
    sequence_parallel: bool = False
    # Megatron-LM's --disable-gloo-process-groups (default on): one flag for the parallel state and
    # the optimizer, the same on CPU and GPU.
    gloo_process_groups: bool = True
    overlap_grad_reduce: bool = False  # --overlap-grad-reduce: DP reduce-scatter in backward
    overlap_param_gather: bool = False  # --overlap-param-gather: needs train.distributed_optimizer


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch: int = 4
    global_batch: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 10
    # Megatron's --lr-decay-style / --lr-decay-iters / --lr-wsd-decay-style / --lr-wsd-decay-iters
    lr_decay_style: str = "cosine"  # cosine | linear | WSD | constant | inverse-square-root
    lr_decay_iters: int | None = None  # None = train.steps
    lr_wsd_decay_style: str = "exponential"  # WSD's final decay: exponential | linear | cosine | minus_sqrt
    lr_wsd_decay_iters: int | None = None  # WSD: length of the final decay (required for WSD)
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    peak_tflops: float | None = None  # per-device dense bf16 peak for MFU; None = known GPUs' table
    seed: int = 1234
    bf16: bool = False
    distributed_optimizer: bool = False
    log_interval: int = 1
    eval_interval: int = 0  # 0 = no periodic validation (always one at the end when there is valid data)
    eval_iters: int = 2  # global batches per validation
    # Save and exit (Megatron-LM's --exit-signal-handler / --exit-signal / --exit-duration-in-mins):
    # on SIGTERM or exit_signal every rank finishes the step, a checkpoint is saved, the run exits 0.
    exit_signal_handler: bool = True
    exit_signal: str = "SIGTERM"  # e.g. SIGUSR1 with SLURM's --signal; SIGTERM is always caught too
    exit_duration_mins: float | None = None
    # --override-opt_param-scheduler: on resume, train.lr/min_lr/warmup/steps come from this config,
    # not from the checkpoint. false = --use-checkpoint-opt_param-scheduler.
    override_opt_param_scheduler: bool = True


@dataclass
class DataConfig:
    # Megatron-style blend: [prefix] or [weight, prefix, weight, prefix, ...]
    prefixes: list[Any] = field(default_factory=list)
    split: str = "98,2,0"  # train,valid,test weights (Megatron's --split), used when valid_prefixes is empty
    valid_prefixes: list[Any] = field(default_factory=list)  # own validation blend (--valid-data-path)
    cache_dir: str | None = None  # default: output_dir/data_cache
    eod_id: int = 0  # used only for reset masks; packing is plain causal (method.md)
    num_workers: int = 0
    # Megatron's --mock-data: no files, synthetic token sequences generated in-process
    # (megatron.core.datasets.gpt_dataset.MockGPTDataset), for trying a config or a cluster. Only
    # while data.prefixes is empty: giving prefixes (e.g. as an override of examples/tiny) trains on them.
    mock: bool = False

    @property
    def uses_mock(self) -> bool:
        return self.mock and not self.prefixes


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: output_dir/checkpoints
    save_interval: int = 0  # 0 = only at the end
    load: str | None = None  # a checkpoint to start from (weights only unless it is our own dir)
    finetune: bool = False  # load weights only (no optimizer/step) even from a full checkpoint
    save_optimizer: bool = True
    # Distributed-optimizer state: Megatron's dp_reshardable by default (no gather; loads at any DP
    # size, same TP/PP); fully_reshardable (--dist-ckpt-optim-fully-reshardable) also at another TP/PP.
    optim_fully_reshardable: bool = False
    async_save: bool = False  # --async-save: write in a background process while training goes on


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
    source: Literal["toy", "files"] = "toy"  # "toy": generated by megatron_bolt.toy; "files": warm/rest/valid
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

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.source == "files" and not (self.warm and self.rest):
            yield "source", "'files' needs corpus.warm and corpus.rest (lists of JSONL/Parquet files)"
        if not 0 <= self.chunk_poisson_mean <= 100:
            yield "chunk_poisson_mean", f"expected 0..100, got {self.chunk_poisson_mean}"


@dataclass
class OpenAITeacherConfig:
    """An OpenAI-compatible chat-completions teacher (`bolt warmstart --teacher openai`)."""

    base_url: str | None = None  # None: $OPENAI_BASE_URL, else https://api.openai.com/v1
    # None: $OPENAI_MODEL, else the reference's pinned teacher (latents.teachers.DEFAULT_MODEL)
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key (never the key itself)
    temperature: float = 0.7  # the reference's
    max_tokens: int | None = 6000  # the reference's; None or 0: leave max_tokens out of the request
    concurrency: int = 8
    requests_per_minute: float | None = None
    max_retries: int = 6
    retry_backoff: float = 1.0  # seconds before the first retry, doubled each time up to 60
    timeout: float = 120.0  # seconds per request
    prompt_file: str | None = None  # template with {prefix} and {suffix}; None: the built-in prompt
    system_prompt: str | None = None  # None: the built-in system message; "": send none

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.concurrency < 1:
            yield "concurrency", f"expected >= 1, got {self.concurrency}"
        if self.max_retries < 0:
            yield "max_retries", f"expected >= 0, got {self.max_retries}"
        if self.timeout <= 0:
            yield "timeout", f"expected > 0, got {self.timeout}"
        if self.requests_per_minute is not None and self.requests_per_minute <= 0:
            yield "requests_per_minute", f"expected > 0 or null, got {self.requests_per_minute}"


@dataclass
class WarmstartConfig:
    teacher: Literal["toy", "openai"] = "toy"
    prefix_chunks: int = 1
    train_steps: int | None = None  # steps of the warm-start training; None = train_config's train.steps
    # overrides of the warm-start training only, after EMConfig.train_overrides (the paper: train.global_batch=96)
    train_overrides: list[str] = field(default_factory=list)
    openai: OpenAITeacherConfig = field(default_factory=OpenAITeacherConfig)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.prefix_chunks < 0:
            yield "prefix_chunks", f"expected >= 0, got {self.prefix_chunks}"
        if self.train_steps is not None and self.train_steps < 1:
            yield "train_steps", f"expected >= 1 or null, got {self.train_steps}"


@dataclass
class EStepConfig:
    """The E-step's sampling options (method.md), shared by `bolt estep`, `bolt iwae` and `bolt em`.
    A latent store records them and refuses to be resumed under different ones."""

    samples: int = 4  # K latents per chunk
    prefix_chunks: int = 3  # previous chunks of the document given as context
    max_latent_tokens: int = 1024  # cap on a latent's length (0: no sampling of our own, the warm start)
    seed: int = 0  # same seed, same latents (`bolt em` derives it per iteration from the run's seed)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.samples < 1:
            yield "samples", f"expected >= 1, got {self.samples}"
        if self.prefix_chunks < 0:
            yield "prefix_chunks", f"expected >= 0, got {self.prefix_chunks}"
        if self.max_latent_tokens < 0:
            yield "max_latent_tokens", f"expected >= 0, got {self.max_latent_tokens}"

    def fingerprint(self) -> dict[str, int]:
        """The settings that must not change between a run and its resumption."""
        return dataclasses.asdict(self)


@dataclass
class EngineConfig:
    """Where the E-step and the IWAE bound run the current model."""

    # local / vllm: transformers / vLLM in this process; sglang / vllm-server: HTTP client of servers
    engine: Literal["local", "vllm", "sglang", "vllm-server"] = "local"
    server: list[str] = field(default_factory=list)  # sglang, vllm-server: one router URL, or several server URLs
    concurrency: int = 64  # sglang, vllm-server: requests in flight
    device: str | None = None  # local: torch device (None: cuda if available)
    threads: int | None = None  # local, vllm: torch CPU threads
    batch_rows: int = 64  # local: (chunk, sample) rows decoded together; vllm: max_num_seqs
    kv_cache_gib: float = 2.0  # vllm: KV cache size (unset, vLLM takes 90% of RAM on CPU); raise on a GPU
    vllm_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # vllm: as the local engine's fp32
    vllm_graphs: bool = False  # vllm: torch.compile + CUDA graphs instead of eager mode (GPU)
    # truncate prompts and scored sequences to this many tokens as the BoLT reference does
    # (None: the engine's own context: max_position_embeddings, vLLM's max_model_len, or what the
    # SGLang server accepts)
    context_length: int | None = None

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.engine in ("sglang", "vllm-server") and not self.server:
            yield "server", f"the {self.engine} engine needs at least one server URL"
        if self.kv_cache_gib <= 0:
            yield "kv_cache_gib", f"expected > 0, got {self.kv_cache_gib}"
        if self.concurrency < 1 or self.batch_rows < 1:
            yield "concurrency", "concurrency and batch_rows must be >= 1"
        if self.threads is not None and self.threads < 1:
            yield "threads", f"expected >= 1 or null, got {self.threads}"
        if self.context_length is not None and self.context_length < 2:
            yield "context_length", f"expected >= 2 or null, got {self.context_length}"


@dataclass
class MergeConfig:
    # None: as many epochs as the stage's training reads (steps x global batch x seq_len, see
    # data.merge.planned_train_tokens), so every read of a document has fresh forms, as the
    # reference's loader draws them; an integer fixes the count
    epochs: int | None = None
    posterior_prob: float = 0.5
    raw_mix: float = 0.0
    empty_latents: Literal["keep", "raw"] = "keep"  # "raw": chunks with an empty chosen latent are written raw

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.epochs is not None and self.epochs < 1:
            yield "epochs", f"expected >= 1 or null, got {self.epochs}"
        if not 0 <= self.posterior_prob <= 1:
            yield "posterior_prob", f"expected 0..1, got {self.posterior_prob}"
        if self.raw_mix < 0:
            yield "raw_mix", f"expected >= 0, got {self.raw_mix}"


@dataclass
class EvalConfig:
    task: Literal["toy", "gsm8k", "math", "mmlu_stem"] = "toy"
    data: str | None = None  # None with task toy: held-out problems from the toy world
    limit: int | None = None  # None: the whole test set (toy: 200 generated problems)
    shots: int | None = None  # None: the task's default (gsm8k 8, others 4), as `bolt eval`
    max_new_tokens: int = 1024  # as `bolt eval` (clamped to the model's context)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.task != "toy" and not self.data:
            yield "data", f"task {self.task!r} needs eval.data (a JSONL file)"


@dataclass
class EMConfig:
    """`bolt em`: the BoLT EM loop (method.md). Every training run uses `train_config` with the
    driver's data/output paths and `train_overrides` on top."""

    output_dir: str = "runs/em"
    train_config: str = "examples/toy/train.yaml"
    train_overrides: list[str] = field(default_factory=list)
    iterations: int = 3
    restart: Literal["base", "continue"] = "base"  # "base": every iteration trains from train_config's start; "continue": from the last model
    # "new": each iteration trains on its own E-step latents only (the paper); "warm+new": the
    # warm-start latents blended in as well
    iteration_data: Literal["new", "warm+new"] = "new"
    # raw-data baselines, trained from train_config's start on the documents the matched run saw:
    # "tokens" reads as many raw tokens as the matched latent run's data holds, "flops" gets its
    # training FLOPs (the reference's Train-FLOP-Match; E-step compute is not counted, as there)
    raw_baselines: list[Literal["tokens", "flops"]] = field(default_factory=lambda: ["tokens", "flops"])
    ablation_samples: list[int] = field(default_factory=list)  # rerun the last iteration with these K (e.g. [1])
    iwae_samples: list[int] = field(default_factory=lambda: [1, 2, 4])
    nproc_per_node: int = 1
    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    estep: EStepConfig = field(default_factory=EStepConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # the E-step's and the IWAE bound's engine
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.iterations < 0:
            yield "iterations", f"expected >= 0, got {self.iterations}"
        if any(k < 1 for k in self.ablation_samples):
            yield "ablation_samples", f"expected values >= 1, got {self.ablation_samples}"
        if not self.iwae_samples or any(n < 1 for n in self.iwae_samples):
            yield "iwae_samples", f"expected a non-empty list of values >= 1, got {self.iwae_samples}"
        if self.nproc_per_node < 1:
            yield "nproc_per_node", f"expected >= 1, got {self.nproc_per_node}"
        if len(set(self.raw_baselines)) != len(self.raw_baselines):
            yield "raw_baselines", f"expected distinct values, got {self.raw_baselines}"
        if self.estep.seed:
            yield "estep.seed", "bolt em derives each iteration's E-step seed from the run's `seed`; set that instead"


def load_em_config(path: str | Path | None, overrides: list[str] | None = None) -> EMConfig:
    return _build(EMConfig, read_config_tree(path, overrides), "")


# What a user types for a number: 1e-4, 3E-4, 1_000, .5, +2. YAML 1.1 (PyYAML) reads `1e-4`
# (no dot) as a string, so numbers are also parsed from strings, for numeric keys only.
_DIGITS = r"\d+(?:_\d+)*"
_NUMBER = re.compile(rf"[-+]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?\d+)?")


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            return float(text)
    return None


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
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise UserError(f"config key '{key}': expected one of {', '.join(map(repr, choices))}, got {value!r}")
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
        number = _number(value)
        if isinstance(number, int):
            return number
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if hint is float:
        number = _number(value)
        if number is not None:
            return float(number)
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
    obj = cls(**kwargs)
    check_section(obj, prefix)
    return obj


def check_section(section: Any, prefix: str = "") -> None:
    """A section's own checks (its `problems()`), the first one as a one-line error naming the key."""
    for key, message in getattr(section, "problems", lambda: ())():
        raise UserError(f"config key '{prefix}{key}': {message}")


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


_SIGNALS = {s.name for s in signal.Signals} - {"SIGKILL", "SIGSTOP"}


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
    if par.vp is not None:
        if par.vp < 1 or par.pp < 2:
            raise UserError(f"parallel.vp ({par.vp}) needs parallel.pp > 1 and vp >= 1 (or vp=null)")
        if m.num_layers % (par.pp * par.vp):
            raise UserError(f"parallel.pp * parallel.vp ({par.pp}*{par.vp}) must divide model.num_layers ({m.num_layers})")
        if m.type == "ponder":
            raise UserError("parallel.vp: the ponder model has its own pipeline schedule; use vp=null")
    if par.overlap_param_gather and not t.distributed_optimizer:
        raise UserError("parallel.overlap_param_gather needs train.distributed_optimizer=true (as in Megatron-LM)")
    if t.exit_signal not in _SIGNALS:
        raise UserError(f"train.exit_signal: expected a signal name such as SIGTERM or SIGUSR1, got {t.exit_signal!r}")
    if t.exit_duration_mins is not None and t.exit_duration_mins <= 0:
        raise UserError(f"train.exit_duration_mins: expected > 0 or null, got {t.exit_duration_mins}")
    if t.eval_interval < 0 or t.eval_iters < 1:
        raise UserError("train.eval_interval must be >= 0 and train.eval_iters >= 1")
    if m.transformer_impl not in ("auto", "local", "transformer_engine"):
        raise UserError(f"model.transformer_impl: expected auto|local|transformer_engine, got {m.transformer_impl!r}")
    _validate_precision(m)
    _validate_recompute(m, par)
    _validate_schedule(t)
    if par.cp < 1:
        raise UserError(f"parallel.cp: expected >= 1, got {par.cp}")
    if par.cp > 1 and m.transformer_impl == "local":
        raise UserError("parallel.cp > 1 needs Transformer Engine's attention; model.transformer_impl=local has none")
    if par.cp > 1 and m.seq_len % (2 * par.cp):
        raise UserError(f"model.seq_len ({m.seq_len}) must be divisible by 2 * parallel.cp ({2 * par.cp})")
    if t.global_batch % t.micro_batch:
        raise UserError(f"train.micro_batch ({t.micro_batch}) must divide train.global_batch ({t.global_batch})")
    if m.type == "ponder" and (m.latents_per_token < 1 or not m.jacobi_iters):
        raise UserError("ponder models need model.latents_per_token >= 1 and a non-empty model.jacobi_iters")
    if world_size is not None:
        model_parallel = par.tp * par.pp * par.cp
        if world_size % model_parallel:
            raise UserError(f"world size {world_size} is not divisible by tp*pp*cp = {model_parallel}")
        dp = world_size // model_parallel
        if t.global_batch % (t.micro_batch * dp):
            raise UserError(
                f"train.global_batch ({t.global_batch}) must be divisible by micro_batch*data_parallel "
                f"({t.micro_batch}*{dp})"
            )


def _one_of(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        shown = ", ".join("null" if c is None else repr(c) for c in choices)
        raise UserError(f"config key '{key}': expected one of {shown}, got {value!r}")


def _validate_precision(m: ModelConfig) -> None:
    _one_of("model.fp8", m.fp8, (None, "hybrid", "e4m3"))
    _one_of("model.fp8_recipe", m.fp8_recipe, ("delayed", "tensorwise", "mxfp8", "blockwise"))
    _one_of("model.fp8_amax_compute_algo", m.fp8_amax_compute_algo, ("most_recent", "max"))
    if m.fp8_amax_history_len < 1:
        raise UserError(f"config key 'model.fp8_amax_history_len': expected >= 1, got {m.fp8_amax_history_len}")
    if m.fp8 and m.transformer_impl == "local":
        raise UserError(f"model.fp8={m.fp8!r} needs the Transformer Engine layer spec; "
                        "model.transformer_impl=local has no FP8 (use auto or transformer_engine)")


def _validate_recompute(m: ModelConfig, par: ParallelConfig) -> None:
    """Megatron-LM's rules for --recompute-granularity/-method/-num-layers, checked before any model exists."""
    _one_of("model.recompute_granularity", m.recompute_granularity, (None, "selective", "full"))
    _one_of("model.recompute_method", m.recompute_method, (None, "uniform", "block"))
    allowed = ("core_attn", "mlp", "layernorm")  # the dense-Llama subset of megatron-core's recompute_modules
    for name in m.recompute_modules:
        _one_of("model.recompute_modules[]", name, allowed)
    per_stage = m.num_layers // max(par.pp, 1)
    if m.recompute_granularity == "full":
        if m.recompute_method is None or m.recompute_num_layers is None:
            raise UserError("model.recompute_granularity=full needs model.recompute_method (uniform|block) "
                            "and model.recompute_num_layers")
        if not 1 <= m.recompute_num_layers <= per_stage:
            raise UserError(f"config key 'model.recompute_num_layers': expected 1..{per_stage} "
                            f"(layers per pipeline stage), got {m.recompute_num_layers}")
    elif m.recompute_method is not None or m.recompute_num_layers is not None:
        raise UserError("model.recompute_method and model.recompute_num_layers apply to "
                        f"recompute_granularity=full only (it is {m.recompute_granularity!r})")


def _validate_schedule(t: TrainConfig) -> None:
    _one_of("train.lr_decay_style", t.lr_decay_style, ("cosine", "linear", "WSD", "constant", "inverse-square-root"))
    _one_of("train.lr_wsd_decay_style", t.lr_wsd_decay_style, ("exponential", "linear", "cosine", "minus_sqrt"))
    decay = t.lr_decay_iters if t.lr_decay_iters is not None else t.steps
    if not 0 <= t.min_lr <= t.lr:
        raise UserError(f"train.min_lr ({t.min_lr}) must be between 0 and train.lr ({t.lr})")
    if t.warmup < 0 or (t.lr_decay_iters is not None and t.lr_decay_iters < 1):
        raise UserError("train.warmup must be >= 0 and train.lr_decay_iters >= 1")
    if t.lr_decay_style == "WSD":
        if t.lr_wsd_decay_iters is None:
            raise UserError("train.lr_decay_style=WSD needs train.lr_wsd_decay_iters (the length of the final decay)")
        if not 1 <= t.lr_wsd_decay_iters <= decay - t.warmup:
            raise UserError(f"config key 'train.lr_wsd_decay_iters': expected 1..{decay - t.warmup} "
                            f"(decay iterations after warmup), got {t.lr_wsd_decay_iters}")
    if t.adam_eps <= 0 or not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1):
        raise UserError("train.adam_eps must be > 0 and train.adam_beta1/adam_beta2 in [0, 1)")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise UserError(f"config key 'train.peak_tflops': expected > 0 or null, got {t.peak_tflops}")

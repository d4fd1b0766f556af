"""The typed run configuration: one dataclass per section, YAML file + dotted `key=value` overrides.

    cfg = load_config("examples/tiny/config.yaml", ["train.steps=20", "parallel.tp=2"])

Unknown keys, wrong types and inconsistent shapes are `UserError`s naming the key, so a typo in a
1000-GPU job fails in the first second instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
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

_SIGNALS = {s.name for s in signal.Signals} - {"SIGKILL", "SIGSTOP"}


@dataclass
class ModelConfig:
    type: Literal["gpt", "ponder"] = "gpt"  # "gpt" (Llama-style) or "ponder" (latent thoughts: see `ponder:`)
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
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"  # auto: TE when importable, on GPU
    # FP8 through Transformer Engine (Megatron's --fp8-format, --fp8-recipe, --fp8-amax-*; same defaults)
    fp8: Literal["hybrid", "e4m3"] | None = None  # --fp8-format
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"  # mxfp8: Blackwell
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1  # delayed recipe only
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"  # delayed recipe only
    fp8_wgrad: bool = True  # false: weight gradients in higher precision
    # activation recomputation (Megatron's --recompute-granularity/-method/-num-layers/-modules)
    recompute_granularity: Literal["selective", "full"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None  # full only
    recompute_num_layers: int | None = None  # full only: layers per unit (uniform) / per stage (block)
    # selective only; the dense-Llama subset of megatron-core's recompute_modules
    recompute_modules: list[Literal["core_attn", "mlp", "layernorm"]] = field(default_factory=lambda: ["core_attn"])
    # fused kernels: None = on when this machine has the kernel (megatron_bolt.models.gpt.fused_kernels)
    gradient_accumulation_fusion: bool | None = None
    bias_dropout_fusion: bool | None = None
    masked_softmax_fusion: bool | None = None
    apply_rope_fusion: bool | None = None

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

    def problems(self) -> Iterator[tuple[str, str]]:
        sizes = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_len", "make_vocab_divisible_by")
        small = [(key, getattr(self, key)) for key in sizes if getattr(self, key) < 1]
        small += [(key, getattr(self, key)) for key in ("num_query_groups", "ffn_hidden_size")
                  if getattr(self, key) is not None and getattr(self, key) < 1]
        if small:  # the shape checks below divide by these
            yield small[0][0], f"expected >= 1, got {small[0][1]}"
            return
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            yield "num_attention_heads", (f"{self.num_attention_heads} must divide model.hidden_size "
                                          f"({self.hidden_size}), or set model.kv_channels")
        if self.kv_channels is not None and self.kv_channels < 2:
            yield "kv_channels", f"expected >= 2 or null, got {self.kv_channels}"
        elif self.num_attention_heads % self.kv_heads:
            yield "num_query_groups", f"{self.kv_heads} must divide model.num_attention_heads ({self.num_attention_heads})"
        elif self.head_dim % 2:
            yield "kv_channels", f"the head dim ({self.head_dim}: model.kv_channels or hidden/heads) must be even for RoPE"
        if self.rope_scaling_factor is not None and self.rope_scaling_factor < 1:
            yield "rope_scaling_factor", f"expected >= 1 or null, got {self.rope_scaling_factor}"
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            yield "max_position_embeddings", f"expected >= 1 or null, got {self.max_position_embeddings}"
        if self.fp8_amax_history_len < 1:
            yield "fp8_amax_history_len", f"expected >= 1, got {self.fp8_amax_history_len}"
        if self.fp8 and self.transformer_impl == "local":
            yield "fp8", (f"{self.fp8!r} needs the Transformer Engine layer spec; model.transformer_impl=local "
                          "has no FP8 (use auto or transformer_engine)")
        # Megatron-LM's rules for --recompute-granularity/-method/-num-layers (the range of
        # recompute_num_layers depends on parallel.pp: validate)
        if self.recompute_granularity == "full":
            if self.recompute_method is None or self.recompute_num_layers is None:
                yield "recompute_granularity", ("full needs model.recompute_method (uniform|block) "
                                                "and model.recompute_num_layers")
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            yield "recompute_method", ("model.recompute_method and model.recompute_num_layers apply to "
                                       f"recompute_granularity=full only (it is {self.recompute_granularity!r})")


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

    def problems(self) -> Iterator[tuple[str, str]]:
        for key in ("tp", "pp", "cp"):
            if getattr(self, key) < 1:
                yield key, f"expected >= 1, got {getattr(self, key)}"
        if self.vp is not None and (self.vp < 1 or self.pp < 2):
            yield "vp", f"{self.vp} needs parallel.pp > 1 and vp >= 1 (or vp=null)"


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch: int = 4
    global_batch: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 10
    # Megatron's --lr-decay-style / --lr-decay-iters / --lr-wsd-decay-style / --lr-wsd-decay-iters
    lr_decay_style: Literal["cosine", "linear", "WSD", "constant", "inverse-square-root"] = "cosine"
    lr_decay_iters: int | None = None  # None = train.steps
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = "exponential"  # WSD's final decay
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

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.steps < 0:
            yield "steps", f"expected >= 0, got {self.steps}"
        if self.micro_batch < 1:
            yield "micro_batch", f"expected >= 1, got {self.micro_batch}"
        elif self.global_batch % self.micro_batch or self.global_batch < 1:
            yield "micro_batch", f"{self.micro_batch} must divide train.global_batch ({self.global_batch})"
        if self.exit_signal not in _SIGNALS:
            yield "exit_signal", f"expected a signal name such as SIGTERM or SIGUSR1, got {self.exit_signal!r}"
        if self.exit_duration_mins is not None and self.exit_duration_mins <= 0:
            yield "exit_duration_mins", f"expected > 0 or null, got {self.exit_duration_mins}"
        if self.eval_interval < 0:
            yield "eval_interval", f"expected >= 0, got {self.eval_interval}"
        if self.eval_iters < 1:
            yield "eval_iters", f"expected >= 1, got {self.eval_iters}"
        yield from self._schedule_problems()
        if self.adam_eps <= 0:
            yield "adam_eps", f"expected > 0, got {self.adam_eps}"
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                yield key, f"expected a value in [0, 1), got {getattr(self, key)}"
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            yield "peak_tflops", f"expected > 0 or null, got {self.peak_tflops}"

    def _schedule_problems(self) -> Iterator[tuple[str, str]]:
        """Megatron-LM's learning-rate schedule rules (OptimizerParamScheduler)."""
        if not 0 <= self.min_lr <= self.lr:
            yield "min_lr", f"{self.min_lr} must be between 0 and train.lr ({self.lr})"
        if self.warmup < 0:
            yield "warmup", f"expected >= 0, got {self.warmup}"
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            yield "lr_decay_iters", f"expected >= 1 or null, got {self.lr_decay_iters}"
        decay = self.lr_decay_iters if self.lr_decay_iters is not None else self.steps
        if self.lr_decay_style == "WSD":
            if self.lr_wsd_decay_iters is None:
                yield "lr_decay_style", "WSD needs train.lr_wsd_decay_iters (the length of the final decay)"
            elif not 1 <= self.lr_wsd_decay_iters <= decay - self.warmup:
                yield "lr_wsd_decay_iters", (f"expected 1..{decay - self.warmup} (decay iterations after warmup), "
                                             f"got {self.lr_wsd_decay_iters}")


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

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.num_workers < 0:
            yield "num_workers", f"expected >= 0, got {self.num_workers}"


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

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.save_interval < 0:
            yield "save_interval", f"expected >= 0 (0: only at the end), got {self.save_interval}"


@dataclass
class PonderConfig:
    """PonderLM-2's continuous latent thoughts (models.ponder); read only when model.type is ponder."""

    latents_per_token: int = 1  # K latent slots after every token
    jacobi_iters: list[int] = field(default_factory=lambda: [2, 3])  # training: J drawn per micro-batch
    eval_jacobi_iters: int = 3  # J in eval mode (and the HF export's default)
    embed_scale: float | None = None  # token-embedding multiplier; None = sqrt(2.5 * hidden) as in the reference

    def scale(self, hidden_size: int) -> float:
        return self.embed_scale or math.sqrt(2.5 * hidden_size)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.latents_per_token < 1:
            yield "latents_per_token", f"expected >= 1, got {self.latents_per_token}"
        if not self.jacobi_iters or any(j < 0 for j in self.jacobi_iters):
            yield "jacobi_iters", f"expected a non-empty list of values >= 0, got {self.jacobi_iters}"
        if self.eval_jacobi_iters < 0:
            yield "eval_jacobi_iters", f"expected >= 0, got {self.eval_jacobi_iters}"
        if self.embed_scale is not None and self.embed_scale <= 0:
            yield "embed_scale", f"expected > 0 or null, got {self.embed_scale}"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ponder: PonderConfig = field(default_factory=PonderConfig)
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
        if self.source == "files" and not self.valid:
            # the reference validates on documents outside both training splits; a rest file would
            # measure the bound in-sample
            yield "valid", "'files' needs corpus.valid: held-out documents (in neither warm nor rest) for the IWAE bound"
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
    if hint is Any or origin is typing.Literal:  # a Literal's choices: check_section, for every section
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
        if f"{prefix}{key}" in MOVED_KEYS:
            raise UserError(f"config key '{prefix}{key}' has moved: write it as '{MOVED_KEYS[prefix + key]}'")
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
    """A section's own checks, the first one as a one-line error naming the key: every `Literal`
    field holds one of its choices, then the section's `problems()`."""
    for key, message in section_problems(section):
        raise UserError(f"config key '{prefix}{key}': {message}")


def section_problems(section: Any) -> Iterator[tuple[str, str]]:
    """(field, message) for everything wrong inside one section (not across sections)."""
    yield from _choice_problems(section)
    yield from getattr(section, "problems", lambda: ())()


def _choice_problems(section: Any) -> Iterator[tuple[str, str]]:
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        choices, optional, is_list = _choices(hints[f.name])
        if not choices:
            continue
        value = getattr(section, f.name)
        items = list(enumerate(value)) if is_list and isinstance(value, list) else [(None, value)]
        for i, item in items:
            if item is None and optional:
                continue
            if item not in choices:
                shown = ", ".join(["null"] * optional + [repr(c) for c in choices])
                yield (f.name if i is None else f"{f.name}[{i}]"), f"expected one of {shown}, got {item!r}"


def _choices(hint: Any) -> tuple[tuple, bool, bool]:
    """(Literal choices, None allowed, a list of them) of an annotation; no choices: not a Literal."""
    optional = is_list = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    if typing.get_origin(hint) is list:
        is_list, hint = True, (typing.get_args(hint) or (Any,))[0]
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint), optional, is_list
    return (), optional, is_list


# Keys that moved to another section. The old spelling is an error that says where the key went;
# run configs saved in checkpoints before the move are read with the keys moved (upgrade_saved_tree).
MOVED_KEYS = {f"model.{key}": f"ponder.{key}"
              for key in ("latents_per_token", "jacobi_iters", "eval_jacobi_iters", "embed_scale")}


def upgrade_saved_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A run config as an earlier version saved it, with MOVED_KEYS at their new places."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if isinstance(out.get(old_section), dict) and old_key in out[old_section]:
            value = out[old_section].pop(old_key)
            out.setdefault(new_section, {}).setdefault(new_key, value)
    return out


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
    """Every section's own checks, then the ones across sections; `world_size` adds the
    data-parallel checks. The first problem is raised as a one-line `UserError`."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            check_section(section, f"{f.name}.")
    for message in _cross_section_problems(cfg, world_size):
        raise UserError(message)


def _cross_section_problems(cfg: RunConfig, world_size: int | None) -> Iterator[str]:
    m, par, t = cfg.model, cfg.parallel, cfg.train
    if m.num_attention_heads % par.tp:
        yield f"parallel.tp ({par.tp}) must divide model.num_attention_heads ({m.num_attention_heads})"
    if m.kv_heads % par.tp:
        yield f"parallel.tp ({par.tp}) must divide the KV heads (model.num_query_groups = {m.kv_heads})"
    if m.ffn % par.tp:
        yield f"parallel.tp ({par.tp}) must divide the FFN size ({m.ffn})"
    if m.num_layers % par.pp:
        yield f"parallel.pp ({par.pp}) must divide model.num_layers ({m.num_layers})"
    if par.vp is not None:
        if m.num_layers % (par.pp * par.vp):
            yield f"parallel.pp * parallel.vp ({par.pp}*{par.vp}) must divide model.num_layers ({m.num_layers})"
        if m.type == "ponder":
            yield "parallel.vp: the ponder model has its own pipeline schedule; use vp=null"
    if par.overlap_param_gather and not t.distributed_optimizer:
        yield "parallel.overlap_param_gather needs train.distributed_optimizer=true (as in Megatron-LM)"
    per_stage = m.num_layers // par.pp
    if m.recompute_granularity == "full" and not 1 <= m.recompute_num_layers <= per_stage:
        yield (f"config key 'model.recompute_num_layers': expected 1..{per_stage} "
               f"(layers per pipeline stage), got {m.recompute_num_layers}")
    if par.cp > 1 and m.transformer_impl == "local":
        yield "parallel.cp > 1 needs Transformer Engine's attention; model.transformer_impl=local has none"
    if par.cp > 1 and m.seq_len % (2 * par.cp):
        yield f"model.seq_len ({m.seq_len}) must be divisible by 2 * parallel.cp ({2 * par.cp})"
    if world_size is not None:
        model_parallel = par.tp * par.pp * par.cp
        if world_size % model_parallel:
            yield f"world size {world_size} is not divisible by tp*pp*cp = {model_parallel}"
        elif t.global_batch % (t.micro_batch * (world_size // model_parallel)):
            yield (f"train.global_batch ({t.global_batch}) must be divisible by micro_batch*data_parallel "
                   f"({t.micro_batch}*{world_size // model_parallel})")

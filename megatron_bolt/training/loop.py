"""The training loop on Megatron-Core: schedules, DDP, (distributed) optimizer, cosine LR, clipping,
distributed checkpoints, metrics.jsonl + TensorBoard. Same code on CPU/gloo and GPU/NCCL.

Per step: `get_forward_backward_func()` runs the micro-batches of this rank's share of the global
batch through the pipeline schedule; `finalize_model_grads` reduces gradients over DP (and the tied
embedding over PP); the Megatron optimizer clips and steps; the LR scheduler advances.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_bolt import runtime
from megatron_bolt.atomic import atomic_write_text
from megatron_bolt.config import RunConfig, validate
from megatron_bolt.errors import UserError
from megatron_bolt.models import build_model_chunk
from megatron_bolt.models.gpt import check_requirements
from megatron_bolt.models.init import initialize_weights
from megatron_bolt.training import checkpoint as ckpt
from megatron_bolt.training import settings
from megatron_bolt.training.context_parallel import cp_slice, masked_mean_loss
from megatron_bolt.training.data import GlobalBatchSampler, build_datasets
from megatron_bolt.training.exit import ExitSignalHandler
from megatron_bolt.training.metrics import StepMeter
from megatron_bolt.training.schedule import build_scheduler


def layer_offset(cfg: RunConfig, vp_stage: int | None = None) -> int:
    """Index of this rank's (virtual) stage's first layer in the whole model."""
    pp, vp = cfg.parallel.pp, cfg.parallel.vp or 1
    per_chunk = cfg.model.num_layers // (pp * vp)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return ((vp_stage or 0) * pp + pp_rank) * per_chunk


def build_model(cfg: RunConfig, wrap_ddp: bool = True):
    """This rank's pipeline stage, initialised identically at any TP/PP, optionally DDP-wrapped.

    For training (wrap_ddp) the result is a list of model chunks, one per virtual pipeline stage
    (one without parallel.vp), as Megatron-LM's `training.get_model` builds them: a bf16 model is
    wrapped in `Float16Module` (all parameters bf16, fp32 logits), then in DDP.
    """
    if not wrap_ddp:
        return _build_chunk(cfg, None)
    vp = cfg.parallel.vp
    chunks = [_build_chunk(cfg, i if vp else None) for i in range(vp or 1)]
    if cfg.train.bf16:
        chunks = [Float16Module(c.config, c) for c in chunks]
    ddp_config = settings.ddp_config(cfg)
    return [
        DistributedDataParallel(
            config=c.config, ddp_config=ddp_config, module=c,
            # Megatron-LM: only the first chunk's buffers are bucketed (the others overlap nothing)
            disable_bucketing=i > 0,
        )
        for i, c in enumerate(chunks)
    ]


def _build_chunk(cfg: RunConfig, vp_stage: int | None):
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    module = build_model_chunk(cfg, pre_process=first, post_process=last, vp_stage=vp_stage)
    initialize_weights(module, cfg.model, cfg.train.seed, layer_offset(cfg, vp_stage))
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    return module


def build_optimizer(cfg: RunConfig, model: list):
    t = cfg.train
    optimizer = get_megatron_optimizer(settings.optimizer_config(cfg), model, **settings.optimizer_kwargs(cfg))
    return optimizer, build_scheduler(optimizer, t, override=t.override_opt_param_scheduler)


def override_scheduler(cfg: RunConfig, optimizer, scheduler) -> None:
    """After a resume: this config's lr bounds replace the checkpoint's (the optimizer state
    carries its param groups' max_lr/min_lr), as Megatron-LM's load_checkpoint does under
    --override-opt_param-scheduler, and the lr of the current step is recomputed."""
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = cfg.train.lr, cfg.train.min_lr
    scheduler.step(increment=0)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    loss, reported = masked_mean_loss(output_tensor, loss_mask)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": reported.clone()}


def _forward_step(data_iterator, model):
    batch = cp_slice(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def forward_backward_func(cfg: RunConfig):
    """Megatron's schedule for this configuration; the ponder model at PP > 1 has its own, since
    each of its Jacobi passes traverses the whole pipeline (megatron_bolt.models.ponder_pipeline)."""
    if cfg.model.type == "ponder" and cfg.parallel.pp > 1:
        from megatron_bolt.models.ponder_pipeline import forward_backward

        return forward_backward
    return get_forward_backward_func()


def _configure_schedule(cfg: RunConfig, model: list, optimizer) -> None:
    """The hooks Megatron-LM's training.setup_model_and_optimizer/train put on the model config."""
    config = model[0].module.config if hasattr(model[0], "module") else model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if cfg.parallel.overlap_grad_reduce:
        config.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync
        config.grad_sync_func = [c.start_grad_sync for c in model] if len(model) > 1 else model[0].start_grad_sync
    if cfg.parallel.overlap_param_gather:
        config.param_sync_func = (
            [c.start_param_sync for c in model] if len(model) > 1 else model[0].start_param_sync
        )


def _to_device(batches):
    dev = runtime.device()
    for b in batches:
        yield {k: v.to(dev, non_blocking=True) for k, v in b.items()}


def _run_schedule(cfg: RunConfig, model: list, forward_backward, batches, num_microbatches: int, forward_only: bool):
    """One global batch through the pipeline schedule; returns the mean loss on every rank."""
    batches = _to_device(batches)
    # Megatron's interleaved schedule takes one iterator per model chunk; every chunk of a stage
    # reads the same micro-batches (only the first and last virtual stages use them).
    if len(model) > 1:
        batches = list(batches)
        data_iterator = [iter(batches) for _ in model]
    else:
        data_iterator = batches
    losses = forward_backward(
        forward_step_func=_forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=cfg.model.seq_len,
        micro_batch_size=cfg.train.micro_batch,
        forward_only=forward_only,
    )
    return _reduce_loss(losses)


def evaluate(cfg: RunConfig, model: list, forward_backward, sampler) -> dict:
    """Mean loss and perplexity over `train.eval_iters` validation global batches (the same
    batches at every evaluation, so the curve compares like with like)."""
    for chunk in model:
        chunk.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(cfg.train.eval_iters):
            total += _run_schedule(cfg, model, forward_backward, sampler.microbatches(i),
                                   sampler.num_microbatches, forward_only=True)
    for chunk in model:
        chunk.train()
    loss = total / cfg.train.eval_iters
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 80.0))}


def _reduce_loss(losses_reduced: list[dict]) -> float:
    """Mean loss of the global batch, known on every rank (computed on the last stage)."""
    value = torch.zeros(1, dtype=torch.float64, device=runtime.device())
    if (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0):
        if losses_reduced:
            mean = sum(float(x["lm loss"]) for x in losses_reduced) / len(losses_reduced)
            value += mean / parallel_state.get_data_parallel_world_size()
    dist.all_reduce(value)
    return float(value.item())


class MetricsWriter:
    """metrics.jsonl (one object per step) and TensorBoard, on global rank 0 only."""

    def __init__(self, output_dir: Path, resume_step: int):
        self.enabled = runtime.is_main()
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if not self.enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        # A resumed run must not duplicate the steps it redoes after the checkpoint.
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):
                continue  # a line cut by a kill
        atomic_write_text(self.path, "".join(x + "\n" for x in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    tag = f"valid/{key[6:]}" if key.startswith("valid_") else f"train/{key}"
                    self.tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _progress(step: int, total: int, record: dict, started: float, first_step: int) -> str:
    done = step - first_step
    eta = (time.time() - started) / max(done, 1) * (total - step)
    gn = record["grad_norm"]
    return (
        f"step {step:>6}/{total} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
        f"grad norm {gn if gn is None else format(gn, '.3f')} | {record['tokens_per_s']:,.0f} tok/s | "
        + (f"MFU {record['mfu']:.1%} | " if record.get("mfu") is not None else "")
        + (f"peak {record['peak_mem_gib']:.1f} GiB | " if record.get("peak_mem_gib") is not None else "")
        + f"eta {eta / 60:.1f} min"
    )


def train(cfg: RunConfig, dist_env: runtime.DistEnv | None = None) -> dict:
    """Train per `cfg`; resumes from `cfg.checkpoint_dir` if it holds a checkpoint. Collective.

    `dist_env`: this process's rank (default: `runtime.detect_env()`). Without CUDA the caller
    must have installed the CPU compatibility layer (`megatron_bolt.compat.cpu.install()`).

    Stops early, after saving a checkpoint, when any rank gets SIGTERM / `train.exit_signal` or
    `train.exit_duration_mins` has passed (the returned record then has "stopped": the reason).
    """
    started = time.time()
    par, t = cfg.parallel, cfg.train
    exit_handler = ExitSignalHandler(t.exit_signal) if t.exit_signal_handler else None
    check_requirements(cfg.model, cfg.parallel)  # before any process group: the clearest error
    try:
        runtime.init_distributed(par.tp, par.pp, t.seed, vp=par.vp, gloo_process_groups=par.gloo_process_groups,
                                 cp=par.cp, env=dist_env)
        return _train(cfg, exit_handler, started)
    finally:
        if exit_handler is not None:
            exit_handler.restore()


def _train(cfg: RunConfig, exit_handler: ExitSignalHandler | None, started: float) -> dict:
    validate(cfg, dist.get_world_size())
    output_dir = Path(cfg.output_dir)
    t = cfg.train

    model = build_model(cfg)
    optimizer, scheduler = build_optimizer(cfg, model)
    _configure_schedule(cfg, model, optimizer)
    modules = [chunk.module for chunk in model]

    start_step = 0
    ckpt_dir = cfg.checkpoint_dir
    optimizer_loaded = False
    if ckpt.latest_step(ckpt_dir) is not None:
        # A checkpoint saved with checkpoint.save_optimizer=false resumes with fresh Adam moments.
        optimizer_loaded = ckpt.has_optimizer_state(ckpt_dir)
        start_step, _ = ckpt.load_checkpoint(ckpt_dir, modules, optimizer if optimizer_loaded else None,
                                             scheduler, cfg=cfg)
        if t.override_opt_param_scheduler:
            override_scheduler(cfg, optimizer, scheduler)
        runtime.print0(f"resumed from {ckpt_dir} at step {start_step}"
                       + ("" if optimizer_loaded else " (no optimizer state in the checkpoint: Adam restarts)"))
    elif cfg.checkpoint.load:
        ckpt.load_checkpoint(cfg.checkpoint.load, modules, cfg=cfg)
        runtime.print0(f"loaded weights from {cfg.checkpoint.load}")
    else:
        for chunk in model:
            chunk.broadcast_params()
    loaded_weights = ckpt.latest_step(ckpt_dir) is not None or bool(cfg.checkpoint.load)
    if loaded_weights and not optimizer_loaded:
        # The fp32 main params (bf16) and the distributed optimizer's shards were copied from the
        # model when the optimizer was built; loaded weights must reach them, or the first step
        # puts the initial weights back. Megatron-LM's load_checkpoint does the same.
        optimizer.reload_model_params()

    valid_batches = t.eval_iters * t.global_batch if t.eval_interval else 0
    train_ds, valid_ds, _ = build_datasets(cfg, (t.steps * t.global_batch, valid_batches, 0))
    if t.eval_interval and valid_ds is None:
        raise UserError(
            "train.eval_interval is set but there is no validation data: give data.split a validation "
            "share (e.g. '969,30,1') or data.valid_prefixes"
        )
    sampler = GlobalBatchSampler(train_ds, t.global_batch, t.micro_batch)
    valid_sampler = GlobalBatchSampler(valid_ds, t.global_batch, t.micro_batch) if t.eval_interval else None
    metrics = MetricsWriter(output_dir, start_step)
    forward_backward = forward_backward_func(cfg)
    tokens_per_step = t.global_batch * cfg.model.seq_len
    runtime.print0(
        f"training {cfg.model.type} model: {sum(p.numel() for m in modules for p in m.parameters()):,} params on "
        f"this rank, world {dist.get_world_size()} (tp {cfg.parallel.tp}, pp {cfg.parallel.pp}, "
        f"vp {cfg.parallel.vp or 1}, dp {parallel_state.get_data_parallel_world_size()}), {t.steps} steps of "
        f"{tokens_per_step:,} tokens"
    )

    meter = StepMeter(cfg, dist.get_world_size())
    last = {}
    loop_started = time.time()
    for step in range(start_step + 1, t.steps + 1):
        step_start = time.time()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        loss = _run_schedule(cfg, model, forward_backward, sampler.microbatches(step - 1),
                             sampler.num_microbatches, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}")
        last = {
            "step": step,
            "loss": loss,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            **meter.measure(time.time() - step_start),
        }
        if valid_sampler is not None and (step % t.eval_interval == 0 or step == t.steps):
            last.update(evaluate(cfg, model, forward_backward, valid_sampler))
            runtime.print0(f"validation at step {step}: loss {last['valid_loss']:.4f} | ppl {last['valid_ppl']:.3f}")
        metrics.write(last)
        if step % t.log_interval == 0 or step == t.steps:
            runtime.print0(_progress(step, t.steps, last, loop_started, start_step))
        stop = _should_stop(cfg, exit_handler, started) if step < t.steps else None
        if (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0) or step == t.steps or stop:
            ckpt.save_checkpoint(ckpt_dir, step, modules, optimizer if cfg.checkpoint.save_optimizer else None,
                                 scheduler, cfg)
        ckpt.finalize_async_saves(blocking=False)
        if stop:
            runtime.print0(f"{stop}: saved a checkpoint at step {step} and stopped; rerun the same command to resume")
            last["stopped"] = stop
            break
    ckpt.finalize_async_saves(blocking=True)
    metrics.close()
    return last


def _should_stop(cfg: RunConfig, exit_handler: ExitSignalHandler | None, started: float) -> str | None:
    """Whether to save and exit now. Every rank takes the same decision: the flags are all-reduced
    (Megatron-LM's DistributedSignalHandler and its --exit-duration-in-mins check do the same)."""
    t = cfg.train
    flags = torch.zeros(2, dtype=torch.int32, device=runtime.device())
    if exit_handler is not None and exit_handler.received:
        flags[0] = 1
    if t.exit_duration_mins is not None and (time.time() - started) / 60 > t.exit_duration_mins:
        flags[1] = 1
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0]:
        return f"got {exit_handler.name if exit_handler and exit_handler.received else 'an exit signal on another rank'}"
    if flags[1]:
        return f"train.exit_duration_mins={t.exit_duration_mins} has passed"
    return None

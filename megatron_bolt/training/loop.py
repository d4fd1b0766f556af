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
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_bolt import runtime
from megatron_bolt.atomic import atomic_write_text
from megatron_bolt.config import RunConfig, validate
from megatron_bolt.models import build_model_chunk
from megatron_bolt.models.init import initialize_weights
from megatron_bolt.training import checkpoint as ckpt
from megatron_bolt.training.data import GlobalBatchSampler, build_datasets


def layer_offset(cfg: RunConfig) -> int:
    return parallel_state.get_pipeline_model_parallel_rank() * (cfg.model.num_layers // cfg.parallel.pp)


def build_model(cfg: RunConfig, wrap_ddp: bool = True):
    """This rank's pipeline stage, initialised identically at any TP/PP, optionally DDP-wrapped."""
    module = build_model_chunk(
        cfg,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    initialize_weights(module, cfg.model, cfg.train.seed, layer_offset(cfg))
    if torch.cuda.is_available():
        module.cuda(torch.cuda.current_device())
    if not wrap_ddp:
        return module
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.train.distributed_optimizer,
    )
    return DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)


def build_optimizer(cfg: RunConfig, model):
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        use_distributed_optimizer=t.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup,
        lr_decay_steps=max(t.steps, t.warmup + 1),
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float()
    mask = loss_mask.float()
    loss = torch.sum(losses.view(-1) * mask.view(-1)) / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def forward_backward_func(cfg: RunConfig):
    """Megatron's schedule for this configuration; the ponder model at PP > 1 has its own, since
    each of its Jacobi passes traverses the whole pipeline (megatron_bolt.models.ponder_pipeline)."""
    if cfg.model.type == "ponder" and cfg.parallel.pp > 1:
        from megatron_bolt.models.ponder_pipeline import forward_backward

        return forward_backward
    return get_forward_backward_func()


def _to_device(batches):
    dev = runtime.device()
    for b in batches:
        yield {k: v.to(dev, non_blocking=True) for k, v in b.items()}


def _reduce_loss(losses_reduced: list[dict]) -> float:
    """Mean loss of the global batch, known on every rank (computed on the last stage)."""
    value = torch.zeros(1, dtype=torch.float64, device=runtime.device())
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
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
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

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
        f"eta {eta / 60:.1f} min"
    )


def train(cfg: RunConfig) -> dict:
    """Train per `cfg`; resumes from `cfg.checkpoint_dir` if it holds a checkpoint. Collective."""
    runtime.init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    validate(cfg, dist.get_world_size())
    output_dir = Path(cfg.output_dir)
    t = cfg.train

    model = build_model(cfg)
    optimizer, scheduler = build_optimizer(cfg, model)
    module = model.module
    module.config.finalize_model_grads_func = finalize_model_grads
    module.config.grad_scale_func = optimizer.scale_loss

    start_step = 0
    ckpt_dir = cfg.checkpoint_dir
    if ckpt.latest_step(ckpt_dir) is not None:
        start_step, _ = ckpt.load_checkpoint(ckpt_dir, [module], optimizer, scheduler)
        runtime.print0(f"resumed from {ckpt_dir} at step {start_step}")
    elif cfg.checkpoint.load:
        ckpt.load_checkpoint(cfg.checkpoint.load, [module])
        runtime.print0(f"loaded weights from {cfg.checkpoint.load}")
    if start_step == 0:
        model.broadcast_params()

    train_ds, _, _ = build_datasets(cfg, (t.steps * t.global_batch, 0, 0))
    sampler = GlobalBatchSampler(train_ds, t.global_batch, t.micro_batch)
    metrics = MetricsWriter(output_dir, start_step)
    forward_backward = forward_backward_func(cfg)
    tokens_per_step = t.global_batch * cfg.model.seq_len
    runtime.print0(
        f"training {cfg.model.type} model: {sum(p.numel() for p in module.parameters()):,} params on this rank, "
        f"world {dist.get_world_size()} (tp {cfg.parallel.tp}, pp {cfg.parallel.pp}, "
        f"dp {parallel_state.get_data_parallel_world_size()}), {t.steps} steps of {tokens_per_step:,} tokens"
    )

    last = {}
    started = time.time()
    for step in range(start_step + 1, t.steps + 1):
        step_start = time.time()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=_to_device(sampler.microbatches(step - 1)),
            model=[model],
            num_microbatches=sampler.num_microbatches,
            seq_length=cfg.model.seq_len,
            micro_batch_size=t.micro_batch,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        loss = _reduce_loss(losses)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}")
        elapsed = time.time() - step_start
        last = {
            "step": step,
            "loss": loss,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tokens_per_step / max(elapsed, 1e-9),
        }
        metrics.write(last)
        if step % t.log_interval == 0 or step == t.steps:
            runtime.print0(_progress(step, t.steps, last, started, start_step))
        if (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0) or step == t.steps:
            ckpt.save_checkpoint(ckpt_dir, step, [module], optimizer if cfg.checkpoint.save_optimizer else None, scheduler, cfg)
    metrics.close()
    return last

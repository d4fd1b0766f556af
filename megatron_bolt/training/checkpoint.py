"""Megatron-Core distributed checkpoints, loadable at a TP/PP different from the one saved.

Layout of a checkpoint directory: checkpoint_layout.py (Megatron-LM's convention, plus the run config).
A step directory is written under a temporary name and renamed, and the "latest" file is replaced
atomically after that, so a crash mid-save leaves the previous checkpoint as the latest.

Formats follow Megatron-LM's checkpointing.save_checkpoint/load_checkpoint: the content metadata
(megatron_bolt.training.settings.sharded_state_dict_metadata) is saved with the checkpoint and
read back on load, so a checkpoint loads with the optimizer format it was written in; saves are
spread over the data-parallel ranks (FullyParallelSaveStrategyWrapper, --ckpt-fully-parallel-save)
and optionally asynchronous (--async-save).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.transformer.module import Float16Module

from megatron_bolt.atomic import atomic_write_text
from megatron_bolt.config import RunConfig
from megatron_bolt.errors import UserError
from megatron_bolt.training.checkpoint_layout import (
    LATEST,
    RUN_CONFIG,
    latest_step,
    read_run_config,
    step_dir,
)

# Checkpoints written before the content metadata was saved used this optimizer format.
_LEGACY_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# Layers from Transformer Engine carry `_extra_state` (FP8 scaling metadata) that a checkpoint
# written with the local spec (and every conversion) lacks; only those keys may be absent.
EXTRA_STATE = "_extra_state"
_FULLY_RESHARDABLE = ("fully_reshardable", "fully_sharded_model_space")


def _model_state(model_chunks: list[torch.nn.Module], metadata: dict | None = None) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict(metadata=metadata)}
    return {f"model{i}": chunk.sharded_state_dict(metadata=metadata) for i, chunk in enumerate(model_chunks)}


def _metadata(cfg: RunConfig | None) -> dict:
    from megatron_bolt.training.settings import sharded_state_dict_metadata

    return sharded_state_dict_metadata(cfg) if cfg is not None else {}


class _AsyncSaves:
    """The queue of asynchronous saves of this process (Megatron-LM keeps one per process too)."""

    queue: AsyncCallsQueue | None = None


def finalize_async_saves(blocking: bool = False) -> None:
    """Complete finished asynchronous saves (all of them with `blocking`): their step directory is
    renamed into place and becomes the latest. Collective; a no-op without async saves."""
    if _AsyncSaves.queue is not None:
        _AsyncSaves.queue.maybe_finalize_async_calls(blocking=blocking)
        if blocking:
            _AsyncSaves.queue.close()
            _AsyncSaves.queue = None


def has_optimizer_state(ckpt_dir: str | Path, step: int | None = None) -> bool:
    """Whether the checkpoint holds optimizer state (not when saved with checkpoint.save_optimizer=false)."""
    step = latest_step(ckpt_dir) if step is None else step
    common = dist_checkpointing.load_common_state_dict(str(step_dir(ckpt_dir, step)))
    # checkpoints from before this flag: the optimizer's common state is there iff it was saved
    return bool(common.get("has_optimizer", "optimizer" in common))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model_chunks: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    cfg: RunConfig | None = None,
    extra: dict | None = None,
) -> Path:
    """Save model (+ optimizer, scheduler, RNG-free training state) at `step`, collectively.

    With `cfg.checkpoint.async_save` the write goes on in the background and the step becomes the
    latest once `finalize_async_saves` has seen it complete (the training loop calls it each step).
    """
    ckpt_dir = Path(ckpt_dir)
    final = step_dir(ckpt_dir, step)
    tmp = ckpt_dir / f".tmp_iter_{step:07d}"
    async_save = cfg is not None and cfg.checkpoint.async_save
    if async_save:
        finalize_async_saves(blocking=True)  # one save in flight at a time
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if cfg is not None:
            _atomic_write(ckpt_dir / RUN_CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _barrier()
    metadata = _metadata(cfg)
    # Megatron-Core adds its process group to the metadata it is given: hand it copies
    state = _model_state(model_chunks, dict(metadata))
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"] if "model" in state else state,
                                                          metadata=dict(metadata))
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["step"] = step
    state["has_optimizer"] = optimizer is not None
    state["extra"] = extra or {}
    request = dist_checkpointing.save(
        state, str(tmp), _save_strategy(), async_sharded_save=async_save, content_metadata=metadata,
    )

    def publish() -> None:
        _barrier()
        if _rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _atomic_write(ckpt_dir / LATEST, f"{step}\n")
        _barrier()

    if request is None:
        publish()
    else:
        request.add_finalize_fn(publish)
        if _AsyncSaves.queue is None:
            _AsyncSaves.queue = AsyncCallsQueue()
        _AsyncSaves.queue.schedule_async_request(request)
    return final


def _save_strategy():
    """torch_dist, with the writes spread over the data-parallel ranks (each writes a share of
    the replicated tensors instead of DP rank 0 writing them all), as Megatron-LM does by default."""
    strategy = get_default_save_sharded_strategy()
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def load_checkpoint(
    ckpt_dir: str | Path,
    model_chunks: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    step: int | None = None,
    cfg: RunConfig | None = None,
) -> tuple[int, dict]:
    """Load into already-built model chunks (any TP/PP); returns (step, extra).

    Without an optimizer only the weights are read (fine-tuning / scoring / conversion). The
    optimizer state is read in the format the checkpoint was saved in; `cfg` (this run's config)
    lets a format that cannot follow a TP/PP change fail with a clear message.
    """
    ckpt_dir = Path(ckpt_dir)
    if step is None:
        step = latest_step(ckpt_dir)
    if step is None:
        raise UserError(f"{ckpt_dir}: no {LATEST}; not a checkpoint directory, or no save finished")
    path = step_dir(ckpt_dir, step)
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint step directory is missing")
    metadata = dist_checkpointing.load_content_metadata(str(path)) or dict(_LEGACY_METADATA)
    state = _model_state(model_chunks, dict(metadata))
    if optimizer is not None:
        _check_optimizer_format(ckpt_dir, path, metadata, cfg)
        _materialize_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"] if "model" in state else state,
                                                          is_loading=True, metadata=dict(metadata))
    loaded, _, absent = dist_checkpointing.load(state, str(path), strict=StrictHandling.RETURN_ALL)
    wrong = sorted(k for k in absent if not k.endswith(EXTRA_STATE))
    if wrong:
        raise UserError(f"{path}: the checkpoint lacks {len(wrong)} entries this model has, e.g. {wrong[:3]} "
                        "(a different model shape or type?)")
    with torch.no_grad():  # the distributed optimizer's fp32 main params can be views of the weights
        _load_loaded(path, model_chunks, optimizer, loaded)
    common = dist_checkpointing.load_common_state_dict(str(path))
    if scheduler is not None:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    return int(common.get("step", step)), common.get("extra", {}) or {}


def _load_loaded(path: Path, model_chunks: list[torch.nn.Module], optimizer, loaded: dict) -> None:
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        # Float16Module.load_state_dict returns nothing: load into the module it wraps
        target = chunk.module if isinstance(chunk, Float16Module) else chunk
        result = target.load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
        if missing or result.unexpected_keys:
            raise UserError(f"{path}: weights do not match the model (missing {missing[:3]}, "
                            f"unexpected {list(result.unexpected_keys)[:3]})")
    if optimizer is not None:
        with _fully_reshardable_without_step(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_torch_adam_steps(optimizer)


def _materialize_torch_adam_state(optimizer) -> None:
    """Give a not-yet-stepped torch Adam the state its first step would create (zero moments,
    step 0), so that the state can be loaded into.

    Megatron-Core's DistributedOptimizer.state_dict reads every parameter's Adam `step` when
    neither Apex nor Transformer Engine provides the fused Adam (CPU, or a GPU without TE); a fresh
    torch Adam has none yet. TE's and Apex's fused Adam are left alone."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _restore_torch_adam_steps(optimizer) -> None:
    """After DistributedOptimizer.load_state_dict without Apex/TE: every parameter of a torch Adam
    has been given one shared `step` tensor (which torch's multi-tensor Adam would increment once
    per parameter), and the dp_reshardable parameter state then copies the step of the loading
    template over it. The step saved in the param groups is the true one: each parameter gets its
    own copy of it, as in a run that never stopped."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                if "step" in inner.state[p]:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


@contextlib.contextmanager
def _fully_reshardable_without_step(optimizer):
    """fully_reshardable state has no per-parameter Adam `step`, which a torch Adam's state has
    (no Apex/TE): DistributedOptimizer's setter would fail on the missing key. It gets a
    placeholder here; `_restore_torch_adam_steps` then puts the saved step in."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if type(getattr(opt, "optimizer", None)) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def with_step(model_param, tensors, setter=setter):
            return setter(model_param, {"step": torch.tensor(0.0), **tensors})

        opt._set_main_param_and_optimizer_states = with_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _check_optimizer_format(ckpt_dir: Path, path: Path, metadata: dict, cfg: RunConfig | None) -> None:
    """dp_reshardable distributed-optimizer state loads at any DP size but only at the TP/PP it
    was saved with (Megatron-LM's load_checkpoint raises the same)."""
    sharding = metadata.get("distrib_optim_sharding_type")
    if cfg is None or not cfg.train.distributed_optimizer or sharding is None or sharding in _FULLY_RESHARDABLE:
        return
    if not (Path(ckpt_dir) / RUN_CONFIG).is_file():
        return
    saved = read_run_config(ckpt_dir).parallel
    if (saved.tp, saved.pp, saved.vp) != (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vp):
        raise UserError(
            f"{path}: its distributed-optimizer state is {sharding} (saved at tp {saved.tp}, pp {saved.pp}, "
            f"vp {saved.vp}) and cannot be loaded at tp {cfg.parallel.tp}, pp {cfg.parallel.pp}, vp "
            f"{cfg.parallel.vp}; resume at the saved TP/PP, or save with checkpoint.optim_fully_reshardable=true, "
            "or start from its weights only (checkpoint.load with a new checkpoint.dir)"
        )


_atomic_write = atomic_write_text

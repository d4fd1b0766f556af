"""Megatron-Core distributed checkpoints, loadable at a TP/PP different from the one saved.

Layout of a checkpoint directory (Megatron-LM's convention, plus the run config):
    CKPT/latest_checkpointed_iteration.txt   the newest complete step
    CKPT/iter_0000100/                        a `dist_checkpointing` checkpoint
    CKPT/run_config.yaml                      the RunConfig that made it (model shape, parallelism)
A step directory is written under a temporary name and renamed, and the "latest" file is replaced
atomically after that, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing

from megatron_bolt.atomic import atomic_write_text
from megatron_bolt.config import RunConfig, _build
from megatron_bolt.errors import UserError

LATEST = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.yaml"
# Distributed-optimizer state in the canonical per-parameter layout, so it reshards on load.
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"iter_{step:07d}"


def latest_step(ckpt_dir: str | Path) -> int | None:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise UserError(f"{path}: expected a step number, found {text!r}")
    return int(text)


def read_run_config(ckpt_dir: str | Path) -> RunConfig:
    path = Path(ckpt_dir) / RUN_CONFIG
    if not path.is_file():
        raise UserError(f"{ckpt_dir}: not a megatron-bolt checkpoint (no {RUN_CONFIG})")
    return _build(RunConfig, yaml.safe_load(path.read_text()) or {}, "")


def _model_state(model_chunks: list[torch.nn.Module]) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


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
    """Save model (+ optimizer, scheduler, RNG-free training state) at `step`, collectively."""
    ckpt_dir = Path(ckpt_dir)
    final = step_dir(ckpt_dir, step)
    tmp = ckpt_dir / f".tmp_iter_{step:07d}"
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if cfg is not None:
            _atomic_write(ckpt_dir / RUN_CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _barrier()
    state = _model_state(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"] if "model" in state else state, metadata=_OPT_METADATA)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["step"] = step
    state["extra"] = extra or {}
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(ckpt_dir / LATEST, f"{step}\n")
    _barrier()
    return final


def load_checkpoint(
    ckpt_dir: str | Path,
    model_chunks: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    step: int | None = None,
) -> tuple[int, dict]:
    """Load into already-built model chunks (any TP/PP); returns (step, extra).

    Without an optimizer only the weights are read (fine-tuning / scoring / conversion).
    """
    ckpt_dir = Path(ckpt_dir)
    if step is None:
        step = latest_step(ckpt_dir)
    if step is None:
        raise UserError(f"{ckpt_dir}: no {LATEST}; not a checkpoint directory, or no save finished")
    path = step_dir(ckpt_dir, step)
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint step directory is missing")
    state = _model_state(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"] if "model" in state else state, is_loading=True, metadata=_OPT_METADATA)
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        chunk.load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        common = dist_checkpointing.load_common_state_dict(str(path))
        scheduler.load_state_dict(common["opt_param_scheduler"])
    common = dist_checkpointing.load_common_state_dict(str(path))
    return int(common.get("step", step)), common.get("extra", {}) or {}


_atomic_write = atomic_write_text

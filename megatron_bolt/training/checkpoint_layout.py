"""The files of a checkpoint directory that say what it holds, readable without Megatron-Core.

    CKPT/latest_checkpointed_iteration.txt   the newest complete step (Megatron-LM's name)
    CKPT/iter_0000100/                        a `dist_checkpointing` checkpoint (checkpoint.py)
    CKPT/run_config.yaml                      the RunConfig that made it

Kept apart from checkpoint.py so that a process which only asks "how far did this training get"
(the EM driver) does not import megatron.core.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from megatron_bolt.config import RunConfig, _build, upgrade_saved_tree
from megatron_bolt.errors import UserError

LATEST = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.yaml"


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"iter_{step:07d}"


def latest_step(ckpt_dir: str | Path) -> int | None:
    """The newest complete step saved in `ckpt_dir`, or None when nothing is saved there yet."""
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
    return _build(RunConfig, upgrade_saved_tree(yaml.safe_load(path.read_text()) or {}), "")

"""Model builders, selected by `model.type`."""

from __future__ import annotations

import torch

from megatron_bolt.config import RunConfig


def build_model_chunk(
    cfg: RunConfig, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None
) -> torch.nn.Module:
    """One pipeline stage (one virtual stage `vp_stage` with parallel.vp) of the configured model type."""
    if cfg.model.type == "ponder":
        from megatron_bolt.models.ponder import build_ponder

        return build_ponder(cfg.model, cfg.parallel, cfg.ponder, pre_process, post_process, bf16=cfg.train.bf16)
    from megatron_bolt.models.gpt import build_gpt

    return build_gpt(cfg.model, cfg.parallel, pre_process, post_process, bf16=cfg.train.bf16, vp_stage=vp_stage)

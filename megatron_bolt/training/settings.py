"""Everything megatron-bolt passes to Megatron-Core, computed from the RunConfig alone.

No function here takes or looks up whether CUDA is present. The CPU compatibility layer
(megatron_bolt.compat.cpu) changes devices and nothing else, so the process groups, optimizer
flags, checkpoint formats and dtypes a CPU test run uses are those of a GPU run
(tests/test_gpu_path.py spies on the calls to check it).

Followed from Megatron-LM (megatron/training): `initialize.py:_initialize_distributed` and
`training.py:setup_model_and_optimizer` pass one `use_gloo_process_groups` to both
`initialize_model_parallel(create_gloo_process_groups=...)` and `get_megatron_optimizer`;
`checkpointing.py:_build_sharded_state_dict_metadata` picks the distributed-optimizer format
(`dp_reshardable`, or `fully_reshardable` with --dist-ckpt-optim-fully-reshardable).
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from megatron_bolt.config import RunConfig


def parallel_state_kwargs(cfg: RunConfig) -> dict:
    """Keyword arguments of `parallel_state.initialize_model_parallel`."""
    return {
        "tensor_model_parallel_size": cfg.parallel.tp,
        "pipeline_model_parallel_size": cfg.parallel.pp,
        "context_parallel_size": cfg.parallel.cp,
        "virtual_pipeline_model_parallel_size": cfg.parallel.vp,
        "create_gloo_process_groups": cfg.parallel.gloo_process_groups,
    }


def params_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.bf16 else torch.float32


def ddp_config(cfg: RunConfig) -> DistributedDataParallelConfig:
    par = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=cfg.train.distributed_optimizer,
    )


def optimizer_config(cfg: RunConfig) -> OptimizerConfig:
    t = cfg.train
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        params_dtype=params_dtype(cfg),
        use_distributed_optimizer=t.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )


def optimizer_kwargs(cfg: RunConfig) -> dict:
    """Keyword arguments of `get_megatron_optimizer` besides the config and the model chunks."""
    return {"use_gloo_process_groups": cfg.parallel.gloo_process_groups}


def sharded_state_dict_metadata(cfg: RunConfig) -> dict:
    """The content metadata a checkpoint is saved with (and that its optimizer state follows)."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if cfg.train.distributed_optimizer:
        fully = cfg.checkpoint.optim_fully_reshardable
        metadata["distrib_optim_sharding_type"] = "fully_reshardable" if fully else "dp_reshardable"
    return metadata


def megatron_settings(cfg: RunConfig) -> dict:
    """All of the above in one place, for tests and for the run log."""
    return {
        "initialize_model_parallel": parallel_state_kwargs(cfg),
        "ddp_config": ddp_config(cfg),
        "optimizer_config": optimizer_config(cfg),
        "get_megatron_optimizer": optimizer_kwargs(cfg),
        "checkpoint_metadata": sharded_state_dict_metadata(cfg),
        "params_dtype": params_dtype(cfg),
    }

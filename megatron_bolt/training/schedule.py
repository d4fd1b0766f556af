"""The learning-rate schedule: megatron-core's OptimizerParamScheduler driven by Megatron-LM's flags.

    warmup (linear from 0 to train.lr over train.warmup steps), then train.lr_decay_style down to
    train.min_lr at train.lr_decay_iters (default train.steps), then min_lr:
      cosine    min + (max - min) * (1 + cos(pi * r)) / 2,  r = (step - warmup) / (decay - warmup)
      linear    min + (max - min) * (1 - r)
      WSD       max until decay - lr_wsd_decay_iters, then lr_wsd_decay_style over the last
                lr_wsd_decay_iters steps (exponential: 2 * 0.5**r - 1, linear, cosine, minus_sqrt)
      constant  max after warmup
      inverse-square-root  max * sqrt(warmup / step), floored at min

Megatron-LM's `get_optimizer_param_scheduler` (megatron/training/training.py) builds the same
object from --lr-decay-style, --lr-decay-iters, --lr-wsd-decay-style, --lr-wsd-decay-iters, --min-lr.
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_bolt.config import TrainConfig


def lr_decay_steps(t: TrainConfig) -> int:
    """Where the decay ends; megatron-core needs it past the warmup."""
    return max(t.lr_decay_iters if t.lr_decay_iters is not None else t.steps, t.warmup + 1)


def build_scheduler(optimizer, t: TrainConfig, override: bool = False) -> OptimizerParamScheduler:
    """`override=True` is Megatron's --override-opt_param-scheduler: on resume, this config's schedule
    replaces the checkpoint's instead of having to match it."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup,
        lr_decay_steps=lr_decay_steps(t),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not override,
        override_opt_param_scheduler=override,
        wsd_decay_steps=t.lr_wsd_decay_iters,
        lr_wsd_decay_style=t.lr_wsd_decay_style,
    )

"""Pipeline parallelism for the ponder model: every Jacobi pass is a traversal of the pipeline.

Megatron-Core's schedules run one forward per micro-batch per stage, but a ponder forward is K + J + 1
passes through the whole model (K warm-up passes, J Jacobi passes, final pass), and the last stage's
post-final-norm output of one pass is the first stage's latent input of the next. So each stage
runs its layers once per pass, receiving its input from the previous stage (the first stage: the
last stage's previous output, turned into latents) and sending its output on, point to point over
the pipeline group.

Gradients flow through all passes with one `backward()` per rank and micro-batch: sends and receives
are autograd Functions whose backward receives / sends the matching gradient. They are chained by
a scalar "link" tensor (every op takes the previous op's link and returns a new one), so a rank's
backward runs its communication in exactly the reverse of its forward order; forward and backward
are strictly sequential across stages, so matching ops are always issued in the same order on both
sides and nothing can deadlock. The last stage runs backward from the loss, the others from the
link of their last send.

`forward_backward` is the schedule (Megatron's calling convention, used by the training loop at
PP > 1 for this model type): micro-batch after micro-batch, Megatron's own `forward_step` /
`backward_step` (loss averaging, loss scaling) and `finalize_model_grads` (DP reduction, tied
embeddings over PP). There is no overlap across micro-batches: at any moment one stage computes
and the others wait, so PP here buys memory (layers split over devices), not speed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import schedules
from megatron.core.utils import get_model_config, get_model_type


class _Send(torch.autograd.Function):
    """Forward: send x to `peer`. Backward: receive d loss / d x from `peer`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, link: torch.Tensor, peer: int, group) -> torch.Tensor:
        ctx.peer, ctx.group, ctx.shape, ctx.dtype = peer, group, x.shape, x.dtype
        dist.send(x.detach().contiguous(), peer, group=group)
        return link.clone()

    @staticmethod
    def backward(ctx, grad_link: torch.Tensor):
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad_link.device)
        dist.recv(grad, ctx.peer, group=ctx.group)
        return grad, grad_link, None, None


class _Recv(torch.autograd.Function):
    """Forward: receive a tensor of `shape` from `peer`. Backward: send its gradient back to `peer`."""

    @staticmethod
    def forward(ctx, link: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, peer: int, group):
        ctx.peer, ctx.group = peer, group
        x = torch.empty(shape, dtype=dtype, device=link.device)
        dist.recv(x, peer, group=group)
        return x, link.clone()

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor, grad_link: torch.Tensor):
        dist.send(grad_x.contiguous(), ctx.peer, group=ctx.group)
        return grad_link, None, None, None, None


class _P2PChain:
    """This rank's chain of differentiable point-to-point ops over the pipeline group."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.dtype = dtype
        # a leaf that needs grad, so received tensors are part of the autograd graph
        self.link = torch.zeros((), device=device, requires_grad=torch.is_grad_enabled())

    def send(self, x: torch.Tensor, peer: int) -> None:
        self.link = _Send.apply(x, self.link, peer, self.group)

    def recv(self, shape: tuple[int, ...], peer: int) -> torch.Tensor:
        x, self.link = _Recv.apply(self.link, shape, self.dtype, peer, self.group)
        return x


def pipelined_jacobi_hidden(
    model, emb: torch.Tensor | None, positions: torch.Tensor, batch: int, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This stage's part of `PonderGPTModel.jacobi_hidden`: (output of its layers in the final pass, link).

    `emb` (scaled token embeddings) is given on the first stage only. On the last stage the output
    is the final pass's post-final-norm hidden states [(K+1)T, b, h]; on the others the link tensor
    is what their backward starts from.
    """
    T, h = positions.numel(), model.config.hidden_size
    first, last = model.pre_process, model.post_process
    first_rank = parallel_state.get_pipeline_model_parallel_first_rank()
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    chain = _P2PChain(positions.device, model.config.pipeline_dtype)
    per_token = model.pass_slots(iters)
    slots = [T * s for s in per_token]  # sequence length of each pass
    out = None
    for p, length in enumerate(slots):
        if first and p == 0:
            x = emb
        elif first:
            previous = chain.recv((slots[p - 1], batch, h), last_rank)
            x = model.interleave(emb, model.next_latents(previous, T))
        else:
            x = chain.recv((length, batch, h), parallel_state.get_pipeline_model_parallel_prev_rank())
        model.decoder.set_input_tensor(x)  # what a non-first stage's decoder reads instead of hidden_states
        out = model.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=model.slot_rotary(positions, per_token[p]))
        if not last:
            chain.send(out, parallel_state.get_pipeline_model_parallel_next_rank())
        elif p < len(slots) - 1:
            chain.send(out, first_rank)  # the next pass's latents
    return out, chain.link


def forward_backward(
    *,
    forward_step_func,
    data_iterator,
    model,
    num_microbatches: int,
    forward_only: bool = False,
    **_unused,
) -> list:
    """Megatron's `forward_backward_func` interface for the ponder model at PP > 1 (see module doc).

    Returns the loss function's reduced dicts on the last stage, [] elsewhere.
    """
    if isinstance(model, list):
        (model,) = model
    if isinstance(data_iterator, list):
        (data_iterator,) = data_iterator
    config = get_model_config(model)
    model_type = get_model_type(model)
    last = parallel_state.is_pipeline_last_stage()
    no_sync = config.no_sync_func or contextlib.nullcontext
    losses: list = []
    for i in range(num_microbatches):
        # gradients are reduced over DP after the last micro-batch only, as Megatron's schedules do
        with no_sync() if i < num_microbatches - 1 else contextlib.nullcontext():
            output, _ = schedules.forward_step(
                forward_step_func, data_iterator, model, num_microbatches, None, losses, config, 1,
                is_first_microbatch=i == 0, current_microbatch=i, is_last_stage=last,
            )
            if not forward_only:
                # the last stage starts from the loss (scaled by grad_scale_func), the others from
                # their link, whose gradient is zero: theirs arrive through the receives
                grad = None if last else torch.zeros_like(output)
                schedules.backward_step(None, output, grad, model_type, config)
    if config.finalize_model_grads_func is not None and not forward_only:
        config.finalize_model_grads_func([model], None)
    return losses

"""Context parallelism (parallel.cp): each rank of a CP group holds 2 of the 2*cp sequence chunks.

The batch is cut with megatron-core's `get_batch_on_this_cp_rank` (chunks i and 2*cp-1-i, so the
causal attention work is balanced); Transformer Engine's attention exchanges K/V within the group.
The loss follows Megatron-LM's pretrain_gpt loss: token sums are added up over the CP group, and
the local part of the loss is scaled by cp because DDP averages gradients over data x context ranks.
With cp == 1 both functions are the plain masked mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank


def cp_slice(batch: dict) -> dict:
    """This CP rank's part of a micro-batch (the batch itself when cp == 1)."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    return get_batch_on_this_cp_rank(dict(batch))


def masked_mean_loss(output_tensor: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, detached mean loss of the whole sequence for logging)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    local_sum = torch.sum(losses * mask)
    count = mask.sum()
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        loss = local_sum / count.clamp(min=1)
        return loss, loss.detach()
    totals = torch.stack([local_sum.detach(), count])
    dist.all_reduce(totals, group=parallel_state.get_context_parallel_group())
    denom = totals[1].clamp(min=1)
    return local_sum / denom * cp, totals[0] / denom

"""Collectives that carry autograd.

Owns the differentiable all-gather (:func:`all_gather_with_grad`) used by Partial FC and the
sharded center loss, its no-grad twin for labels, and the shape check of a local batch before
it is gathered (:func:`check_local_batch`), and the promise of equal local batch sizes
(:func:`equal_local_batches`) under which the gathers exchange no sizes. Does not own any
loss, nor the backbone's gradient sync (the trainer's DDP comm hook does).

Gradient convention (pinned by tests): the backward of :func:`all_gather_with_grad` *sums* the
gradients that every rank computed for a given slice (a reduce-scatter). A caller whose rank
back-propagates only its own part of a global-batch loss (Partial FC: the columns of its class
shard; the center loss: the samples of its classes) therefore gets, on each rank, exactly the
gradient of the global loss with respect to its local rows. A loss computed in full on every
rank would be counted ``world_size`` times; the metric losses gather with
:func:`dist_train.metric_loss.gather_with_local_grad` instead. The trainer's DDP comm hook sums
backbone gradients over ranks (it does not average), so they equal the gradient a single process
would compute on the whole global batch (see :mod:`dist_train.model_setup`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

_EQUAL_SIZES = False
"""Set by :func:`equal_local_batches`: every rank's gathered tensors have the same length."""


@contextlib.contextmanager
def equal_local_batches(enabled: bool = True) -> Iterator[None]:
    """Inside, the all-gathers of this module assume every rank passes the same number of rows.

    The training loop enters it (its batches are ``drop_last``): the gathers then exchange no
    sizes (the ragged path costs an all-gather of the sizes and one host read per rank) and
    the backward of :func:`all_gather_with_grad` is a reduce-scatter. A rank with another
    length inside it makes the collective fail. Outside (evaluation, tests with ragged
    batches) sizes may differ between ranks.
    """
    global _EQUAL_SIZES
    before, _EQUAL_SIZES = _EQUAL_SIZES, bool(enabled)
    try:
        yield
    finally:
        _EQUAL_SIZES = before


def local_batch_sizes(tensor: torch.Tensor) -> list[int]:
    """Every rank's length of ``tensor`` along dim 0 (exchanged, except inside
    :func:`equal_local_batches`); ``[len]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [tensor.shape[0]]
    world = dist.get_world_size()
    if _EQUAL_SIZES:
        return [tensor.shape[0]] * world
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    return [int(s.item()) for s in sizes]  # CPU-GPU sync point: ragged batches only


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.sizes = local_batch_sizes(tensor)
        ctx.equal = len(set(ctx.sizes)) == 1
        tensor = tensor.contiguous()
        if ctx.equal:
            out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
            dist.all_gather_into_tensor(out, tensor)
            return out
        max_n = max(ctx.sizes)
        padded = tensor.new_zeros((max_n, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, ctx.sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if ctx.equal:
            # Sum over ranks of each rank's gradient, our own slice only.
            out = grad.new_empty((ctx.sizes[ctx.rank], *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        # Ragged sizes: an all-reduce followed by our slice equals a reduce-scatter.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's ``tensor`` along dim 0, differentiable.

    Args:
        tensor: ``[N_local, ...]``; N_local may differ between ranks, except inside
            :func:`equal_local_batches`.

    Returns:
        ``[sum of N_local, ...]`` in rank order. Identity at world size 1.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _AllGather.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_with_grad` for tensors that need no gradient (labels)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    with torch.no_grad():
        return _AllGather.apply(tensor.detach())


def check_local_batch(
    local_embeddings: torch.Tensor, local_labels: torch.Tensor, embedding_size: int, who: str
) -> None:
    """Raises ``ValueError`` naming ``who`` unless the batch is ``[B, D]`` with ``[B]`` labels.

    Checked before any collective, so a bad batch stops this rank with its own message.
    """
    if local_embeddings.dim() != 2 or local_embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"{who}: local_embeddings must be [B, {embedding_size}], got "
            f"{tuple(local_embeddings.shape)}"
        )
    if local_labels.shape != local_embeddings.shape[:1]:
        raise ValueError(
            f"{who}: local_labels must be [{local_embeddings.shape[0]}], got "
            f"{tuple(local_labels.shape)}"
        )

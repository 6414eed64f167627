"""Cross-rank wrapper of the metric heads: one loss over the global batch.

Owns gathering each rank's embeddings and labels so that a metric head of :mod:`heads.metric`
(kind ``"metric"`` or ``"combined"``) sees the whole global batch, with negatives from every
rank. Does not own the loss maths (the head does) or the backbone's gradient sync (the
trainer's DDP hook does).

Gradient convention (the project's, pinned by ``tests/test_metric_dist.py``):

- The returned loss is the head's loss on the global batch, identical on every rank.
- The gradient reaching this rank's ``local_embeddings`` is exactly the single-process gradient
  of that loss with respect to those rows. The trainer's DDP comm hook *sums* backbone
  gradients over ranks, so the backbone gradient equals the single-process gradient too.
- The head's own parameters (``angleproto``'s ``w, b``; ``margin``'s ``β``) get, on every
  rank, the full gradient of the global loss: the same on every rank, so they must not be
  summed or averaged across ranks (keep them out of DDP).

How: every rank computes the whole global loss, so the gradient of that loss with respect to
a rank's own rows can be taken on that rank alone. The gathered batch is therefore built from
detached copies of the other ranks' rows with this rank's rows spliced in *with* autograd.
Compared with :func:`dist_train.collectives.all_gather_with_grad` (whose backward sums every
rank's gradient and would count the replicated loss ``world_size`` times) this needs no
collective in the backward pass and no rescaling.

Heads that draw random numbers (``margin``) must draw the same ones on every rank: they own a
generator seeded identically on every rank, and the gathered batch is bitwise the same
everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_train.collectives import all_gather_no_grad, local_batch_sizes
from dist_train.distributed import get_rank, get_world_size


def gather_with_local_grad(
    local_embeddings: torch.Tensor, local_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch, differentiable only through this rank's rows.

    Args:
        local_embeddings: ``[B_local, D]`` float (B_local may differ between ranks).
        local_labels: ``[B_local]`` int64.

    Returns:
        ``(global_embeddings [B_global, D], global_labels [B_global])`` in rank order.
        ``global_embeddings[start:start + B_local]`` is ``local_embeddings`` itself (with its
        autograd history); the other rows carry no gradient. Identity at world size 1.
    """
    if get_world_size() == 1:
        return local_embeddings, local_labels
    n_local = local_embeddings.shape[0]
    # offset of our slice: a host read of the exchanged sizes, except for equal local batches
    start = sum(local_batch_sizes(local_embeddings)[: get_rank()])
    global_labels = all_gather_no_grad(local_labels)
    others = all_gather_no_grad(local_embeddings.detach())
    global_embeddings = torch.cat(
        [others[:start], local_embeddings, others[start + n_local :]], dim=0
    )
    return global_embeddings, global_labels


class MetricLoss(nn.Module):
    """A metric head applied to the global batch gathered from every rank.

    Args:
        head: a head of kind ``"metric"`` or ``"combined"`` (called as
            ``head(embeddings [B_global, D], labels [B_global]) -> scalar``).
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        if getattr(head, "kind", None) not in ("metric", "combined"):
            raise ValueError(
                f"MetricLoss needs a head of kind 'metric' or 'combined', got "
                f"{type(head).__name__} of kind {getattr(head, 'kind', None)!r}"
            )
        self.head = head

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Global-batch loss, identical on every rank.

        Args:
            local_embeddings: ``[B_local, D]`` float, this rank's backbone output.
            local_labels: ``[B_local]`` int64.

        Returns:
            Scalar loss of the head on the global batch.
        """
        if local_embeddings.dim() != 2 or local_labels.shape != local_embeddings.shape[:1]:
            raise ValueError(
                f"MetricLoss: expected local_embeddings [B, D] and local_labels [B], got "
                f"{tuple(local_embeddings.shape)} and {tuple(local_labels.shape)}"
            )
        global_embeddings, global_labels = gather_with_local_grad(local_embeddings, local_labels)
        return self.head(global_embeddings, global_labels)

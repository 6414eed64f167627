"""Autograd kernels of Partial FC: cosine logits and the cross-entropy across class shards.

Owns :class:`CosineLinear` (cosines of embeddings with sampled class rows, with a backward that
keeps only the rows' inverse norms) and :class:`ShardedCrossEntropy` (the mean softmax
cross-entropy whose columns are split across ranks, with a margin head fused into it). Both run
in the dtype of their inputs; :class:`dist_train.partial_fc.PartialFC` calls them in fp32 with
autocast off. Does not own the sampling, the weights or their optimizer
(:mod:`dist_train.partial_fc.module`, :mod:`dist_train.partial_fc.optimizer`), nor the margin
maths (``heads.margins``).

Gradient convention: the backward gives this shard's columns exactly their part of
∂loss/∂logits for the *global* mean loss (the same value on every rank); the all-gather's
backward then sums the parts over ranks (see :mod:`dist_train.collectives`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dist_train.distributed import all_reduce


class CosineLinear(torch.autograd.Function):
    """cos[i, j] = x̂_i · w_j / ‖w_j‖ with a hand-written backward.

    Autograd through ``F.normalize(w)`` would keep a normalised copy of the sampled rows and
    build two more [S, D] temporaries in backward; this keeps only the [S] inverse norms.
    """

    @staticmethod
    def forward(ctx, x_hat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        inv_norm = w.norm(dim=1).clamp_min(1e-12).reciprocal()
        cos = (x_hat @ w.t()).mul_(inv_norm)
        ctx.save_for_backward(x_hat, w, inv_norm, cos)
        return cos

    @staticmethod
    def backward(ctx, grad_cos: torch.Tensor):  # type: ignore[override]
        x_hat, w, inv_norm, cos = ctx.saved_tensors
        # ∂L/∂(x̂·w_j) = ∂L/∂cos_ij / ‖w_j‖. In place when the incoming gradient is a plain
        # buffer (the cross-entropy's, which nothing else reads): saves an [N, S] tensor.
        if grad_cos.is_contiguous() and grad_cos._base is None:
            g = grad_cos.mul_(inv_norm)
        else:
            g = grad_cos * inv_norm
        grad_x = g @ w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # ∂cos_ij/∂w_j = (x̂_i − cos_ij ŵ_j)/‖w_j‖, summed over i with weights ∂L/∂cos_ij.
            grad_w = g.t() @ x_hat
            coef = g.mul_(cos).sum(dim=0).mul_(inv_norm)
            grad_w.addcmul_(w, coef.unsqueeze(1), value=-1.0)
        return grad_x, grad_w


class ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over logits whose columns are split across ranks.

    With ``head`` (a :class:`heads.margins.MarginHead`) the input is the cosine matrix and the
    margin is applied inside this function (fused): the logits are built in one buffer that
    then becomes the softmax and, in backward, the gradient, so the margin costs no extra
    [N, S] tensors. The target logit's derivative comes from autograd on the [P] target
    cosines only, so any ``target_logit`` a head defines gets its true gradient. With
    ``head=None`` the input already is the logits (heads of any other kind).

    Forward: all-reduce of the row max, of the sum of exponentials and of the target's
    shifted logit; loss_i = log Σ exp(z − max) − (z_target − max), in log space (no clamp on
    a probability). Backward: (softmax − one-hot)/N on this shard's columns only.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, target: torch.Tensor, head: Any) -> torch.Tensor:  # type: ignore[override]
        n, s = z.shape
        # Every row takes part with a fixed shape (no data-dependent row selection, hence no
        # host read): rows whose class is on another shard point at column 0 and are masked.
        valid = target >= 0
        col = target.clamp_min(0).unsqueeze(1)
        ctx.head = head
        if s == 0:  # no class on this shard: only the all-reduces take part
            logits = z.clone()
            row_max = logits.new_full((n,), -math.inf)
            all_reduce(row_max, "max")
            target_shifted = logits.new_zeros(n)
            all_reduce(target_shifted, "sum")
            sum_exp = logits.new_zeros(n)
            all_reduce(sum_exp, "sum")
            ctx.save_for_backward(logits, valid, col)
            ctx.graph = None
            ctx.consumed = False
            return (sum_exp.log() - target_shifted).mean()
        if head is not None:
            with torch.enable_grad():
                # A neutral cosine on masked rows keeps their (discarded) derivative finite.
                cos_t = torch.where(valid, _take(z, col), 0.0).detach().requires_grad_(True)
                value_t = head.target_logit(cos_t) * head.s
            logits = z * head.s
            if head.interclass_threshold > 0:
                logits.masked_fill_(_filtered(z, valid, col, head.interclass_threshold), 0.0)
            _put(logits, col, valid, value_t.detach())
            ctx.graph = (cos_t, value_t)
        else:
            logits = z.clone()
            ctx.graph = None
        row_max = logits.amax(dim=1)
        all_reduce(row_max, "max")
        target_shifted = torch.where(valid, _take(logits, col) - row_max, 0.0)
        all_reduce(target_shifted, "sum")
        probs = logits.sub_(row_max.unsqueeze(1)).exp_()  # in place: logits become exp(z − max)
        sum_exp = probs.sum(dim=1)
        all_reduce(sum_exp, "sum")
        loss = (sum_exp.log() - target_shifted).mean()
        probs.div_(sum_exp.unsqueeze(1))
        to_save = (probs, valid, col) + ((z,) if head is not None else ())
        ctx.save_for_backward(*to_save)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("PartialFC's cross-entropy cannot be back-propagated twice")
        ctx.consumed = True
        probs, valid, col, *rest = ctx.saved_tensors
        # The softmax turns into ∂loss/∂logits in place: one [N, S] buffer for the whole chain.
        grad = probs
        if grad.shape[1] == 0:
            return grad, None, None
        grad.scatter_add_(1, col, valid.to(grad.dtype).neg_().unsqueeze(1))
        grad.mul_(grad_loss / probs.shape[0])
        head = ctx.head
        if head is None:
            return grad, None, None
        cos_t, value_t = ctx.graph
        # A scalar output (no explicit grad_outputs): autograd's shape check for explicit
        # gradients imports sympy on first use, seconds per process.
        with torch.enable_grad():
            weighted = (value_t * torch.where(valid, _take(grad, col), 0.0)).sum()
        (grad_cos_t,) = torch.autograd.grad(weighted, cos_t)
        grad.mul_(head.s)
        if head.interclass_threshold > 0:
            grad.masked_fill_(_filtered(rest[0], valid, col, head.interclass_threshold), 0.0)
        _put(grad, col, valid, grad_cos_t)
        ctx.graph = None
        return grad, None, None


def _take(t: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``t[i, col[i]]`` for every row i."""
    return t.gather(1, col).squeeze(1)


def _put(t: torch.Tensor, col: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> None:
    """``t[i, col[i]] = values[i]`` on the rows where ``valid``; other rows keep their entry."""
    t.scatter_(1, col, torch.where(valid, values, _take(t, col)).unsqueeze(1))


def _filtered(cos: torch.Tensor, valid: torch.Tensor, col: torch.Tensor, threshold: float):
    """Mask of non-target cosines above the inter-class filtering threshold."""
    dirty = cos > threshold
    _put(dirty, col, valid, torch.zeros_like(valid))
    return dirty

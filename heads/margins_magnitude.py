"""Margin heads of the 2020-2021 generation that need more than one shard's cosines.

Owns the maths of MagFace (a margin that depends on the embedding norm, plus a norm
regulariser) and Sub-center ArcFace (K centres per class, the cosine to a class being the
largest over its sub-centres). Both are ``kind == "margin"`` heads called by
:class:`dist_train.partial_fc.PartialFC` on one shard's sampled columns; see
:mod:`heads.margins` for the interface. Two additions to it live here:

- ``norms``: a head whose ``forward`` (and ``extra_loss_sum``) accepts the keyword ``norms``
  receives ``norms [B]``, the L2 norms of the (global batch's) *un-normalised* embeddings, with
  their autograd graph: the margin's gradient flows into the norm. :func:`takes_norms` tells.
  Its fusion hook ``target_logit(cos_t, norms)`` takes them too.
- ``sub_centers``: a head with ``sub_centers = K > 1`` makes Partial FC keep K rows per class
  (contiguous, class-major: row ``c·K + k`` is sub-centre k of class c) and reduce the cosines
  with :meth:`SubCenterArcFace.reduce_sub_centers` before the margin.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from heads import register
from heads.margins import _COS_EPS, ArcFace, monotone_cos


def takes_norms(head: nn.Module) -> bool:
    """True when ``head``'s ``forward`` accepts the keyword ``norms`` (the embedding norms)."""
    return "norms" in inspect.signature(head.forward).parameters


@register("magface")  # the class is its own builder: every argument is a config key
class MagFace(nn.Module):
    """MagFace (Meng et al., CVPR 2021, "MagFace: A Universal Representation for Face
    Recognition and Quality Assessment"), its loss L_Mag per sample::

        L_i = −log softmax( s·cos(θ_y + m(a_i)), s·cos θ_j ) + λ_g · g(a_i)
        m(a) = (u_m − l_m)/(u_a − l_a) · (a − l_a) + l_m            (the linear margin)
        g(a) = 1/a + a/u_a²                                          (the regulariser)

    with a_i = ‖x_i‖ the embedding's norm clipped to [l_a, u_a] (as the authors' code does,
    for both m and g). cos(θ + m) continues monotonically beyond θ + m = π
    (:func:`heads.margins.monotone_cos`, as the project's ArcFace). The margin and g are
    differentiable in the norm (zero gradient where the clip is active).

    Defaults are the paper's (and its code's): l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35,
    s = 64.

    ``forward(cosine, labels, norms=...)`` needs ``norms [B]``; ``extra_loss_sum`` returns
    λ_g·Σ g(a_i) over the rows with a label, so that Partial FC, which sums it over shards
    (each sample's class lives on exactly one shard), adds each sample's term exactly once.
    """

    kind = "margin"
    normalized = True
    has_extra_loss = True

    def __init__(
        self,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
    ) -> None:
        super().__init__()
        if s <= 0:
            raise ValueError(f"MagFace: scale s must be > 0, got {s}")
        if not 0 < l_a < u_a:
            raise ValueError(f"MagFace: need 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        if not 0 <= l_m <= u_m:
            raise ValueError(f"MagFace: need 0 <= l_m <= u_m, got l_m={l_m}, u_m={u_m}")
        if lambda_g < 0:
            raise ValueError(f"MagFace: lambda_g must be >= 0, got {lambda_g}")
        self.s, self.l_a, self.u_a = float(s), float(l_a), float(u_a)
        self.l_m, self.u_m, self.lambda_g = float(l_m), float(u_m), float(lambda_g)

    def _norms(self, norms: torch.Tensor | None, batch: int) -> torch.Tensor:
        if norms is None or norms.shape != (batch,):
            got = None if norms is None else tuple(norms.shape)
            raise ValueError(f"MagFace needs keyword 'norms' of shape ({batch},), got {got}")
        return norms.clamp(self.l_a, self.u_a)

    def margin(self, a: torch.Tensor) -> torch.Tensor:
        """The linear margin m(a) for norms already clipped to [l_a, u_a]."""
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def regularizer(self, a: torch.Tensor) -> torch.Tensor:
        """The regulariser g(a) = 1/a + a/u_a² for norms already clipped to [l_a, u_a]."""
        return 1.0 / a + a / (self.u_a**2)

    def target_logit(self, cos_target: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """ψ(θ_y + m(a_i)), un-scaled, for the ``[N]`` target cosines and norms of every row
        (the fusion hook of :mod:`heads.margins`; differentiable in both)."""
        a = self._norms(norms, cos_target.shape[0])
        theta = torch.arccos(cos_target.clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        return monotone_cos(theta + self.margin(a))

    @property
    def nontarget_scale(self) -> float:
        """The non-target logits are s·cos."""
        return self.s

    def nontarget_logits(self, cos: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` ← s·cos (fusion hook)."""
        return torch.mul(cos, self.s, out=out)

    def nontarget_grad_(self, cos: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` ·= s (fusion hook)."""
        return grad.mul_(self.s)

    def forward(
        self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled logits, s·cos(θ_y + m(a_i)) on each labelled row's target column.

        Args:
            cosine: ``[B, C]`` cosines.
            labels: ``[B]`` target column, ``-1`` when the class is not among the columns.
            norms: ``[B]`` embedding norms (with their graph).
        """
        a = self._norms(norms, cosine.shape[0])
        logits = cosine * self.s
        rows = torch.nonzero(labels >= 0).squeeze(1)
        if rows.numel() > 0:
            cols = labels[rows]
            theta = torch.arccos(cosine[rows, cols].clamp(-1 + _COS_EPS, 1 - _COS_EPS))
            logits[rows, cols] = self.s * monotone_cos(theta + self.margin(a[rows]))
        return logits

    def extra_loss_sum(
        self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None
    ) -> torch.Tensor:
        """λ_g · Σ g(a_i) over the rows with a label; the caller divides by the batch size."""
        a = self._norms(norms, cosine.shape[0])
        return self.regularizer(a[labels >= 0]).sum() * self.lambda_g

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, "
            f"lambda_g={self.lambda_g}"
        )


class SubCenterArcFace(ArcFace):
    """Sub-center ArcFace (Deng et al., ECCV 2020, "Sub-center ArcFace: Boosting Face
    Recognition by Large-scale Noisy Web Faces"), its loss::

        cos θ_{i,j} = max_k  x̂_i · ŵ_{j,k}        (k = 1 … K sub-centres of class j)
        logit = s·cos(θ_{i,y} + m) for the target, s·cos θ_{i,j} otherwise

    Defaults are the paper's: K = 3, m = 0.5, s = 64. ``forward`` takes the cosines of every
    sub-centre, ``[B, C·K]`` class-major; inside Partial FC the shard keeps K rows per class
    and reduces with :meth:`reduce_sub_centers` before the (fused) ArcFace margin.
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, k: int = 3) -> None:
        super().__init__(s, m)
        if int(k) != k or k < 1:
            raise ValueError(f"Sub-center ArcFace: k (sub-centres per class) must be >= 1, got {k}")
        self.sub_centers = int(k)

    def reduce_sub_centers(self, cosine: torch.Tensor) -> torch.Tensor:
        """``[B, C·K]`` cosines of every sub-centre → ``[B, C]`` the largest per class."""
        if cosine.shape[1] % self.sub_centers:
            raise ValueError(
                f"Sub-center ArcFace: {cosine.shape[1]} columns is not a multiple of "
                f"k={self.sub_centers}"
            )
        if self.sub_centers == 1:
            return cosine
        return cosine.unflatten(1, (-1, self.sub_centers)).max(dim=2).values

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` from the sub-centre cosines ``[B, C·K]`` (labels index classes)."""
        return super().forward(self.reduce_sub_centers(cosine), labels)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.sub_centers}"


@register("subcenter_arcface")
def subcenter_arcface(*, s: float = 64.0, m: float = 0.5, k: int = 3) -> SubCenterArcFace:
    """Sub-center ArcFace: K centres per class, cosine = max over them, ArcFace margin m."""
    return SubCenterArcFace(s, m, k)

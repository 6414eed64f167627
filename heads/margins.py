"""Margin heads: the transforms applied to one shard's sampled cosine logits inside Partial FC.

Owns the maths of softmax-family face-recognition losses: which logit each sample's target
class gets (ArcFace, CosFace, SphereFace, their combined form, …), the scale ``s``, optional
inter-class filtering and the optional intra-class angle penalty. Does not own the
cross-entropy across shards, the sampling of classes or any communication: that is
:class:`dist_train.partial_fc.PartialFC`, which calls these heads on its shard.

Interface shared by every head here (``kind == "margin"``):

- ``forward(cosine [B, C] fp32, labels [B] int64) -> logits [B, C] fp32``. ``labels[i]`` is the
  column of sample i's class in ``cosine``, or ``-1`` when that class is not among the columns
  (it lives on another shard): such rows get no margin, only the scale.
- ``normalized``: ``True`` when ``cosine`` must be the cosine between the L2-normalised
  embedding and class centre; ``False`` (plain softmax) when it is the raw dot product W·x.
- ``s``: the scale.
- Fusion hooks (Partial FC's blockwise kernel calls these instead of ``forward``; every
  ``MarginHead`` has them, :class:`heads.margins_adaptive.CurricularFace` and
  :class:`heads.margins_magnitude.MagFace` too): ``target_logit(cos_t [N])`` the un-scaled
  target logit of each row (differentiable; MagFace also takes ``norms=``);
  ``nontarget_logits(cos, out)`` writes the logits of non-target cosines into ``out`` and
  ``nontarget_grad_(cos, grad)`` multiplies ``grad`` (∂loss/∂logit) in place by ∂logit/∂cos,
  both elementwise on a ``[K, N]`` block (K classes, the N rows of the batch along the *last*
  dimension, so per-row parameters broadcast as ``[N]``); ``nontarget_scale``: ``s`` when the
  non-target logit is exactly ``s·cos`` (the kernel then folds the scale into its own
  multiplies), else ``None``.
- ``extra_loss_sum(cosine, labels) -> scalar``: the *sum over this call's rows with a label*
  of any per-sample loss term added to the cross-entropy (the intra-class angle penalty);
  zero for most heads. The caller divides by the global batch size and, when the columns are
  sharded, sums it over shards (each sample's target lives on exactly one shard).

Target logit of the general combined margin, with θ = arccos(cos θ_y)::

    s · (ψ(m1·θ + m2) − m3),   ψ(φ) = (−1)^k · cos φ − 2k,   k = ⌊φ / π⌋

ψ equals cos φ for φ ≤ π, and beyond π it continues SphereFace's monotone extension, so the
target logit is continuous and non-increasing in θ over all of [0, π] (the plain
cos(θ + m) would rise again once θ + m > π and reward a sample for moving *away* from its
class). Unlike InsightFace's ArcFace, the margin is applied with autograd on, so the gradient
is that of the margin-penalised logit, not of plain cos θ.

θ is computed from cos θ clamped to [−1 + 1e-6, 1 − 1e-6]: arccos has an infinite slope at
±1, and the clamp keeps the gradient finite (zero for the few logits inside the clamp).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from heads import register

_COS_EPS = 1e-6
"""Clamp margin of cos θ before arccos (keeps the gradient finite at θ = 0 and θ = π)."""


def monotone_cos(phi: torch.Tensor) -> torch.Tensor:
    """ψ(φ) = (−1)^k cos φ − 2k with k = ⌊φ/π⌋: cos φ on [0, π], continued monotonically.

    Args:
        phi: angles ≥ 0, any shape, floating point.

    Returns:
        Tensor like ``phi``; continuous and non-increasing in ``phi``.
    """
    with torch.no_grad():
        k = torch.floor(phi / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(phi) - 2.0 * k


class MarginHead(nn.Module):
    """Common part of the normalised margin heads: scale, filtering, intra-class penalty.

    Subclasses override :meth:`target_logit` (the un-scaled target logit from cos θ_y), not
    ``forward``: Partial FC fuses ``MarginHead``s into its cross-entropy and calls only the
    fusion hooks (``target_logit``, ``nontarget_logits``, ``nontarget_grad_``,
    ``nontarget_scale``, ``s``; the tests check that the fused path equals ``forward``).

    Args:
        s: scale applied to every logit.
        interclass_threshold: when > 0, non-target cosines above it are set to 0 (treated as
            label noise: another identity that is really the same person); 0 disables.
        intra_alpha: α of the intra-class angle penalty α/(π·N)·Σ θ_y; 0 disables.
    """

    kind = "margin"
    normalized = True

    def __init__(
        self, s: float = 64.0, *, interclass_threshold: float = 0.0, intra_alpha: float = 0.0
    ) -> None:
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if not 0.0 <= interclass_threshold < 1.0:
            raise ValueError(f"interclass_threshold must be in [0, 1), got {interclass_threshold}")
        if intra_alpha < 0:
            raise ValueError(f"intra_alpha must be >= 0, got {intra_alpha}")
        self.s = float(s)
        self.interclass_threshold = float(interclass_threshold)
        self.intra_alpha = float(intra_alpha)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """Un-scaled logit of the target class from its cosine; identity (NormFace) here."""
        return cos_target

    @property
    def nontarget_scale(self) -> float | None:
        """``s`` when every non-target logit is ``s·cos`` (no inter-class filtering)."""
        return None if self.interclass_threshold > 0 else self.s

    def nontarget_logits(self, cos: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` ← the non-target logits of ``cos``: ``s·cos``, 0 where filtered."""
        torch.mul(cos, self.s, out=out)
        if self.interclass_threshold > 0:
            out.masked_fill_(cos > self.interclass_threshold, 0.0)
        return out

    def nontarget_grad_(self, cos: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` ·= ∂logit/∂cos of the non-target logits: ``s``, 0 where filtered."""
        grad.mul_(self.s)
        if self.interclass_threshold > 0:
            grad.masked_fill_(cos > self.interclass_threshold, 0.0)
        return grad

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin on each labelled row's target column.

        Args:
            cosine: ``[B, C]`` fp32 (or fp64) cosines.
            labels: ``[B]`` int64 column of the target class, ``-1`` when not among the columns.

        Returns:
            ``[B, C]`` logits, same dtype as ``cosine``.
        """
        if cosine.dim() != 2 or labels.shape != cosine.shape[:1]:
            raise ValueError(
                f"expected cosine [B, C] and labels [B], got {tuple(cosine.shape)} and "
                f"{tuple(labels.shape)}"
            )
        logits = cosine * self.s
        rows = torch.nonzero(labels >= 0).squeeze(1)
        cols = labels[rows]
        if self.interclass_threshold > 0:
            with torch.no_grad():
                dirty = cosine > self.interclass_threshold
                dirty[rows, cols] = False
            # In place on the product (mul's backward does not need its output): the filtered
            # logits become constant 0 and pass no gradient.
            logits.masked_fill_(dirty, 0.0)
        if rows.numel() > 0:
            logits[rows, cols] = self.s * self.target_logit(cosine[rows, cols])
        return logits

    def extra_loss_sum(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """α/π · Σ θ_y over the rows with a label (0 when ``intra_alpha`` is 0).

        Args:
            cosine: ``[B, C]`` cosines.
            labels: ``[B]`` target columns, ``-1`` for rows whose class is elsewhere.

        Returns:
            Scalar of ``cosine``'s dtype; the caller divides by the global batch size.
        """
        if self.intra_alpha == 0:
            return cosine.new_zeros(())
        rows = torch.nonzero(labels >= 0).squeeze(1)
        cos_target = cosine[rows, labels[rows]].clamp(-1 + _COS_EPS, 1 - _COS_EPS)
        return torch.arccos(cos_target).sum() * (self.intra_alpha / math.pi)

    def extra_repr(self) -> str:
        extra = f"s={self.s}"
        if self.interclass_threshold:
            extra += f", interclass_threshold={self.interclass_threshold}"
        if self.intra_alpha:
            extra += f", intra_alpha={self.intra_alpha}"
        return extra


class SoftmaxHead(nn.Module):
    """Plain softmax: logit = s · W_j·x on *un-normalised* W and x (s = 1 by default).

    ``normalized = False`` tells Partial FC to feed the raw dot products, not cosines.
    """

    kind = "margin"
    normalized = False

    def __init__(self, s: float = 1.0) -> None:
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        self.s = float(s)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cosine`` here holds raw dot products ``[B, C]``; returns ``s`` times them."""
        return cosine * self.s if self.s != 1.0 else cosine

    def extra_loss_sum(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cosine.new_zeros(())


class NormFace(MarginHead):
    """NormFace: logit_j = s · cos θ_j for every class, no margin."""


@register("combined")  # the class is its own builder: every argument is a config key
class CombinedMargin(MarginHead):
    """Combined margin: target logit s·(ψ(m1·θ_y + m2) − m3), others s·cos θ_j.

    ψ is :func:`monotone_cos` (cos on [0, π], continued monotonically): ArcFace is
    (1, m, 0), CosFace (1, 0, m), SphereFace (m, 0, 0). With m1 = 1 and m2 = 0 no arccos is
    taken, so CosFace's gradient is exact even at cos θ = ±1.

    Args:
        s: scale.
        m1: multiplicative angular margin, ≥ 1.
        m2: additive angular margin in radians, ≥ 0.
        m3: additive cosine margin.
        interclass_threshold, intra_alpha: see :class:`MarginHead`.
    """

    def __init__(
        self,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        *,
        interclass_threshold: float = 0.0,
        intra_alpha: float = 0.0,
    ) -> None:
        super().__init__(s, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha)
        if m1 < 1.0:
            raise ValueError(f"m1 must be >= 1, got {m1}")
        if m2 < 0.0:
            raise ValueError(f"m2 must be >= 0 (radians), got {m2}")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_target - self.m3
        theta = torch.arccos(cos_target.clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        return monotone_cos(self.m1 * theta + self.m2) - self.m3

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m1={self.m1}, m2={self.m2}, m3={self.m3}"


class CosFace(CombinedMargin):
    """CosFace / AM-softmax: target logit s·(cos θ_y − m)."""

    def __init__(self, s: float = 64.0, m: float = 0.4, **opts: float) -> None:
        super().__init__(s, 1.0, 0.0, m, **opts)


class ArcFace(CombinedMargin):
    """ArcFace: target logit s·ψ(θ_y + m) = s·cos(θ_y + m) while θ_y + m ≤ π (m in radians).

    For θ_y > π − m, ψ continues monotonically: −cos(θ_y + m) − 2 (see the module docstring).
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, **opts: float) -> None:
        super().__init__(s, 1.0, m, 0.0, **opts)


class SphereFace(CombinedMargin):
    """SphereFace (normalised form): target logit s·ψ(m·θ_y), ψ the monotone cosine."""

    def __init__(self, s: float = 64.0, m: float = 1.35, **opts: float) -> None:
        super().__init__(s, m, 0.0, 0.0, **opts)


class AdaCos(NormFace):
    """Fixed AdaCos: NormFace with s = √2 · ln(C − 1) for C classes (no margin)."""

    def __init__(self, num_classes: int, **opts: float) -> None:
        if num_classes < 3:
            raise ValueError(f"AdaCos needs num_classes >= 3 (s = √2·ln(C−1)), got {num_classes}")
        super().__init__(math.sqrt(2.0) * math.log(num_classes - 1), **opts)
        self.num_classes = int(num_classes)


@register("softmax")
def softmax(*, s: float = 1.0) -> SoftmaxHead:
    """Plain softmax over un-normalised logits: s · W_j·x."""
    return SoftmaxHead(s)


@register("normface")
def normface(
    *, s: float = 30.0, interclass_threshold: float = 0.0, intra_alpha: float = 0.0
) -> NormFace:
    """NormFace: s · cos θ_j."""
    return NormFace(s, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha)


@register("cosface")
def cosface(
    *, s: float = 64.0, m: float = 0.4, interclass_threshold: float = 0.0, intra_alpha: float = 0.0
) -> CosFace:
    """CosFace: s · (cos θ_y − m) for the target, s · cos θ_j otherwise."""
    return CosFace(s, m, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha)


@register("amsoftmax")
def amsoftmax(
    *, s: float = 30.0, m: float = 0.35, interclass_threshold: float = 0.0, intra_alpha: float = 0.0
) -> CosFace:
    """AM-softmax (= CosFace): s · (cos θ_y − m); the VGGFace2 recipe uses s = 30, m = 0.1."""
    return CosFace(s, m, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha)


@register("arcface")
def arcface(
    *, s: float = 64.0, m: float = 0.5, interclass_threshold: float = 0.0, intra_alpha: float = 0.0
) -> ArcFace:
    """ArcFace: s · cos(θ_y + m) (m in radians), monotone beyond θ_y + m = π."""
    return ArcFace(s, m, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha)


@register("arcface_deg")
def arcface_deg(
    *, s: float = 64.0, m: float = 30.0, interclass_threshold: float = 0.0, intra_alpha: float = 0.0
) -> ArcFace:
    """ArcFace with the additive angular margin m given in degrees: s · cos(θ_y + m·π/180)."""
    return ArcFace(
        s, math.radians(m), interclass_threshold=interclass_threshold, intra_alpha=intra_alpha
    )


@register("sphereface")
def sphereface(
    *, s: float = 64.0, m: float = 1.35, interclass_threshold: float = 0.0, intra_alpha: float = 0.0
) -> SphereFace:
    """SphereFace, multiplicative margin: s · ψ(m · θ_y)."""
    return SphereFace(s, m, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha)


@register("adacos")
def adacos(
    *, num_classes: int, interclass_threshold: float = 0.0, intra_alpha: float = 0.0
) -> AdaCos:
    """Fixed AdaCos: s · cos θ_j with s = √2 · ln(num_classes − 1)."""
    return AdaCos(num_classes, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha)

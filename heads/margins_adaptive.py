"""Adaptive margin heads: AdaFace, CurricularFace, ElasticFace-Arc and ElasticFace-Cos.

Owns the maths of the margin heads whose margin depends on the batch: on the feature norms
(AdaFace), on a running statistic of the positive cosines (CurricularFace) or on a random draw
per sample (ElasticFace), and their running state (EMA buffers, the draw counter). Does not own
how the statistics are gathered across ranks: :class:`dist_train.partial_fc.PartialFC` computes
them over the *global* batch and passes them in; nothing here communicates.

Interface beyond the one of :mod:`heads.margins` (every other head ignores it):

- ``batch_inputs``: the names of what the head needs of the global batch of N rows besides
  one shard's cosines: ``"num_rows"`` (N, an int), ``"norms"`` (``[N]`` ‖x_i‖ of the embeddings
  before normalisation, differentiable; a head that treats them as constants detaches them),
  ``"target_cosine"`` (``[N]`` cos θ_{y_i} of every row, whichever shard holds its class).
- ``prepare_batch(**inputs)``: called by the caller once per forward, before the logits,
  with exactly those inputs. In training mode it advances the running state (EMA, draw
  counter); it keeps the per-row quantities (margins, thresholds) that this batch's
  ``forward`` / ``target_logit`` use. Calling a head before preparing a batch of its size
  raises.

Row convention: ``target_logit(cos_target)`` takes the target cosine of *every* row of the
batch, in row order (``[N]``; rows whose class is elsewhere carry a neutral value that the
caller discards), as Partial FC's fused cross-entropy passes it; ``forward`` does the same.

The running state is in the module's ``state_dict`` (buffers, and ElasticFace's counter as
``extra_state``): Partial FC saves it once per state, not per class shard
(:mod:`dist_train.partial_fc.state`). It is the same on every rank, because every input is a
statistic of the global batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from heads import register
from heads.margins import _COS_EPS, MarginHead, monotone_cos

BATCH_INPUTS = ("num_rows", "norms", "target_cosine")
"""The names a head may list in ``batch_inputs``."""


def _take_target(cosine: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(valid [B], col [B, 1], target cosine [B] with 0 where the class is elsewhere)."""
    valid = labels >= 0
    col = labels.clamp_min(0).unsqueeze(1)
    cos_t = torch.where(valid, cosine.gather(1, col).squeeze(1), 0.0)
    return valid, col, cos_t


def _put_target(
    logits: torch.Tensor, col: torch.Tensor, valid: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """``logits`` with ``logits[i, col[i]] = values[i]`` on the valid rows (out of place)."""
    keep = logits.gather(1, col).squeeze(1)
    return logits.scatter(1, col, torch.where(valid, values, keep).unsqueeze(1))


def _check_batch(cosine: torch.Tensor, labels: torch.Tensor) -> None:
    if cosine.dim() != 2 or labels.shape != cosine.shape[:1]:
        raise ValueError(
            f"expected cosine [B, C] and labels [B], got {tuple(cosine.shape)} and "
            f"{tuple(labels.shape)}"
        )


class RowMarginHead(MarginHead):
    """A :class:`MarginHead` whose target logit has per-row parameters of the prepared batch.

    Partial FC fuses it into its cross-entropy like any ``MarginHead`` (``target_logit`` is
    called on the ``[N]`` target cosines of every row); ``forward`` follows the same row
    convention.
    """

    batch_inputs: tuple[str, ...] = ()

    def _rows(self, name: str, values: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The prepared per-row ``values`` for a target-cosine vector ``like`` ([N])."""
        if values is None or values.shape != like.shape:
            got = "none" if values is None else f"{values.shape[0]} rows"
            raise RuntimeError(
                f"{type(self).__name__}: {name} prepared for {got}, called on "
                f"{like.shape[0]} rows: call prepare_batch({', '.join(self.batch_inputs)}) "
                "with the global batch first"
            )
        return values.to(like)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the margin on each labelled row's target column (every row of
        the prepared batch; see :meth:`MarginHead.forward` for the arguments)."""
        _check_batch(cosine, labels)
        logits = cosine * self.s
        if cosine.shape[1] == 0:
            return logits
        valid, col, cos_t = _take_target(cosine, labels)
        if self.interclass_threshold > 0:
            with torch.no_grad():
                dirty = cosine > self.interclass_threshold
                dirty.scatter_(1, col, dirty.gather(1, col) & ~valid.unsqueeze(1))
            logits = logits.masked_fill(dirty, 0.0)
        return _put_target(logits, col, valid, self.s * self.target_logit(cos_t))


class AdaFace(RowMarginHead):
    """AdaFace (Kim, Jain, Liu, CVPR 2022, Eq. 9–12): the margin adapts to the feature norm.

    With ‖z_i‖ clipped to [0.001, 100] and treated as a constant, μ, σ the EMA of the batch mean
    and (unbiased) standard deviation of the norms (Eq. 11: μ ← α·mean + (1 − α)·μ, the paper's
    α = 0.01, started at μ = 20, σ = 100 as the authors' code), and
    ẑ_i = clip(h·(‖z_i‖ − μ)/(σ + ε), −1, 1) (Eq. 10, ε = 1e-3)::

        target logit = s · (ψ(θ_y + g_angle) − g_add),  g_angle = −m·ẑ_i,  g_add = m·ẑ_i + m

    (Eq. 12), the other logits s·cos θ_j. ψ is :func:`heads.margins.monotone_cos` (the paper's
    cos where θ_y + g_angle ∈ [0, π]; continued monotonically outside, where the authors' code
    clips the angle and passes no gradient). The statistics are those of the global batch
    (``batch_inputs = ("norms",)``), updated before the margins are computed, once per forward
    in training mode.

    Args:
        s: scale (paper 64).
        m: margin (paper 0.4).
        h: concentration of ẑ (paper 0.333: about 68 % of ẑ in [−0.333, 0.333]).
        t_alpha: EMA momentum α of the norm statistics (paper 0.01).
        interclass_threshold, intra_alpha: see :class:`MarginHead`.
    """

    batch_inputs = ("norms",)
    EPS = 1e-3
    NORM_RANGE = (0.001, 100.0)

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        *,
        interclass_threshold: float = 0.0,
        intra_alpha: float = 0.0,
    ) -> None:
        super().__init__(s, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha)
        if not 0.0 < t_alpha <= 1.0:
            raise ValueError(f"t_alpha must be in (0, 1], got {t_alpha}")
        if h <= 0:
            raise ValueError(f"h must be > 0, got {h}")
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)
        # fp64 scalars: the EMA of many steps keeps its precision whatever the compute dtype
        self.register_buffer("batch_mean", torch.tensor(20.0, dtype=torch.float64))
        self.register_buffer("batch_std", torch.tensor(100.0, dtype=torch.float64))
        self._g_angle: torch.Tensor | None = None
        self._g_add: torch.Tensor | None = None

    def prepare_batch(self, norms: torch.Tensor) -> None:
        """Updates μ, σ from the global batch's ``norms [N]`` (training mode) and sets ẑ."""
        safe = norms.detach().to(self.batch_mean).clamp(*self.NORM_RANGE)
        if self.training:
            a = self.t_alpha
            self.batch_mean.mul_(1.0 - a).add_(a * safe.mean())
            if safe.numel() > 1:  # the unbiased std of one value is undefined
                self.batch_std.mul_(1.0 - a).add_(a * safe.std())
        z = ((safe - self.batch_mean) / (self.batch_std + self.EPS) * self.h).clamp(-1.0, 1.0)
        self._g_angle = -self.m * z
        self._g_add = self.m + self.m * z

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        g_angle = self._rows("norms", self._g_angle, cos_target)
        g_add = self._rows("norms", self._g_add, cos_target)
        theta = torch.arccos(cos_target.clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        return monotone_cos(theta + g_angle) - g_add

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m={self.m}, h={self.h}, t_alpha={self.t_alpha}"


class ElasticFace(RowMarginHead):
    """ElasticFace (Boutros, Damer, Kirchbuchner, Kuijper, CVPRW 2022, Eq. 4 and 5).

    Each sample of each step gets its own margin E ~ N(m, σ²):

    - ``arc`` (ElasticFace-Arc, Eq. 4): target logit s·ψ(θ_y + E);
    - ``cos`` (ElasticFace-Cos, Eq. 5): target logit s·(cos θ_y − E);

    the other logits s·cos θ_j. ψ is :func:`heads.margins.monotone_cos`.

    The margins come from a seeded stream, not from the process's random state: row i of the
    global batch in the k-th training forward takes a normal that depends on (``seed``, k, i)
    only (:meth:`margins`). Every rank draws the same vector,
    so a sample gets the same margin whatever the world size (for the same global batch per
    forward), and the counter is the head's state (``extra_state``), so a resume continues the
    stream. In eval mode every margin is m.

    Args:
        s: scale (paper 64).
        m: mean margin (paper: Arc 0.5 rad, Cos 0.35).
        sigma: standard deviation σ of the margin (paper 0.05 for both).
        variant: ``"arc"`` or ``"cos"``.
        seed: seeds the stream.
        interclass_threshold, intra_alpha: see :class:`MarginHead`.
    """

    batch_inputs = ("num_rows",)

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.5,
        sigma: float = 0.05,
        variant: str = "arc",
        seed: int = 0,
        *,
        interclass_threshold: float = 0.0,
        intra_alpha: float = 0.0,
    ) -> None:
        super().__init__(s, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha)
        if variant not in ("arc", "cos"):
            raise ValueError(f"variant must be 'arc' or 'cos', got {variant!r}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.m, self.sigma, self.variant, self.seed = float(m), float(sigma), variant, int(seed)
        self.draws = 0
        """Training forwards so far: the position in the margin stream."""
        self._margins: torch.Tensor | None = None

    BLOCK_ROWS = 1024
    """Rows per block of the stream; each block has its own seeded generator."""

    def margins(self, num_rows: int, draw: int) -> torch.Tensor:
        """The ``[num_rows]`` fp64 margins of draw number ``draw``.

        A pure function of (seed, draw, row): row i comes from block i // BLOCK_ROWS, drawn by
        a generator seeded by (seed, draw, block), so a row's margin does not depend on how
        many rows the batch has.
        """
        blocks = []
        for block in range((num_rows + self.BLOCK_ROWS - 1) // self.BLOCK_ROWS):
            key = ((self.seed * 1_000_003 + draw) * 65_537 + block) % (2**63)
            gen = torch.Generator().manual_seed(key)
            blocks.append(torch.randn(self.BLOCK_ROWS, generator=gen, dtype=torch.float64))
        rows = torch.cat(blocks)[:num_rows] if blocks else torch.zeros(0, dtype=torch.float64)
        return rows * self.sigma + self.m

    def prepare_batch(self, num_rows: int) -> None:
        """This forward's margins; a training forward advances the stream."""
        if self.training:
            self._margins = self.margins(int(num_rows), self.draws)
            self.draws += 1
        else:
            self._margins = torch.full((int(num_rows),), self.m, dtype=torch.float64)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        margin = self._rows("num_rows", self._margins, cos_target)
        if self.variant == "cos":
            return cos_target - margin
        theta = torch.arccos(cos_target.clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        return monotone_cos(theta + margin)

    def get_extra_state(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", variant={self.variant}, m={self.m}, sigma={self.sigma}, seed={self.seed}"
        )


class CurricularFace(nn.Module):
    """CurricularFace (Huang et al., CVPR 2020, Eq. 6–9): hard negatives weighted by progress.

    Target logit s·ψ(θ_y + m) (ArcFace's, ψ the monotone cosine). A negative j of row i is hard
    when cos θ_j > T_i = ψ(θ_{y_i} + m) (Eq. 9, the margin-penalised target cosine); its logit is
    s·cos θ_j·(t + cos θ_j), the others s·cos θ_j. t is the EMA of the mean positive cosine of
    the batch (Eq. 7: t ← α·r + (1 − α)·t, r = mean_i cos θ_{y_i}, the paper's α = 0.01, t₀ = 0),
    updated before the logits as in the authors' code and treated as a constant.

    Both t and the thresholds T_i need every row's target cosine, which lives on the one shard
    holding its class: ``batch_inputs = ("target_cosine",)``, the caller gathers it over the
    global batch, and every shard modulates its own hard negatives. Not a :class:`MarginHead`
    (the modulation touches non-target logits), but it has the fusion hooks of
    :mod:`heads.margins`: Partial FC applies the modulation inside its blockwise
    cross-entropy (:meth:`nontarget_logits`, :meth:`nontarget_grad_`), no extra ``[N, C]`` pass.

    Args:
        s: scale (paper 64).
        m: additive angular margin in radians (paper 0.5).
        t_alpha: EMA momentum α of t (paper 0.01).
        intra_alpha: see :class:`MarginHead`.
    """

    kind = "margin"
    normalized = True
    batch_inputs = ("target_cosine",)
    interclass_threshold = 0.0

    def __init__(
        self, s: float = 64.0, m: float = 0.5, t_alpha: float = 0.01, *, intra_alpha: float = 0.0
    ) -> None:
        super().__init__()
        if intra_alpha < 0:
            raise ValueError(f"intra_alpha must be >= 0, got {intra_alpha}")
        self.intra_alpha = float(intra_alpha)
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if m < 0:
            raise ValueError(f"m must be >= 0 (radians), got {m}")
        if not 0.0 < t_alpha <= 1.0:
            raise ValueError(f"t_alpha must be in (0, 1], got {t_alpha}")
        self.s, self.m, self.t_alpha = float(s), float(m), float(t_alpha)
        self.register_buffer("t", torch.tensor(0.0, dtype=torch.float64))
        self._threshold: torch.Tensor | None = None

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """ψ(θ_y + m), un-scaled."""
        theta = torch.arccos(cos_target.clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        return monotone_cos(theta + self.m)

    def prepare_batch(self, target_cosine: torch.Tensor) -> None:
        """Updates t from the global batch's ``target_cosine [N]`` (training mode) and sets T_i."""
        cos = target_cosine.detach()
        if self.training:
            self.t.mul_(1.0 - self.t_alpha).add_(self.t_alpha * cos.to(self.t).mean())
        with torch.no_grad():
            self._threshold = self.target_logit(cos.to(self.t))

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits of one shard's ``cosine [N, C]``; ``labels [N]`` target column or −1."""
        _check_batch(cosine, labels)
        threshold = self._hard_threshold(cosine.T)  # raises without prepare_batch
        if cosine.shape[1] == 0:
            return cosine * self.s
        valid, col, cos_t = _take_target(cosine, labels)
        with torch.no_grad():
            hard = cosine > threshold.unsqueeze(1)
            hard.scatter_(1, col, hard.gather(1, col) & ~valid.unsqueeze(1))
        target = self.s * self.target_logit(cos_t)
        return _CurricularLogits.apply(cosine, hard, self.t.to(cosine), self.s, col, valid, target)

    nontarget_scale = None  # the hard negatives are not s·cos

    def _hard_threshold(self, cos: torch.Tensor) -> torch.Tensor:
        """T_i of the prepared batch for a ``[K, N]`` block (rows along the last dimension)."""
        if self._threshold is None or self._threshold.shape[0] != cos.shape[-1]:
            raise RuntimeError(
                f"CurricularFace: call prepare_batch(target_cosine) with the global batch of "
                f"{cos.shape[-1]} rows first"
            )
        return self._threshold.to(cos)

    def nontarget_logits(self, cos: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` ← s·cos, s·cos·(t + cos) where cos > T_i; ``cos`` is ``[K, N]`` (K classes,
        the N rows of the batch last)."""
        hard = cos > self._hard_threshold(cos)
        torch.mul(cos, self.s, out=out)
        return out.mul_(torch.where(hard, cos + self.t.to(cos), 1.0))

    def nontarget_grad_(self, cos: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` ·= s, or s·(t + 2·cos) where cos > T_i (``[K, N]`` as above)."""
        hard = cos > self._hard_threshold(cos)
        grad.mul_(self.s)
        return grad.mul_(torch.where(hard, cos.mul(2.0).add_(self.t.to(cos)), 1.0))

    def extra_loss_sum(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """α/π · Σ θ_y over the labelled rows, as :meth:`MarginHead.extra_loss_sum`."""
        return MarginHead.extra_loss_sum(self, cosine, labels)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, t_alpha={self.t_alpha}"


class _CurricularLogits(torch.autograd.Function):
    """s·cos, the ``hard`` entries s·cos·(t + cos), row i's column ``col[i]`` ``target[i]``
    where ``valid``; t and s constants.

    One output buffer (and a transient factor); the backward keeps only the cosines and the
    boolean mask. Nothing is read back to the host.
    """

    @staticmethod
    def forward(ctx, cosine, hard, t, s, col, valid, target):  # type: ignore[override]
        out = cosine * s
        # torch.where, not out[hard]: a boolean index reads the count back to the host
        out.mul_(torch.where(hard, t + cosine, 1.0))
        keep = out.gather(1, col).squeeze(1)
        out.scatter_(1, col, torch.where(valid, target, keep).unsqueeze(1))
        ctx.save_for_backward(cosine, hard, t, col, valid)
        ctx.s = s
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        cosine, hard, t, col, valid = ctx.saved_tensors
        g = grad * ctx.s
        g.mul_(torch.where(hard, t + 2.0 * cosine, 1.0))
        at_target = grad.gather(1, col).squeeze(1)
        grad_target = torch.where(valid, at_target, 0.0)
        # the target entries came from ``target``, not from the cosine at that place
        g.scatter_(1, col, torch.where(valid, 0.0, g.gather(1, col).squeeze(1)).unsqueeze(1))
        return g, None, None, None, None, None, grad_target


@register("adaface")
def adaface(
    *,
    s: float = 64.0,
    m: float = 0.4,
    h: float = 0.333,
    t_alpha: float = 0.01,
    interclass_threshold: float = 0.0,
    intra_alpha: float = 0.0,
) -> AdaFace:
    """AdaFace: s·(cos(θ_y − m·ẑ) − m·ẑ − m), ẑ the norm normalised by its batch EMA."""
    return AdaFace(
        s, m, h, t_alpha, interclass_threshold=interclass_threshold, intra_alpha=intra_alpha
    )


@register("curricularface")
def curricularface(
    *, s: float = 64.0, m: float = 0.5, t_alpha: float = 0.01, intra_alpha: float = 0.0
) -> CurricularFace:
    """CurricularFace: ArcFace target, hard negatives s·cos θ_j·(t + cos θ_j)."""
    return CurricularFace(s, m, t_alpha, intra_alpha=intra_alpha)


def _elastic_variant(name: str, kind: str, m: float, doc: str):
    """Registers ``name``: an :class:`ElasticFace` of ``kind`` with mean margin ``m``."""

    @register(name)
    def build(
        *,
        s: float = 64.0,
        m: float = m,
        sigma: float = 0.05,
        seed: int = 0,
        interclass_threshold: float = 0.0,
        intra_alpha: float = 0.0,
    ) -> ElasticFace:
        return ElasticFace(
            s,
            m,
            sigma,
            kind,
            seed,
            interclass_threshold=interclass_threshold,
            intra_alpha=intra_alpha,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return build


elasticface_arc = _elastic_variant(
    "elasticface_arc",
    "arc",
    0.5,
    "ElasticFace-Arc: s·cos(θ_y + E), E ~ N(m, σ²) per sample and step.",
)
elasticface_cos = _elastic_variant(
    "elasticface_cos",
    "cos",
    0.35,
    "ElasticFace-Cos: s·(cos θ_y − E), E ~ N(m, σ²) per sample and step.",
)


def prepare_unsharded(
    head: nn.Module,
    cosine: torch.Tensor,
    labels: torch.Tensor,
    norms: torch.Tensor | None = None,
) -> None:
    """Prepares ``head`` for a whole batch held in one place (no shards): a single process.

    Args:
        head: any margin head (one without ``batch_inputs`` is left alone).
        cosine: ``[N, C]`` every class's cosine; ``labels [N]`` the target columns, all ≥ 0.
        norms: ``[N]`` embedding norms, for a head that lists ``"norms"``.
    """
    inputs: dict[str, Any] = {}
    for name in getattr(head, "batch_inputs", ()):
        if name == "num_rows":
            inputs[name] = cosine.shape[0]
        elif name == "target_cosine":
            inputs[name] = cosine.gather(1, labels.unsqueeze(1)).squeeze(1)
        elif name == "norms":
            if norms is None:
                raise ValueError(f"{type(head).__name__} needs the embedding norms")
            inputs[name] = norms
        else:
            raise ValueError(f"{type(head).__name__}.batch_inputs: unknown input {name!r}")
    if inputs:
        head.prepare_batch(**inputs)

"""Metric-learning losses on a batch of embeddings, and the AM-softmax + prototypical head.

Owns the loss maths of the heads of kind ``"metric"`` (``contrastive``, ``triplet``,
``margin``, ``angleproto``) and of kind ``"combined"`` (``amsoftmax_proto``), each registered
in :data:`heads.HEADS`. Every metric head is called as ``head(embeddings, labels)`` on the
*global* batch (``embeddings [N, D]``, ``labels [N]`` int64) and returns a scalar loss.

Does not own: gathering the batch across ranks (:mod:`dist_train.metric_loss` does it and
never calls ``torch.distributed`` from here), the margin heads used inside Partial FC
(:mod:`heads.margins`), or the sharded center loss (:mod:`dist_train.center_loss`).

Conventions shared by every head here:

- The maths runs in float32 (float64 when the input is float64) with autocast disabled, so a
  bf16/fp16 backbone output does not make distances or softmaxes lose precision.
- ``normalize=True`` (the default) projects embeddings onto the unit sphere first, so
  Euclidean distances lie in ``[0, 2]`` and margins are comparable across heads.
- Pair and triplet selection (mining, sampling) is a discrete choice made on detached
  distances; the gradient flows through the distances of the selected pairs only.
- A batch without any usable pair returns a zero that stays attached to the graph, so
  ``backward()`` works and every rank still takes part in the backbone's gradient sync.

Why one module of this size: the five heads share the distance, mask and mining helpers at
the top and the conventions above; each head is one class that reads alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from heads import register

# Largest number of (positive pair, negative) entries materialised at once by the triplet
# miners: positive pairs are processed in chunks, so memory stays ~16M entries per chunk
# whatever the global batch.
_TRIPLET_CHUNK_ELEMENTS = 1 << 24


def check_batch(embeddings: torch.Tensor, labels: torch.Tensor, who: str) -> None:
    """Raises a ``ValueError`` naming ``who`` unless ``embeddings [N, D]`` match ``labels [N]``."""
    if embeddings.dim() != 2:
        raise ValueError(f"{who}: embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{who}: labels must be [N] with N = {embeddings.shape[0]} (the number of "
            f"embeddings), got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{who}: labels must be integers, got {labels.dtype}")


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    # float64 stays float64 (gradient checks); anything narrower is computed in float32.
    return x if x.dtype == torch.float64 else x.float()


def _prepared(embeddings: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The embeddings in the compute dtype, projected onto the unit sphere if ``normalize``."""
    x = _compute_dtype(embeddings)
    return F.normalize(x, dim=1) if normalize else x


def pairwise_distances(x: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Euclidean distances between the rows of ``x``.

    Args:
        x: ``[N, D]`` float.
        squared: return squared distances.

    Returns:
        ``[N, N]`` with an exact zero diagonal when ``squared``. The non-squared distance is
        ``sqrt(max(d², 1e-12))``: the floor keeps the gradient finite for coincident points
        (where the true gradient is undefined); no loss here uses the diagonal.
    """
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())).clamp_min(0.0)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    d2 = d2.masked_fill(eye, 0.0)
    if squared:
        return d2
    return d2.clamp_min(1e-12).sqrt()


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positive, negative)`` boolean ``[N, N]`` masks; the positive mask excludes i == j."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _attached_zero(x: torch.Tensor) -> torch.Tensor:
    # A zero that depends on x, so backward() reaches the backbone even without pairs.
    return x.sum() * 0.0


def semi_hard_triplets(
    distances: torch.Tensor, labels: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every semi-hard triplet of a batch (the miner used with :class:`ContrastiveLoss`).

    A triplet ``(a, p, n)`` with ``label[p] == label[a]``, ``p != a``, ``label[n] != label[a]``
    is semi-hard when ``d(a, p) < d(a, n) < d(a, p) + margin``: the negative is farther than
    the positive but still inside the margin (FaceNet, Schroff et al. 2015).

    Args:
        distances: ``[N, N]`` distances (detached by this function).
        labels: ``[N]`` int.
        margin: width of the semi-hard band.

    Returns:
        ``(a, p, n)`` index tensors ``[T]`` int64, in lexicographic order.
    """
    d = distances.detach()
    pos, neg = label_masks(labels)
    a_parts, p_parts, n_parts = [], [], []
    for a, p in _positive_pair_chunks(pos, neg):
        d_ap = d[a, p][:, None]  # [P, 1]
        d_an = d[a]  # [P, N]
        pair, n = (neg[a] & (d_an > d_ap) & (d_an < d_ap + margin)).nonzero().unbind(1)
        a_parts.append(a[pair])
        p_parts.append(p[pair])
        n_parts.append(n)
    if not a_parts:
        empty = torch.zeros(0, dtype=torch.long, device=d.device)
        return empty, empty, empty
    return torch.cat(a_parts), torch.cat(p_parts), torch.cat(n_parts)


def _positive_pair_chunks(
    pos: torch.Tensor, neg: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ordered positive pairs ``(a, p)`` whose anchor has a negative, lexicographic, in chunks
    small enough that a ``[chunk, N]`` tensor stays within ``_TRIPLET_CHUNK_ELEMENTS``."""
    a, p = (pos & neg.any(dim=1, keepdim=True)).nonzero().unbind(1)
    chunk = max(1, _TRIPLET_CHUNK_ELEMENTS // max(1, pos.shape[0]))
    for start in range(0, a.shape[0], chunk):
        yield a[start : start + chunk], p[start : start + chunk]


@register("contrastive")
class ContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell et al. 2006) on Euclidean distances.

    With pairs ``P`` (same identity) and ``Q`` (different identities) and ``d`` the Euclidean
    distance between (by default L2-normalised) embeddings::

        L = mean_{(i,j) in P} d_ij²  +  mean_{(i,j) in Q} max(0, margin - d_ij)²

    Positive pairs are pulled together; negative pairs are pushed beyond ``margin``. The two
    means are taken separately so that the many negatives of a batch do not drown the few
    positives (a term with no pair contributes 0).

    Pair selection (``miner``):

    - ``"none"``: every unordered pair ``i < j`` of the batch.
    - ``"semi_hard"``: the pairs of the semi-hard triplets of :func:`semi_hard_triplets` with
      band ``miner_margin``: ``P`` holds ``(a, p)`` and ``Q`` holds ``(a, n)`` of every mined
      triplet, counted once per triplet ("contrastive with a semi-hard triplet miner").

    Args:
        margin: distance beyond which negative pairs cost nothing.
        normalize: L2-normalise the embeddings first.
        miner: ``"none"`` or ``"semi_hard"``.
        miner_margin: width of the semi-hard band of the miner.
    """

    kind = "metric"

    def __init__(
        self,
        *,
        margin: float = 1.0,
        normalize: bool = True,
        miner: str = "none",
        miner_margin: float = 0.2,
    ) -> None:
        super().__init__()
        if miner not in ("none", "semi_hard"):
            raise ValueError(f"contrastive: miner={miner!r} is not one of ['none', 'semi_hard']")
        if margin <= 0:
            raise ValueError(f"contrastive: margin must be > 0, got {margin}")
        self.margin = float(margin)
        self.normalize = normalize
        self.miner = miner
        self.miner_margin = float(miner_margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of the batch.

        Args:
            embeddings: ``[N, D]`` float (any float dtype; computed in fp32 or fp64).
            labels: ``[N]`` int64.

        Returns:
            Scalar loss.
        """
        check_batch(embeddings, labels, "contrastive")
        with torch.autocast(embeddings.device.type, enabled=False):
            x = _prepared(embeddings, self.normalize)
            d = pairwise_distances(x)
            if self.miner == "none":
                pos, neg = label_masks(labels)
                upper = torch.ones_like(pos).triu(diagonal=1)
                d_pos, d_neg = d[pos & upper], d[neg & upper]
            else:
                a, p, n = semi_hard_triplets(d, labels, self.miner_margin)
                d_pos, d_neg = d[a, p], d[a, n]
            loss = _attached_zero(x)
            if d_pos.numel():
                loss = loss + d_pos.pow(2).mean()
            if d_neg.numel():
                loss = loss + (self.margin - d_neg).clamp_min(0.0).pow(2).mean()
            return loss


@register("triplet")
class TripletLoss(nn.Module):
    """Triplet loss with in-batch mining on Euclidean distances.

    For a triplet ``(a, p, n)`` the cost is ``max(0, d_ap - d_an + margin)``.

    ``mining="batch_hard"`` (Hermans et al. 2017): for every anchor ``a`` that has at least
    one positive and one negative in the batch, its hardest positive and hardest negative::

        L = mean_a max(0, max_p d_ap - min_n d_an + margin)

    ``mining="semi_hard"`` (FaceNet, Schroff et al. 2015): for every ordered positive pair
    ``(a, p)`` whose anchor has a negative, the negative is the closest one *farther* than the
    positive, ``n* = argmin {d_an : d_an > d_ap}`` (semi-hard when ``d_an* < d_ap + margin``,
    otherwise the cost is 0). When the anchor has no negative farther than ``d_ap``, the
    fallback is the farthest negative, ``n* = argmax d_an`` (the easiest of the hard ones), as
    in TensorFlow Addons' ``triplet_semihard_loss``::

        L = mean_{(a,p)} max(0, d_ap - d_an* + margin)

    Args:
        margin: triplet margin (FaceNet uses 0.2 on unit-norm embeddings).
        mining: ``"batch_hard"`` or ``"semi_hard"``.
        normalize: L2-normalise the embeddings first.
    """

    kind = "metric"

    def __init__(
        self, *, margin: float = 0.2, mining: str = "semi_hard", normalize: bool = True
    ) -> None:
        super().__init__()
        if mining not in ("batch_hard", "semi_hard"):
            raise ValueError(
                f"triplet: mining={mining!r} is not one of ['batch_hard', 'semi_hard']"
            )
        self.margin = float(margin)
        self.mining = mining
        self.normalize = normalize

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of the batch (``embeddings [N, D]`` float, ``labels [N]`` int64) → scalar."""
        check_batch(embeddings, labels, "triplet")
        with torch.autocast(embeddings.device.type, enabled=False):
            x = _prepared(embeddings, self.normalize)
            d = pairwise_distances(x)
            pos, neg = label_masks(labels)
            if self.mining == "batch_hard":
                d_ap, d_an = self._batch_hard(d, pos, neg)
            else:
                d_ap, d_an = self._semi_hard(d, pos, neg)
            if d_ap.numel() == 0:
                return _attached_zero(x)
            return (d_ap - d_an + self.margin).clamp_min(0.0).mean()

    @staticmethod
    def _batch_hard(
        d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        anchors = (pos.any(dim=1) & neg.any(dim=1)).nonzero().squeeze(1)
        dd = d.detach()
        hardest_p = dd.masked_fill(~pos, float("-inf")).argmax(dim=1)
        hardest_n = dd.masked_fill(~neg, float("inf")).argmin(dim=1)
        return d[anchors, hardest_p[anchors]], d[anchors, hardest_n[anchors]]

    @staticmethod
    def _semi_hard(
        d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dd = d.detach()
        # Fallback negative per anchor: the farthest one (independent of the positive).
        farthest = dd.masked_fill(~neg, float("-inf")).argmax(dim=1)
        a_all, p_all, n_all = [], [], []
        for a, p in _positive_pair_chunks(pos, neg):
            d_ap = dd[a, p][:, None]  # [P, 1]
            farther = neg[a] & (dd[a] > d_ap)  # [P, N]
            closest_farther = dd[a].masked_fill(~farther, float("inf")).argmin(dim=1)
            a_all.append(a)
            p_all.append(p)
            n_all.append(torch.where(farther.any(dim=1), closest_farther, farthest[a]))
        if not a_all:
            return d.new_zeros(0), d.new_zeros(0)
        a, p, ng = torch.cat(a_all), torch.cat(p_all), torch.cat(n_all)
        return d[a, p], d[a, ng]


@register("margin")
class MarginLoss(nn.Module):
    """Margin loss with distance-weighted negative sampling (Wu et al. 2017, "Sampling Matters").

    Sampling. On the unit sphere in ``n = D`` dimensions, the distance between two random
    points has density ``q(d) ∝ d^(n-2) · (1 - d²/4)^((n-3)/2)``. For every ordered positive
    pair ``(a, p)`` one negative ``n`` of anchor ``a`` is drawn with probability proportional to
    the inverse density::

        w(d_an) = d^(2-n) · (1 - d²/4)^(-(n-3)/2),   d = max(d_an, cutoff)

    with ``w = 0`` for negatives at distance ``>= nonzero_loss_cutoff`` (they cost nothing).
    The floor ``cutoff`` clips the weights of very close negatives, so noisy hard negatives do
    not dominate. An anchor whose negatives all have zero weight draws uniformly among them.
    (The inverse density has exponent ``-(n-3)/2`` on the second factor, as in the paper's
    ``q(d)^-1`` and its reference code.)

    Loss. With a learnable boundary ``β`` (global, or ``β_c`` per class of the anchor when
    ``beta_per_class``) and margin ``α``, over the ``T`` sampled triplets (``2T`` pairs)::

        L = 1/(2T) Σ_(a,p,n) ( max(0, α + d_ap - β_a) + max(0, α + β_a - d_an) )
            + ν · 1/T Σ_(a,p,n) β_a

    The ``ν`` term is the paper's ν-SVM-like regularisation: it penalises a large ``β``
    (pulling the boundary in, so fewer pairs violate the margin); ``ν = 0`` disables it.
    The boundary usually wants its own learning rate (the paper uses one for ``β``).

    Randomness. Sampling uses this head's own ``torch.Generator`` seeded by ``seed``: on every
    rank the same seed and the same global batch give the same negatives, which the
    cross-rank wrapper needs (its loss must be identical on every rank). :meth:`reseed`
    restarts the stream. The generator's position is part of ``state_dict()`` (as the module's
    extra state), so a resumed run draws the negatives the uninterrupted run would have.

    Args:
        alpha: margin ``α`` around the boundary.
        beta: initial value of ``β``.
        beta_per_class: one ``β`` per class (needs ``num_classes``) instead of a global one.
        num_classes: number of classes C when ``beta_per_class``.
        nu: weight ``ν`` of the ``β`` regularisation.
        cutoff: distance floor of the sampling weights.
        nonzero_loss_cutoff: negatives at or beyond this distance are never sampled.
        normalize: L2-normalise the embeddings first (the weights assume the unit sphere).
        seed: seed of the sampling generator.
    """

    kind = "metric"

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        beta: float = 1.2,
        beta_per_class: bool = False,
        num_classes: int = 0,
        nu: float = 0.0,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        normalize: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if beta_per_class and num_classes < 1:
            raise ValueError("margin: beta_per_class=True needs num_classes >= 1")
        if not 0.0 < cutoff < nonzero_loss_cutoff:
            raise ValueError(
                f"margin: need 0 < cutoff < nonzero_loss_cutoff, got {cutoff}, "
                f"{nonzero_loss_cutoff}"
            )
        self.alpha = float(alpha)
        self.nu = float(nu)
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)
        self.normalize = normalize
        self.beta_per_class = beta_per_class
        self.num_classes = int(num_classes)
        self.beta = nn.Parameter(torch.full((num_classes if beta_per_class else 1,), float(beta)))
        self.seed = int(seed)
        self._generator: torch.Generator | None = None

    def reseed(self, seed: int | None = None) -> None:
        """Restarts the sampling stream (from ``seed``, or the constructor's seed)."""
        if seed is not None:
            self.seed = int(seed)
        self._generator = None

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def get_extra_state(self) -> dict:
        gen = self._generator
        return {
            "seed": self.seed,
            "device": str(gen.device) if gen is not None else None,
            "generator": gen.get_state() if gen is not None else None,
        }

    def set_extra_state(self, state: dict) -> None:
        self.seed, self._generator = int(state["seed"]), None
        if state.get("generator") is not None:
            try:
                gen = torch.Generator(device=state["device"])
                gen.set_state(state["generator"])
            except (RuntimeError, ValueError):  # saved on a device this process does not have
                return
            self._generator = gen

    def sampling_weights(
        self, distances: torch.Tensor, negative: torch.Tensor, dim: int
    ) -> torch.Tensor:
        """Unnormalised sampling weights ``[N, N]`` of each anchor's negatives (detached).

        Args:
            distances: ``[N, N]`` Euclidean distances on the unit sphere.
            negative: ``[N, N]`` bool, True where the labels differ.
            dim: embedding dimension ``n``.

        Returns:
            ``[N, N]`` weights, each row divided by its largest one (in log space, so ``n`` in
            the hundreds does not overflow); zero outside ``negative`` and at distances
            ``>= nonzero_loss_cutoff``.
        """
        d = distances.detach().clamp_min(self.cutoff)
        inside = (1.0 - 0.25 * d * d).clamp_min(1e-8)
        log_w = (2.0 - dim) * d.log() - 0.5 * (dim - 3.0) * inside.log()
        keep = negative & (distances.detach() < self.nonzero_loss_cutoff)
        log_w = log_w.masked_fill(~keep, float("-inf"))
        row_max = log_w.max(dim=1, keepdim=True).values
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        return (log_w - row_max).exp()

    def sample(
        self, distances: torch.Tensor, labels: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draws one negative per ordered positive pair (advances the generator).

        Args:
            distances: ``[N, N]`` distances between unit-norm embeddings.
            labels: ``[N]`` int.
            dim: embedding dimension ``n`` of the sampling weights.

        Returns:
            ``(a, p, n)`` index tensors ``[T]`` int64: every ordered positive pair ``(a, p)``
            whose anchor has a negative, with its sampled negative ``n``.
        """
        pos, neg = label_masks(labels)
        a, p = (pos & neg.any(dim=1, keepdim=True)).nonzero().unbind(1)
        if a.numel() == 0:
            return a, p, a.clone()
        weights = self.sampling_weights(distances, neg, dim)  # [N, N], one row per anchor
        # Anchors whose negatives all lie beyond the loss cutoff draw uniformly among them.
        empty = weights.sum(dim=1, keepdim=True) <= 0
        weights = torch.where(empty, neg.to(weights.dtype), weights)
        # Inverse-CDF draw (several times faster than torch.multinomial on CPU): the first
        # index whose cumulative weight exceeds u ~ U[0, total) has a non-zero weight.
        cdf = weights.cumsum(dim=1)
        u = (
            torch.rand(
                a.shape[0], 1, generator=self._gen(cdf.device), dtype=cdf.dtype, device=cdf.device
            )
            * cdf[a, -1:]
        )
        n = torch.searchsorted(cdf[a], u, right=True).squeeze(1)
        return a, p, n.clamp_max(cdf.shape[1] - 1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of the batch (``embeddings [N, D]`` float, ``labels [N]`` int64) → scalar."""
        check_batch(embeddings, labels, "margin")
        if self.beta_per_class and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())  # CPU-GPU sync point: validation
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"margin: labels must be in [0, {self.num_classes}) with beta_per_class, "
                    f"got range [{lo}, {hi}]"
                )
        with torch.autocast(embeddings.device.type, enabled=False):
            x = _prepared(embeddings, self.normalize)
            d = pairwise_distances(x)
            a, p, n = self.sample(d, labels, x.shape[1])
            if a.numel() == 0:
                return _attached_zero(x) + self.beta.sum() * 0.0
            beta = self.beta.to(x.dtype)
            beta_a = beta[labels[a]] if self.beta_per_class else beta.expand(a.shape[0])
            pos_cost = (self.alpha + d[a, p] - beta_a).clamp_min(0.0)
            neg_cost = (self.alpha + beta_a - d[a, n]).clamp_min(0.0)
            loss = (pos_cost.sum() + neg_cost.sum()) / (2 * a.shape[0])
            if self.nu:
                loss = loss + self.nu * beta_a.mean()
            return loss


@register("angleproto")
class AngleProtoLoss(nn.Module):
    """Angular prototypical loss (Chung et al. 2020, "In defence of metric learning").

    The batch must hold exactly ``M >= 2`` embeddings of each of its ``K >= 2`` classes (any
    order: rows are grouped by label, keeping their order of appearance). For class ``k`` the
    first embedding is the query ``q_k`` and the centroid of the other ``M - 1`` is the
    prototype ``c_k = mean(support_k)``. With a learnable scale ``w`` (kept ``>= 1e-6``) and
    bias ``b``::

        S_jk = w · cos(q_j, c_k) + b
        L = 1/K Σ_j -log( exp(S_jj) / Σ_k exp(S_jk) )

    Classes are ordered by label value; the loss does not depend on that order.

    Args:
        init_w: initial scale ``w`` (10 in the paper).
        init_b: initial bias ``b`` (-5 in the paper).
        m_per_class: when > 0, also require ``M`` to equal it.
    """

    kind = "metric"

    def __init__(self, *, init_w: float = 10.0, init_b: float = -5.0, m_per_class: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(init_w)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))
        self.m_per_class = int(m_per_class)

    def group(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Embeddings grouped by class: ``[K, M, D]``, classes by label value, rows in order.

        Raises:
            ValueError: unless every class has the same number ``M >= 2`` of rows (and
                ``M == m_per_class`` when set), naming the offending classes.
        """
        check_batch(embeddings, labels, "angleproto")
        classes, counts = torch.unique(labels, return_counts=True)
        counts_list = counts.tolist()  # CPU-GPU sync point: shape validation
        if len(counts_list) < 2:
            raise ValueError(
                f"angleproto: the batch needs at least 2 classes, got {len(counts_list)}"
            )
        m = self.m_per_class or counts_list[0]
        bad = [(int(c), k) for c, k in zip(classes.tolist(), counts_list) if k != m]
        if m < 2 or bad:
            shown = ", ".join(f"label {c}: {k}" for c, k in (bad or [(int(classes[0]), m)])[:5])
            raise ValueError(
                "angleproto: every class of the global batch needs exactly M >= 2 embeddings "
                f"(M = {m}{' from m_per_class' if self.m_per_class else ''}); "
                f"offending counts: {shown}. Use the m_per_class sampler."
            )
        order = torch.argsort(labels, stable=True)
        return embeddings[order].view(len(counts_list), m, embeddings.shape[1])

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of the batch (``embeddings [K·M, D]`` float, ``labels [K·M]`` int64) → scalar."""
        grouped = self.group(embeddings, labels)
        with torch.autocast(embeddings.device.type, enabled=False):
            x = _compute_dtype(grouped)
            query = F.normalize(x[:, 0], dim=1)
            proto = F.normalize(x[:, 1:].mean(dim=1), dim=1)
            w = self.w.to(x.dtype).clamp_min(1e-6)
            logits = w * (query @ proto.t()) + self.b.to(x.dtype)
            target = torch.arange(x.shape[0], device=x.device)
            return F.cross_entropy(logits, target)


class AMSoftmaxProto(nn.Module):
    """AM-softmax inside Partial FC plus a weighted angular prototypical loss.

    The total loss of a step is ``L_AM + metric_weight · L_AP``: ``.margin`` is the
    AM-softmax (CosFace) margin head applied by Partial FC to the cosine logits, ``.metric``
    an :class:`AngleProtoLoss` on the global batch. Calling this module computes the second
    term, ``metric_weight · L_AP(embeddings, labels)``, so the cross-rank wrapper
    :class:`dist_train.metric_loss.MetricLoss` can take it like any metric head.

    Args:
        margin: the margin head (kind ``"margin"``).
        metric: the metric head (kind ``"metric"``).
        metric_weight: weight of the metric term.
    """

    kind = "combined"

    def __init__(self, margin: nn.Module, metric: nn.Module, metric_weight: float = 1.0) -> None:
        super().__init__()
        if getattr(margin, "kind", None) != "margin":
            raise ValueError(f"amsoftmax_proto: .margin must be a margin head, got {margin}")
        if getattr(metric, "kind", None) != "metric":
            raise ValueError(f"amsoftmax_proto: .metric must be a metric head, got {metric}")
        self.margin = margin
        self.metric = metric
        self.metric_weight = float(metric_weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``metric_weight · metric(embeddings, labels)`` on the global batch → scalar."""
        return self.metric_weight * self.metric(embeddings, labels)


@register("amsoftmax_proto")
def amsoftmax_proto(
    *,
    s: float = 30.0,
    m: float = 0.1,
    metric_weight: float = 1.0,
    init_w: float = 10.0,
    init_b: float = -5.0,
    m_per_class: int = 0,
) -> AMSoftmaxProto:
    # Looked up at build time, not import time: the CosFace head lives in heads.margins.
    from heads import get_head

    return AMSoftmaxProto(
        get_head("cosface", s=s, m=m),
        AngleProtoLoss(init_w=init_w, init_b=init_b, m_per_class=m_per_class),
        metric_weight,
    )

"""Partial FC: the classifier module, sharded by class across ranks and sampled per step.

Owns :class:`PartialFC` (the weight shard: rank r holds the contiguous classes
``shard_range(C, r, W)``, its world-size-independent initial rows :func:`init_rows`, the
per-step class sampling and its random stream, the forward) and :func:`build_partial_fc` (the
module and its optimizer from the config sections). Does not own the autograd kernels
(:mod:`dist_train.partial_fc.kernels`), the row-wise optimizer
(:mod:`dist_train.partial_fc.optimizer`), the saved state (:mod:`dist_train.partial_fc.state`),
the memory model (:mod:`dist_train.partial_fc.memory`), the margin maths (``heads.margins``),
the backbone or its optimizer.

One step on rank r::

    global_labels     = all-gather(local_labels)                     # [N], in [0, C) (host check)
    global_embeddings = all_gather_with_grad(local_embeddings)       # [N, D]
    index             = sampled classes of the shard (all positives)  # [S], sorted
    cosine            = x̂ · ŵ[index]ᵀ  (fp32, autocast off)           # [N, S]
    logits            = margin(cosine, target column or -1[, norms=‖x‖])
    loss              = mean_i −log softmax_i(target), softmax over every shard's columns

Gradient convention (the project's): ``forward`` returns the *global* mean loss, the same
value on every rank. The backward of the sharded cross-entropy gives this shard's columns
exactly their part of ∂loss/∂logits, so each rank's ``global_embeddings.grad`` is the part of
the gradient flowing through its shard; the all-gather's backward sums those parts over ranks,
hence the gradient reaching ``local_embeddings`` is exactly ∂(global loss)/∂(local embeddings),
and the shard's weight gradient is exactly ∂(global loss)/∂(its rows). The trainer's DDP hook
must *sum* backbone gradients (not average) to get the single-process gradient.

Update semantics (``update=``):

- ``"sparse"`` (default): only the sampled rows change in a step; an unsampled row gets no
  gradient, no momentum and no weight decay, and its optimizer state is left bit-identical.
  The step costs O(S·D): rows and their state are gathered through the sampled index,
  updated, and scattered back. Adam's bias correction uses a per-row step count.
- ``"dense"``: InsightFace ``partial_fc_v2`` semantics: the shard is one parameter whose
  unsampled rows have zero gradient, so every row sees weight decay and momentum every step;
  the step costs O(C_local·D).

Head extensions (:mod:`heads.margins_magnitude`): a head whose ``forward`` takes the keyword
``norms`` gets the global batch's embedding norms ``‖x_i‖`` (with their graph), in the fused
kernel through its ``target_logit(cos_t, norms)``; a head with ``sub_centers = K > 1`` makes
the shard hold K rows per class (``[C_local·K, D]``, class-major), samples classes (all K
rows of a sampled class) and reduces the ``[N, S·K]`` cosines to ``[N, S]`` with the head's
``reduce_sub_centers`` (outside the fused kernel). A head with
``has_extra_loss`` (or ``intra_alpha > 0``) adds ``extra_loss_sum`` once per sample.

Memory: margin heads with the fusion hooks of ``heads.margins`` (every ``MarginHead``,
CurricularFace, MagFace) run in :class:`~dist_train.partial_fc.kernels.CosineCrossEntropy`,
which keeps one [N, S] fp32 buffer and a block-sized scratch (on CPU that buffer and the rows'
gradient are kept across steps in the module's
:class:`~dist_train.partial_fc.kernels.Workspace`); the other heads (sub-centres, raw logits)
hold two (cosines, and logits → softmax → gradient), besides the sampled rows and their
gradient. The model per rank is :func:`estimate_memory_bytes`; ``docs/partial_fc.md`` checks
it against measured peaks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dist_train.collectives import all_gather_no_grad, all_gather_with_grad, check_local_batch
from dist_train.distributed import all_reduce, get_rank, get_world_size, shard_range
from dist_train.optim import OptimSpec
from dist_train.partial_fc import kernels
from dist_train.partial_fc.dtypes import as_dtype, master_dtype
from dist_train.partial_fc.optimizer import PartialFCOptimizer
from dist_train.partial_fc.state import build_shard_state, read_shard_pieces
from dist_train.sharded_state import StoredState, gather_states
from heads.margins import MarginHead
from heads.margins_magnitude import takes_norms

DEFAULT_OPTIM = OptimSpec("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
"""Hyper-parameters of :meth:`PartialFC.configure_optimizer` that a call leaves out."""

INIT_BLOCK_ROWS = 65536
"""Classes per initialisation block; each block has its own seed, so the initial weights of
a class do not depend on the world size."""


def init_rows(
    start: int, stop: int, num_classes: int, dim: int, *, std: float, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """Initial rows ``[start, stop)`` of the ``[C, D]`` class-centre matrix, N(0, std²).

    Rows come from blocks of :data:`INIT_BLOCK_ROWS` classes, each drawn from its own seeded
    generator, so a class's initial centre is the same whatever the world size.
    """
    out = torch.empty(stop - start, dim, dtype=dtype)
    block = start // INIT_BLOCK_ROWS
    while block * INIT_BLOCK_ROWS < stop:
        b0 = block * INIT_BLOCK_ROWS
        b1 = min(b0 + INIT_BLOCK_ROWS, num_classes)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        rows = torch.randn(b1 - b0, dim, generator=gen).mul_(std)
        lo, hi = max(start, b0), min(stop, b1)
        out[lo - start : hi - start] = rows[lo - b0 : hi - b0]
        block += 1
    return out


class PartialFC(nn.Module):
    """Class-sharded, sampled softmax classifier with a margin head.

    Args:
        margin: a ``kind == "margin"`` head from :mod:`heads.margins`; its ``normalized``
            attribute says whether it receives cosines (True) or raw dot products W·x.
        embedding_size: D.
        num_classes: C, the total over all ranks.
        sample_rate: fraction r in (0, 1] of this rank's classes used per step; exactly
            ``min(C_local, max(int(r·C_local), N))`` classes are used for a global batch of N
            (:meth:`sample_size`; every positive is among them).
        update: ``"sparse"`` or ``"dense"`` (see the module docstring).
        weight_dtype: storage of the shard: float32, bfloat16 or float16 (float64 for tests).
        state_dtype: storage of the optimizer rows: float32, bfloat16, float16 (SGD momentum
            only; Adam's second moment underflows it) or float64; default: fp32 (fp64 for
            float64 weights). The maths are fp32 (fp64 with float64 storage) in every case;
            half-precision rows and state are updated a chunk at a time in fp32 and written
            back with stochastic rounding: no fp32 master copy (``dist_train.partial_fc.dtypes``
            says why each combination is safe).
        init_std: standard deviation of the initial rows.
        seed: seeds the initial rows (world-size independent) and the sampling (per rank).
        stochastic_rounding: round updates into bf16/fp16 storage (rows and optimizer
            state) stochastically; off: round to nearest.

    Attributes:
        weight: ``[C_local·K, D]`` the shard (a buffer: not a ``Parameter``, the optimizer of
            :meth:`configure_optimizer` updates it); K = ``sub_centers`` (1 for most heads).
        class_start, class_stop: this rank's class range.
        sub_centers: K, rows per class (the head's ``sub_centers``, default 1).
        num_rows: ``C_local·K``, the rows of the shard.
        sampled_index: ``[S·K]`` int64, sorted shard rows used by the last forward.
        sampled_weight: ``[S, D]`` leaf of the last forward; its ``.grad`` after backward is
            the gradient of the global loss with respect to those rows. With a fused head
            and sampling its values are a zero-stride placeholder (the kernel reads the rows
            from ``weight``); otherwise the rows themselves.
    """

    def __init__(
        self,
        margin: nn.Module,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        update: str = "sparse",
        weight_dtype: torch.dtype | str = torch.float32,
        state_dtype: torch.dtype | str | None = None,
        *,
        init_std: float = 0.01,
        seed: int = 0,
        stochastic_rounding: bool = True,
    ) -> None:
        super().__init__()
        if getattr(margin, "kind", None) != "margin":
            raise TypeError(f"PartialFC needs a margin head (kind 'margin'), got {margin!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if update not in ("sparse", "dense"):
            raise ValueError(f"update must be 'sparse' or 'dense', got {update!r}")
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(
                f"need embedding_size, num_classes >= 1, got {embedding_size}, {num_classes}"
            )
        self.margin = margin
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.update = update
        self.weight_dtype = as_dtype(weight_dtype)
        self.state_dtype = (
            master_dtype(self.weight_dtype)
            if state_dtype is None
            else as_dtype(state_dtype, "state_dtype")
        )
        self.stochastic_rounding = stochastic_rounding
        self.seed = int(seed)
        self.rank, self.world_size = get_rank(), get_world_size()
        self.class_start, self.class_stop = shard_range(num_classes, self.rank, self.world_size)
        self.num_local = self.class_stop - self.class_start
        self.num_sample = int(self.sample_rate * self.num_local)
        self.sub_centers = int(getattr(margin, "sub_centers", 1))
        self.num_rows = self.num_local * self.sub_centers
        self._takes_norms = takes_norms(margin)
        k = self.sub_centers
        # Sub-centre rows are rows of a [C·K, D] matrix: still world-size independent.
        weight = init_rows(
            self.class_start * k,
            self.class_stop * k,
            num_classes * k,
            embedding_size,
            std=init_std,
            seed=seed,
            dtype=self.weight_dtype,
        )
        self.register_buffer("weight", weight, persistent=False)
        self.optimizer: PartialFCOptimizer | None = None
        self.sampled_index: torch.Tensor | None = None
        self.sampled_weight: torch.Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._pending_rows: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        self._pending_optimizer: str | None = None
        self._workspace = kernels.Workspace()

    # ------------------------------------------------------------------ forward
    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Global mean loss of the batch (same value on every rank).

        Args:
            local_embeddings: ``[B_local, D]`` any float dtype (bf16/fp16 under autocast).
            local_labels: ``[B_local]`` int class ids in [0, C).

        Returns:
            Scalar fp32 (fp64 for fp64 weights and embeddings) loss.
        """
        check_local_batch(local_embeddings, local_labels, self.embedding_size, "PartialFC")
        device = self.weight.device
        global_labels = all_gather_no_grad(local_labels.to(device=device, dtype=torch.long))
        self._check_labels(global_labels)
        global_embeddings = all_gather_with_grad(local_embeddings)
        compute_dtype = master_dtype(torch.promote_types(local_embeddings.dtype, self.weight.dtype))
        index, target = self.sample(global_labels)
        if self.sub_centers > 1:  # all K rows of each sampled class, class-major
            k = self.sub_centers
            index = (index.unsqueeze(1) * k + torch.arange(k, device=index.device)).flatten()
        normalized = getattr(self.margin, "normalized", True)
        fused = normalized and self.sub_centers == 1 and kernels.fused(self.margin)
        sub, source = self._sampled_leaf(index, compute_dtype, lazy=fused)
        self.sampled_index, self.sampled_weight = index, sub

        with torch.autocast(device_type=device.type, enabled=False):
            x = global_embeddings.to(compute_dtype)
            head_kw = {"norms": x.norm(dim=1)} if self._takes_norms else {}
            if fused:
                # Cosines, margin and cross-entropy in one blockwise kernel; the penalty terms
                # see the [N] target cosines as an [N, 1] matrix (column 0, or -1 elsewhere).
                x_hat = F.normalize(x, dim=1)
                if getattr(self.margin, "batch_inputs", ()):
                    local_cos = lambda: kernels.target_cosines(x_hat, sub, target, source)  # noqa: E731
                    self.margin.prepare_batch(**self._head_inputs(x, local_cos))
                loss, cos_t = kernels.CosineCrossEntropy.apply(
                    x_hat, sub, target, self.margin, head_kw.get("norms"), source, self._workspace
                )
                cosine, extra_target = cos_t.unsqueeze(1), torch.where(target >= 0, 0, -1)
            else:
                if normalized:
                    cosine = kernels.CosineLinear.apply(F.normalize(x, dim=1), sub)
                else:
                    cosine = x @ sub.t()
                if self.sub_centers > 1:
                    cosine = self.margin.reduce_sub_centers(cosine)
                if getattr(self.margin, "batch_inputs", ()):
                    local_cos = lambda: _gather_target(cosine.detach(), target)  # noqa: E731
                    self.margin.prepare_batch(**self._head_inputs(x, local_cos))
                if isinstance(self.margin, MarginHead) and not head_kw:
                    loss = kernels.ShardedCrossEntropy.apply(cosine, target, self.margin)
                else:
                    logits = self.margin(cosine, target, **head_kw)
                    loss = kernels.ShardedCrossEntropy.apply(logits, target, None)
                extra_target = target
            extra_fn = getattr(self.margin, "extra_loss_sum", None)
            if extra_fn is not None and (
                getattr(self.margin, "has_extra_loss", False)
                or getattr(self.margin, "intra_alpha", 0.0) > 0
            ):
                # The per-sample penalty of sample i lives on the one shard holding its class:
                # the local part carries the gradient, the all-reduced total gives the value.
                local_extra = extra_fn(cosine, extra_target, **head_kw) / x.shape[0]
                total_extra = all_reduce(local_extra.detach().clone(), "sum")
                loss = loss + local_extra + (total_extra - local_extra.detach())
        if self.optimizer is not None:
            self.optimizer.attach(sub, index)
        return loss

    # ------------------------------------------- per-batch inputs of adaptive margin heads
    def _head_inputs(
        self, x: torch.Tensor, local_target_cosine: Callable[[], torch.Tensor]
    ) -> dict[str, Any]:
        """What the margin head lists in ``batch_inputs``, over the *global* batch.

        The values are the same on every rank, so the head's running state is too
        (``heads.margins_adaptive`` names the inputs):

        - ``"num_rows"``: N.
        - ``"norms"``: ``[N]`` ‖x_i‖ before normalisation, with autograd. Every rank holds the
          whole gathered batch, so these are the global batch's norms: no collective.
        - ``"target_cosine"``: ``[N]`` cos θ_{y_i}, detached. Row i's class lives on exactly one
          shard: each rank puts its own rows' target cosines in a zero vector and an
          all-reduce (sum; N values) completes it on every rank.
        """
        out: dict[str, Any] = {}
        for name in self.margin.batch_inputs:
            if name == "num_rows":
                out[name] = x.shape[0]
            elif name == "norms":
                out[name] = x.norm(dim=1)
            elif name == "target_cosine":
                # ``local_target_cosine()``: [N] this shard's target cosines, 0 elsewhere
                out[name] = all_reduce(local_target_cosine(), "sum")
            else:
                raise ValueError(
                    f"PartialFC: margin head {type(self.margin).__name__} asks for the batch "
                    f"input {name!r}; known: num_rows, norms, target_cosine"
                )
        return out

    def _check_labels(self, global_labels: torch.Tensor) -> None:
        """Raises ``ValueError`` naming the first label outside [0, C), for labels on the host.

        Labels on an accelerator are not checked here: that would read the device back every
        step. The training loader checks them on the host before they travel
        (:func:`dist_train.data.loader.check_label_range`).
        """
        if global_labels.numel() == 0 or global_labels.device.type != "cpu":
            return
        labels = global_labels.numpy()
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            pos = int(bad[0])
            raise ValueError(
                f"PartialFC: label {int(labels[pos])} at position {pos} of the global "
                f"batch is outside [0, {self.num_classes})"
            )

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(
                self.seed * 7919 + 104729 * self.rank + 1
            )
            self._generators[device] = gen
        return gen

    def sample_size(self, global_batch: int) -> int:
        """S, the rows of the shard a step with ``global_batch`` samples uses.

        ``min(C_local, max(int(r·C_local), global_batch))``: room for every positive whatever
        the labels (a shard holds at most ``global_batch`` of them), fixed per batch size so
        that the step has no data-dependent shape and reads nothing back to the host.
        """
        return min(self.num_local, max(self.num_sample, int(global_batch)))

    def sample(self, global_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chooses this step's rows of the shard.

        Args:
            global_labels: ``[N]`` int64 class ids of the global batch.

        The negatives cost O(S), not O(C_local), where S is a small part of the shard
        (:func:`candidate_draws`): random rows are drawn with replacement, and the first
        distinct ones in draw order that are not positives fill the sample (sequential
        sampling without replacement, hence a uniform subset). No host read either way.

        Returns:
            ``index``: ``[S]`` sorted int64 shard rows, S = :meth:`sample_size` of N, every
            positive included, the other rows a uniform random subset of the negatives;
            ``target``: ``[N]`` int64 column of each sample's class in ``index``, or -1 when its
            class is on another shard.
        """
        device = global_labels.device
        local = global_labels - self.class_start
        on_shard = (local >= 0) & (local < self.num_local)
        num = self.sample_size(global_labels.shape[0])
        if num >= self.num_local:
            index = torch.arange(self.num_local, device=device)
            return index, torch.where(on_shard, local, torch.full_like(local, -1))
        row = local.clamp(0, self.num_local - 1)
        draws = candidate_draws(self.num_local, num)
        if draws is not None:
            index = _sample_by_draws(
                row, on_shard, self.num_local, num, draws, self._generator(device)
            )
        else:
            # Uniform scores in [0, 1) with positives forced to 2 (a max-scatter: other shards'
            # samples point at row 0 with a 0 that changes nothing): the top-S are the
            # positives plus a uniformly random subset of the negatives. O(C_local): used
            # where S is a large part of the shard anyway (see candidate_draws).
            score = torch.rand(self.num_local, device=device, generator=self._generator(device))
            score.scatter_reduce_(0, row, on_shard.to(score.dtype).mul_(2.0), reduce="amax")
            index = torch.topk(score, num, sorted=False).indices.sort().values
        column = torch.searchsorted(index, row)
        return index, torch.where(on_shard, column, torch.full_like(local, -1))

    def _sampled_leaf(
        self, index: torch.Tensor, dtype: torch.dtype, lazy: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The ``[S, D]`` leaf whose ``.grad`` is the sampled rows' gradient, and where the
        fused kernel reads the rows (``None``: from the leaf's values).

        ``lazy`` (the fused kernel): the leaf is a zero-stride view, no ``[S, D]`` copy of the
        rows is made, and the kernel gathers them from the shard block by block.
        """
        if index.numel() == self.num_rows and self.weight.dtype == dtype:
            # Every row is used: alias the shard instead of copying it (saves C_local·D·4 B).
            return self.weight.detach().requires_grad_(True), None
        if lazy:
            leaf = self.weight.new_zeros((), dtype=dtype).expand(index.numel(), self.embedding_size)
            return leaf.requires_grad_(True), (self.weight, index)
        return self.weight.index_select(0, index).to(dtype).requires_grad_(True), None

    # ---------------------------------------------------------------- optimizer
    def configure_optimizer(self, name: str = "sgd", **hyperparameters: Any) -> PartialFCOptimizer:
        """Creates ``self.optimizer`` for the shard (``"sgd"``, ``"adam"`` or ``"adamw"``).

        Args:
            name: the rule.
            **hyperparameters: fields of :class:`dist_train.optim.OptimSpec` (``lr``,
                ``momentum``, ``weight_decay``, ``betas``, ``eps``, ``nesterov``); the others
                are :data:`DEFAULT_OPTIM`'s.

        Optimizer rows loaded before this call are applied now.
        """
        spec = dataclasses.replace(DEFAULT_OPTIM, name=name, **hyperparameters)
        self.optimizer = PartialFCOptimizer(self, spec)
        if self._pending_rows:
            if self._pending_optimizer != self.optimizer.name:
                raise ValueError(
                    f"the loaded state holds {self._pending_optimizer!r} optimizer rows, "
                    f"the optimizer configured is {self.optimizer.name!r}"
                )
            for a, b, rows in self._pending_rows:
                self.optimizer.load_rows(a, b, rows)
            self._pending_rows = []
        return self.optimizer

    # -------------------------------------------------------------------- state
    def shard_state(self) -> dict[str, Any]:
        """This rank's rows and optimizer rows, tagged with their class range.

        The format (:mod:`dist_train.sharded_state`, tag ``"partial_fc"``) does not depend on
        the world size: the states of every rank, joined with :func:`merge_state_dicts` (or
        :meth:`gathered_shard_state`), load into any world size. Tensors alias the live ones.
        ``nn.Module.state_dict`` is left as it is (the shard is a non-persistent buffer).
        """
        return build_shard_state(self)

    def gathered_shard_state(self) -> dict[str, Any]:
        """The state of every rank, merged, on every rank (CPU tensors; for small C)."""
        return gather_states(self.shard_state())

    def load_shard_pieces(
        self,
        pieces: dict[str, Any] | StoredState | Sequence[dict[str, Any] | StoredState],
        strict: bool = True,
    ) -> None:
        """Loads rows of this rank's class range from the states of any world size.

        Reads only the pieces that overlap this rank's classes; a stored state
        (:class:`~dist_train.sharded_state.StoredState`) is read a chunk at a time.

        Args:
            pieces: one :meth:`shard_state` (merged, or covering this range) or a list of them,
                in memory or stored.
            strict: raise when the pieces lack some of this rank's classes.
        """
        self._pending_rows = []

        def apply_rows(a: int, b: int, rows: dict[str, torch.Tensor]) -> None:
            if self.optimizer is not None:
                self.optimizer.load_rows(a, b, rows)
            else:  # kept until configure_optimizer; a copy, the rows are only lent
                self._pending_rows.append((a, b, {k: v.clone() for k, v in rows.items()}))

        self._pending_optimizer = read_shard_pieces(self, pieces, apply_rows, strict=strict)

    def sampler_state(self) -> dict[str, Any]:
        """The negative-sampling stream of this rank (its generators' states)."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "states": {str(d): g.get_state() for d, g in self._generators.items()},
        }

    def load_sampler_state(self, sampler: dict[str, Any] | None) -> None:
        """Restores a :meth:`sampler_state` written by this rank at this world size.

        A stream of another rank or world size (or none) leaves the seeded stream alone.
        """
        if (
            not sampler
            or sampler.get("world_size") != self.world_size
            or sampler.get("rank") != self.rank
        ):
            return
        for name, state in sampler.get("states", {}).items():
            device = torch.device(name)
            try:
                gen = torch.Generator(device=device)
                gen.set_state(state)
            except (RuntimeError, ValueError):  # saved on a device this process does not have
                continue
            self._generators[device] = gen

    def extra_repr(self) -> str:
        return (
            f"classes=[{self.class_start}, {self.class_stop}) of {self.num_classes}, "
            f"D={self.embedding_size}, sub_centers={self.sub_centers}, "
            f"sample_rate={self.sample_rate}, update={self.update}, "
            f"weight_dtype={self.weight_dtype}, state_dtype={self.state_dtype}"
        )


SAMPLING_TAIL = 50.0
"""The draws of :func:`candidate_draws` fall short of S distinct rows with probability at most
exp(−SAMPLING_TAIL) ≈ 2e-22 per step."""


@functools.lru_cache(maxsize=64)
def candidate_draws(num_rows: int, num: int) -> int | None:
    """Draws T (with replacement) that hold ``num`` distinct rows of ``num_rows`` but for a
    probability below exp(−:data:`SAMPLING_TAIL`); ``None`` where T + ``num`` exceeds half
    the rows (then scoring every row costs no more).

    The draws needed for k distinct rows are a sum of geometric variables with success
    probabilities (n − i)/n, mean μ = Σ_{i<k} n/(n − i); Janson's tail bound gives
    P(W > λμ) ≤ exp(−p·μ·(λ − 1 − ln λ)), p = (n − k + 1)/n. Positives only lower the number
    of negatives to find and the mean, so k = ``num`` bounds every batch.
    """
    n, k = num_rows, num
    if k <= 0 or k >= n:
        return None
    mu = n * math.log((n + 0.5) / (n - k + 0.5))  # Σ n/(n − i), to O(k/n²)
    p = (n - k + 1) / n
    lo, hi = 1.0, 2.0
    while p * mu * (hi - 1 - math.log(hi)) < SAMPLING_TAIL:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p * mu * (mid - 1 - math.log(mid)) < SAMPLING_TAIL else (lo, mid)
    draws = math.ceil(hi * mu * 1.001) + 1
    return draws if draws + k <= n // 2 else None


def _sample_by_draws(
    row: torch.Tensor,
    on_shard: torch.Tensor,
    n: int,
    num: int,
    draws: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """``[num]`` sorted distinct rows of ``[0, n)``: the positives ``row[on_shard]``, then the
    first distinct non-positive rows of ``draws`` uniform draws, in draw order.

    Fixed shapes, no host read: every candidate gets a priority key (positives 0, the j-th
    draw 1 + j, the rest excluded), one sort by (row, key) keeps the smallest key of each row,
    and the ``num`` smallest keys win: O(S log S) whatever C_local. The rows ``[0, num)`` take
    part last (keys after every draw), so ``num`` distinct rows exist even in the (< 2e-22)
    case of too few distinct draws.
    """
    device = row.device
    cand = torch.randint(n, (draws,), device=device, generator=gen)
    excluded = 2 + draws + num
    values = torch.cat([row, cand, torch.arange(num, device=device)])
    keys = torch.cat(
        [
            torch.where(on_shard, 0, excluded),
            torch.arange(1, draws + 1, device=device),
            torch.arange(draws + 1, draws + 1 + num, device=device),
        ]
    )
    order = torch.sort(values * (excluded + 1) + keys).values  # by row, then by key
    values, keys = order // (excluded + 1), order % (excluded + 1)
    repeat = torch.zeros_like(keys, dtype=torch.bool)
    repeat[1:] = values[1:] == values[:-1]
    keys.masked_fill_(repeat, excluded)
    # exactly `num` keys are <= the num-th smallest (the keys below `excluded` are distinct
    # but for the positives' 0, all chosen); in row order already
    last = torch.kthvalue(keys, num).values
    return values.index_select(0, torch.nonzero_static(keys <= last, size=num).squeeze(1))


def _gather_target(cosine: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N]`` ``cosine[i, target[i]]``, 0 where ``target[i] < 0`` or the shard is empty."""
    if cosine.shape[1] == 0:  # a shard without classes only joins the all-reduce
        return cosine.new_zeros(cosine.shape[0])
    mine = cosine.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(target >= 0, mine, 0.0)


def build_partial_fc(
    margin: nn.Module,
    pfc_cfg: Any,
    optim_cfg: Any,
    *,
    embedding_size: int,
    num_classes: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> PartialFC:
    """PartialFC on ``device`` with its optimizer, from the config sections.

    Args:
        margin: the margin head (for a ``kind == "combined"`` head, pass ``head.margin``).
        pfc_cfg: a :class:`dist_train.config.PartialFCConfig` (sample_rate, update,
            weight_dtype, state_dtype, lr_scale).
        optim_cfg: a :class:`dist_train.config.OptimConfig`; the classifier's learning rate is
            ``optim_cfg.lr * pfc_cfg.lr_scale`` (the trainer rescales it with the schedule).
        embedding_size, num_classes: D and C.
        device: where the shard and its optimizer state live.
        seed: initial rows and sampling.
    """
    pfc = PartialFC(
        margin,
        embedding_size,
        num_classes,
        sample_rate=pfc_cfg.sample_rate,
        update=pfc_cfg.update,
        weight_dtype=pfc_cfg.weight_dtype,
        state_dtype=pfc_cfg.state_dtype,
        seed=seed,
    ).to(device)
    # The optimizer rows are allocated on the shard's device: create it after the move.
    spec = OptimSpec.from_config(optim_cfg, lr_scale=pfc_cfg.lr_scale)
    pfc.configure_optimizer(spec.name, **spec.hyperparameters())
    return pfc

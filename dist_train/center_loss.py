"""Center loss (Wen et al. 2016) with its class centres sharded by class across ranks.

Owns :class:`ShardedCenterLoss`: the centre matrix ``[C, D]`` split into contiguous class
ranges exactly like the Partial FC weights (:func:`dist_train.distributed.shard_range`), the
loss over the global batch, the two centre-update rules, and a world-size-free state in the
class-sharded format of :mod:`dist_train.sharded_state` (:meth:`ShardedCenterLoss.shard_state`,
:meth:`ShardedCenterLoss.load_shard_pieces`; format tag ``"center_loss"``). Does not own the
softmax/margin term it is added to (Partial FC does), the optimizer rules
(:mod:`dist_train.optim`) or the backbone's gradient sync (the trainer's DDP hook does).

The loss, with ``λ = weight`` and ``N = B_global``::

    L_C = λ / (2N) · Σ_i ||x_i − c_{y_i}||²

How one step runs on rank r (holding centres of classes ``[start, stop)``):

1. All-gather embeddings (:func:`~dist_train.collectives.all_gather_with_grad`, whose backward
   sums every rank's gradient for a row) and labels.
2. Rank r computes the part of the sum over the samples whose class it owns.
3. The parts are all-reduced (forward only) so the loss is the full ``L_C`` on every rank,
   while autograd sees only rank r's part. Summed by the gather's backward, the parts' gradients
   give each rank exactly the single-process gradient of ``L_C`` for its local embeddings, and
   each centre shard gets exactly the gradient of ``L_C`` for its rows.

Centre updates (``update=``):

- ``"gradient"``: centres are an ``nn.Parameter`` updated by this module's own optimizer
  (:meth:`configure_optimizer`, typically SGD with its own learning rate; with momentum or
  Adam, rows of classes absent from the batch keep moving on their state). The gradient of a
  centre is ``−λ/N · Σ_{i: y_i=j} (x_i − c_j)``.
- ``"alpha"``: the paper's rule, applied in :meth:`forward` when the module is in training
  mode, after the loss has been computed with the old centres and using the global batch::

      Δc_j = Σ_{i: y_i=j} (c_j − x_i) / (1 + n_j),    c_j ← c_j − α · Δc_j

  (``n_j`` = samples of class j in the global batch; classes absent from the batch do not
  move). Centres are then a buffer without gradient and there is no optimizer.

Keep this module out of DDP: its centre gradients are already exact per shard and must not be
summed or averaged over ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dist_train.collectives import all_gather_no_grad, all_gather_with_grad, check_local_batch
from dist_train.distributed import all_reduce, get_rank, get_world_size, shard_range
from dist_train.optim import OptimSpec, make_optimizer
from dist_train.sharded_state import (
    Source,
    StoredState,
    check_covered,
    check_sources,
    gather_states,
    make_state,
    open_source,
    owned_chunks,
    select_owned,
)

DEFAULT_OPTIM = OptimSpec("sgd", lr=0.5, momentum=0.0, weight_decay=0.0)
"""Hyper-parameters of :meth:`ShardedCenterLoss.configure_optimizer` that a call leaves out."""

FORMAT = "center_loss"
"""Format tag of a center-loss state (:mod:`dist_train.sharded_state`)."""

LEGACY_FORMAT = "sharded_center_loss/v1"
"""Tag of the gathered layout that :meth:`ShardedCenterLoss.load_shard_pieces` also reads: one
state, the same on every rank, with the full ``centers`` [C, D] and an ``optimizer`` holding
``param_groups``, full ``[C, D]`` ``rows`` and ``scalars``."""


class ShardedCenterLoss(nn.Module):
    """Center loss whose centres are sharded by class over the ranks.

    Args:
        num_classes: number of classes C.
        embedding_size: embedding dimension D.
        update: ``"gradient"`` (own optimizer) or ``"alpha"`` (the paper's rule).
        alpha: rate α of the ``"alpha"`` rule (the paper uses 0.5).
        weight: factor λ of the loss.
        dtype: storage dtype of the centres (the loss is computed in at least float32).
        device: device of the centres (default: CPU; pass ``DistInfo.device``).

    Attributes:
        centers_shard: ``[C_local, D]`` centres of classes ``[start, stop)``, zero-initialised
            (an ``nn.Parameter`` in ``"gradient"`` mode, a buffer in ``"alpha"`` mode).
        optimizer: the optimizer of :meth:`configure_optimizer` (``"gradient"`` mode).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        update: str = "gradient",
        alpha: float = 0.5,
        weight: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if update not in ("gradient", "alpha"):
            raise ValueError(f"center loss: update={update!r} is not one of ['gradient', 'alpha']")
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(
                f"center loss: num_classes and embedding_size must be >= 1, got "
                f"{num_classes}, {embedding_size}"
            )
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.update = update
        self.alpha = float(alpha)
        self.weight = float(weight)
        self.rank, self.world_size = get_rank(), get_world_size()
        self.start, self.stop = shard_range(self.num_classes, self.rank, self.world_size)
        shard = torch.zeros(self.stop - self.start, embedding_size, dtype=dtype, device=device)
        if update == "gradient":
            self.centers_shard = nn.Parameter(shard)
        else:
            self.register_buffer("centers_shard", shard)
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer_state: dict[str, Any] | None = None

    def configure_optimizer(
        self, name: str = "sgd", **hyperparameters: Any
    ) -> torch.optim.Optimizer:
        """Creates ``self.optimizer`` over the centre shard (``"gradient"`` mode only).

        Args:
            name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
            **hyperparameters: fields of :class:`dist_train.optim.OptimSpec` (``lr``,
                ``momentum``, ``nesterov``, ``weight_decay`` (usually 0), ``betas``, ``eps``);
                the others are :data:`DEFAULT_OPTIM`'s.

        Returns:
            The optimizer (also stored as ``self.optimizer``).
        """
        if self.update != "gradient":
            raise ValueError(
                "center loss: configure_optimizer needs update='gradient'; the 'alpha' rule "
                "updates the centres itself"
            )
        spec = dataclasses.replace(DEFAULT_OPTIM, name=name, **hyperparameters)
        opt = make_optimizer([self.centers_shard], spec)
        self.optimizer = opt
        if self._pending_optimizer_state is not None:
            self._load_optimizer(self._pending_optimizer_state)
            self._pending_optimizer_state = None
        return opt

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Center loss of the global batch; identical on every rank (collective).

        Args:
            local_embeddings: ``[B_local, D]`` float, this rank's embeddings.
            local_labels: ``[B_local]`` int64 in ``[0, C)``.

        Returns:
            Scalar ``λ/(2N) Σ ||x_i − c_{y_i}||²`` over the global batch, in at least float32.
        """
        check_local_batch(local_embeddings, local_labels, self.embedding_size, "center loss")
        global_embeddings = all_gather_with_grad(local_embeddings)
        global_labels = all_gather_no_grad(local_labels)
        if global_labels.numel() and global_labels.device.type == "cpu":
            # Checked on the host only: labels on an accelerator would cost a host read per
            # step (the training loader checks them before they travel).
            labels = global_labels.numpy()
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"center loss: labels must be in [0, {self.num_classes}), the global batch "
                    f"has labels in [{lo}, {hi}]"
                )
        n_global = max(1, global_labels.numel())
        compute_dtype = torch.promote_types(self.centers_shard.dtype, torch.float32)
        num_local = self.stop - self.start
        with torch.autocast(global_embeddings.device.type, enabled=False):
            # Every sample takes part with a fixed shape (no data-dependent selection, no host
            # read); samples of other ranks' classes point at row 0 and are masked out.
            mine = (global_labels >= self.start) & (global_labels < self.stop)
            x = global_embeddings.to(compute_dtype)
            if num_local == 0:
                # Still connected to the gather: every rank must reach its backward.
                rows, partial = global_labels[:0], x[:0].sum() * 0.0
            else:
                rows = (global_labels - self.start).clamp(0, num_local - 1)
                centers = self.centers_shard.index_select(0, rows).to(compute_dtype)
                per_sample = torch.where(mine, (x - centers).pow(2).sum(dim=1), 0.0)
                partial = per_sample.sum() * (self.weight / (2.0 * n_global))
            total = all_reduce(partial.detach().clone(), "sum")
            # The value is the full loss; autograd sees only this rank's part.
            loss = partial + (total - partial.detach())
        if self.update == "alpha" and self.training and num_local:
            self._alpha_update(x.detach(), rows, mine)
        return loss

    @torch.no_grad()
    def _alpha_update(self, x: torch.Tensor, rows: torch.Tensor, mine: torch.Tensor) -> None:
        shard = self.centers_shard
        weight = mine.to(x.dtype)
        counts = x.new_zeros(shard.shape[0]).index_add_(0, rows, weight)[:, None]
        sums = x.new_zeros(shard.shape).index_add_(0, rows, x * weight[:, None])
        delta = (counts * shard.to(x.dtype) - sums) / (1.0 + counts)
        shard.sub_((self.alpha * delta).to(shard.dtype))

    # ---- world-size-free state ----

    def shard_state(self) -> dict[str, Any]:
        """This rank's centres (and optimizer rows), tagged with their class range.

        The format (:mod:`dist_train.sharded_state`, tag ``"center_loss"``) does not depend on
        the world size: the states of every rank load into any world size
        (:meth:`load_shard_pieces`). The piece holds ``centers`` ``[C_local, D]`` and, once the
        optimizer has state, its per-class ``rows`` (``momentum_buffer``, ``exp_avg``, …); the
        header's ``optimizer`` holds its ``param_groups`` and ``scalars`` (such as Adam's
        ``step``, copied). Row tensors alias the live ones. ``nn.Module.state_dict`` is left
        as it is.
        """
        rows: dict[str, torch.Tensor] = {}
        header = None
        if self.optimizer is not None:
            opt = self.optimizer.state_dict()
            scalars = {}
            for key, value in sorted(opt["state"].get(0, {}).items()):
                if torch.is_tensor(value) and value.shape == self.centers_shard.shape:
                    rows[key] = value
                else:
                    scalars[key] = value.clone() if torch.is_tensor(value) else value
            header = {"param_groups": opt["param_groups"], "scalars": scalars}
        return make_state(
            FORMAT,
            num_classes=self.num_classes,
            embedding_size=self.embedding_size,
            start=self.start,
            stop=self.stop,
            tensors={"centers": self.centers_shard.detach()},
            optimizer_rows=rows,
            optimizer=header,
        )

    def gathered_shard_state(self) -> dict[str, Any]:
        """The state of every rank, merged, on every rank (CPU tensors; collective)."""
        return gather_states(self.shard_state())

    def load_shard_pieces(self, pieces: Source | Sequence[Source], strict: bool = True) -> None:
        """Loads this rank's rows from the states of any world size (or a merged one).

        Reads only the pieces that overlap this rank's classes; a stored state
        (:class:`~dist_train.sharded_state.StoredState`) is read a chunk at a time. Also reads
        the gathered state of :data:`LEGACY_FORMAT`. The optimizer part is applied now if
        :meth:`configure_optimizer` was called, otherwise when it is.

        Args:
            pieces: one :meth:`shard_state` (merged, or covering this range) or a list of them,
                in memory or stored.
            strict: raise when the pieces lack some of this rank's classes, or hold optimizer
                state while ``update='alpha'``.

        Raises:
            ValueError: when the format, C or D differ, naming the key.
        """
        sources = [pieces] if isinstance(pieces, (dict, StoredState)) else list(pieces)
        first = sources[0] if sources else None
        if first is not None and not (isinstance(first, StoredState) and first.recorded):
            # a checkpoint that records ranges never holds the legacy layout
            state = open_source(first)
            if state.get("format") == LEGACY_FORMAT:
                # every rank wrote the same gathered state: the first one is all of it
                sources = [_from_legacy(state, self.num_classes, self.embedding_size)]
        parts = select_owned(sources, self.start, self.stop)
        header = check_sources(
            parts, sources, FORMAT, self.num_classes, self.embedding_size, "center loss"
        ).get("optimizer")
        if strict:
            check_covered(parts, self.start, self.stop, who="center loss", rank=self.rank)
        if header and self.update != "gradient" and strict:
            raise ValueError("center loss state: key 'optimizer' present but update='alpha'")
        rows: dict[str, torch.Tensor] = {}
        device = self.centers_shard.device
        for dst, src, piece in owned_chunks(parts):
            with torch.no_grad():
                self.centers_shard[dst].copy_(piece["centers"][src])
            if not header or self.update != "gradient":
                continue
            for key, value in piece["rows"].items():
                if key not in rows:
                    # A copy: the optimizer updates its state in place and must not write into
                    # the loaded pieces.
                    shape = (self.stop - self.start, *value.shape[1:])
                    rows[key] = torch.zeros(shape, dtype=value.dtype, device=device)
                rows[key][dst].copy_(value[src])
        if header and self.update == "gradient":
            saved = {**header, "rows": rows}
            if self.optimizer is None:
                self._pending_optimizer_state = saved
            else:
                self._load_optimizer(saved)

    def _load_optimizer(self, saved: dict[str, Any]) -> None:
        assert self.optimizer is not None
        param_state = dict(saved["rows"])
        param_state.update(
            {k: v.clone() if torch.is_tensor(v) else v for k, v in saved["scalars"].items()}
        )
        groups = [dict(g, params=[0]) for g in saved["param_groups"]]
        self.optimizer.load_state_dict(
            {"state": {0: param_state} if param_state else {}, "param_groups": groups}
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"classes=[{self.start}, {self.stop}), update={self.update!r}, alpha={self.alpha}, "
            f"weight={self.weight}"
        )


def _from_legacy(state: dict[str, Any], num_classes: int, embedding_size: int) -> dict[str, Any]:
    """The :data:`LEGACY_FORMAT` gathered state as one piece of every class."""
    for key, want in (("num_classes", num_classes), ("embedding_size", embedding_size)):
        if state.get(key) != want:
            raise ValueError(
                f"center loss state: key {key!r} is {state.get(key)!r}, expected {want!r}"
            )
    centers = state["centers"]
    if tuple(centers.shape) != (num_classes, embedding_size):
        raise ValueError(
            f"center loss state: key 'centers' has shape {tuple(centers.shape)}, "
            f"expected {(num_classes, embedding_size)}"
        )
    opt = state.get("optimizer")
    header = {"param_groups": opt["param_groups"], "scalars": opt["scalars"]} if opt else None
    return make_state(
        FORMAT,
        num_classes=num_classes,
        embedding_size=embedding_size,
        start=0,
        stop=num_classes,
        tensors={"centers": centers},
        optimizer_rows=opt["rows"] if opt else {},
        optimizer=header,
    )

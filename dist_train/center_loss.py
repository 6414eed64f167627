"""Center loss (Wen et al. 2016) with its class centres sharded by class across ranks.

Owns :class:`ShardedCenterLoss`: the centre matrix ``[C, D]`` split into contiguous class
ranges exactly like the Partial FC weights (:func:`dist_train.distributed.shard_range`), the
loss over the global batch, the two centre-update rules, and a world-size-free state in the
class-sharded format of :mod:`dist_train.sharded_state` (:meth:`ShardedCenterLoss.shard_state`,
:meth:`ShardedCenterLoss.load_shard_pieces`; format tag ``"center_loss"``), and
:class:`HalfRowsOptimizer`, the optimizer of centres or optimizer state stored in half precision.
Does not own the softmax/margin term it is added to (Partial FC does), the optimizer rules
(:mod:`dist_train.optim`), the storage dtypes and their rounding
(:mod:`dist_train.partial_fc.dtypes`) or the backbone's gradient sync (the trainer's DDP hook
does).

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

Precision (``dtype``, ``state_dtype``, the names and rules of Partial FC's ``weight_dtype`` and
``state_dtype``): centres and their optimizer state may be stored in bfloat16 (or float16;
fp16 state for SGD momentum only). With both in fp32 the optimizer is ``torch.optim``'s; with
either in half precision it is :class:`HalfRowsOptimizer`: the same rule
(:func:`dist_train.optim.update_rows`) in fp32 a chunk of rows at a time, written back with
stochastic rounding, no fp32 master copy. The centres' gradient is in the centres' dtype
(autograd rounds it to nearest once). The ``"alpha"`` rule also updates in fp32 and rounds
stochastically. A state of any dtype loads into any other.

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
from dist_train.optim import OptimSpec, make_optimizer, row_state_names
from dist_train.partial_fc.dtypes import (
    as_dtype,
    check_state_dtype,
    master_dtype,
    store_rounded,
)
from dist_train.partial_fc.optimizer import update_stored_rows
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
        dtype: storage dtype of the centres (the loss is computed in at least float32):
            float32, bfloat16, float16 (float64 for tests), a dtype or its name.
        state_dtype: storage dtype of the optimizer state (``"gradient"`` mode); default: the
            maths dtype (fp32, fp64 for fp64 centres). fp16 only for SGD momentum.
        stochastic_rounding: round updates into half-precision storage stochastically.
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
        dtype: torch.dtype | str = torch.float32,
        state_dtype: torch.dtype | str | None = None,
        stochastic_rounding: bool = True,
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
        dtype = as_dtype(dtype, "center loss dtype")
        self.state_dtype = (
            master_dtype(dtype)
            if state_dtype is None
            else as_dtype(state_dtype, "center loss state_dtype")
        )
        self.stochastic_rounding = bool(stochastic_rounding)
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
            The optimizer (also stored as ``self.optimizer``): ``torch.optim``'s when centres
            and state are stored in their maths dtype, otherwise a :class:`HalfRowsOptimizer`.
        """
        if self.update != "gradient":
            raise ValueError(
                "center loss: configure_optimizer needs update='gradient'; the 'alpha' rule "
                "updates the centres itself"
            )
        spec = dataclasses.replace(DEFAULT_OPTIM, name=name, **hyperparameters)
        maths = master_dtype(self.centers_shard.dtype)
        if self.centers_shard.dtype == maths and self.state_dtype == maths:
            opt = make_optimizer([self.centers_shard], spec)
        else:
            opt = HalfRowsOptimizer(
                self.centers_shard, spec, self.state_dtype, self.stochastic_rounding
            )
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
        if shard.dtype == x.dtype:
            shard.sub_(self.alpha * delta)
        else:  # half storage: the new centres in fp32, rounded stochastically
            new = shard.to(x.dtype).sub_(self.alpha * delta)
            shard.copy_(store_rounded(new, shard.dtype, self.stochastic_rounding))

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
        # keys one optimizer class has and the other lacks (torch's SGD "dampening", …) keep
        # the configured optimizer's values: a state of either class loads into the other
        current = self.optimizer.state_dict()["param_groups"]
        groups = [{**c, **g, "params": [0]} for c, g in zip(current, saved["param_groups"])]
        self.optimizer.load_state_dict(
            {"state": {0: param_state} if param_state else {}, "param_groups": groups}
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"classes=[{self.start}, {self.stop}), update={self.update!r}, alpha={self.alpha}, "
            f"weight={self.weight}, dtype={self.centers_shard.dtype}, "
            f"state_dtype={self.state_dtype}"
        )


class HalfRowsOptimizer(torch.optim.Optimizer):
    """SGD (momentum, Nesterov) / Adam / AdamW over one ``[C_local, D]`` centre shard whose
    values or state are stored in half precision.

    The rule is :func:`dist_train.optim.update_rows` (the one Partial FC uses), applied in the
    maths dtype (fp32) to :data:`CHUNK_ROWS` rows at a time and written back with stochastic
    rounding (``stochastic_rounding``) into the shard's and the state's dtypes; nothing of
    the shard's size is kept in fp32. Every row is updated every step, like ``torch.optim``'s
    dense step (rows of absent classes have a zero gradient). The state has
    ``torch.optim``'s layout (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq`` and a scalar
    ``step``), so the centre state saves and loads the same way whichever optimizer wrote
    it; :meth:`load_state_dict` casts loaded rows to ``state_dtype``. fp16 momentum is
    checked against fp16's range at every step (one host read).
    """

    CHUNK_ROWS = 8192
    """Rows updated at once (temporaries of ~16 MB at D = 512)."""

    def __init__(
        self,
        param: torch.Tensor,
        spec: OptimSpec,
        state_dtype: torch.dtype,
        stochastic_rounding: bool = True,
    ) -> None:
        check_state_dtype(state_dtype, spec.name, key="center loss state_dtype")
        super().__init__([param], spec.hyperparameters())
        self.name = spec.name
        self.state_dtype = state_dtype
        self.stochastic_rounding = stochastic_rounding
        self._rows = [k for k in row_state_names(spec) if k != "step"]

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            for key in self._rows:
                state[key] = torch.zeros_like(p, dtype=self.state_dtype)
            if self.name != "sgd":
                state["step"] = torch.tensor(0.0)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        (p,) = group["params"]
        if p.grad is None:
            return loss
        state = self._state(p)
        maths = master_dtype(torch.promote_types(p.dtype, self.state_dtype))
        overflow = None
        for a in range(0, p.shape[0], self.CHUNK_ROWS):
            b = min(a + self.CHUNK_ROWS, p.shape[0])
            rows = {k: state[k][a:b] for k in self._rows}
            if "step" in state:  # per-row counts of update_rows: every row has the same
                rows["step"] = torch.full((b - a,), int(state["step"]), dtype=torch.int32)
            big = update_stored_rows(
                self.name, p[a:b], p.grad[a:b].to(maths, copy=True), rows, group, maths,
                self.stochastic_rounding,
            )  # fmt: skip
            if big is not None:
                overflow = big if overflow is None else overflow | big
        if "step" in state:
            state["step"] += 1
        if overflow is not None and bool(overflow):
            raise FloatingPointError(
                "center loss: SGD momentum exceeds fp16's range (65504); set "
                "head.params.center_loss_state_dtype to bfloat16 or float32"
            )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads hyper-parameters and state of any optimizer of the same rule and any dtype."""
        saved = state_dict["state"].get(0, {})
        super().load_state_dict({**state_dict, "state": {}})
        (p,) = self.param_groups[0]["params"]
        self.state[p] = {
            k: v.to(p.device, self.state_dtype) if k != "step" else v.clone()
            for k, v in saved.items()
        }


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

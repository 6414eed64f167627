"""Center loss (Wen et al. 2016) with its class centres sharded by class across ranks.

Owns :class:`ShardedCenterLoss`: the centre matrix ``[C, D]`` split into contiguous class
ranges exactly like the Partial FC weights (:func:`dist_train.distributed.shard_range`), the
loss over the global batch, the two centre-update rules, and a world-size-free
``state_dict``. Does not own the softmax/margin term it is added to (Partial FC does) or the
backbone's gradient sync (the trainer's DDP hook does).

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

from typing import Any

import torch
from torch import nn

from dist_train.collectives import all_gather_no_grad, all_gather_with_grad
from dist_train.distributed import all_reduce, get_rank, get_world_size, shard_range

_FORMAT = "sharded_center_loss/v1"


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
        self,
        name: str = "sgd",
        lr: float = 0.5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        nesterov: bool = False,
    ) -> torch.optim.Optimizer:
        """Creates ``self.optimizer`` over the centre shard (``"gradient"`` mode only).

        Args:
            name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
            lr: learning rate of the centres.
            momentum, nesterov: SGD momentum.
            weight_decay: weight decay of the centres (usually 0).
            betas, eps: Adam/AdamW.

        Returns:
            The optimizer (also stored as ``self.optimizer``).
        """
        if self.update != "gradient":
            raise ValueError(
                "center loss: configure_optimizer needs update='gradient'; the 'alpha' rule "
                "updates the centres itself"
            )
        params = [self.centers_shard]
        if name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
            )
        elif name in ("adam", "adamw"):
            cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
            opt = cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        else:
            raise ValueError(f"center loss: optimizer {name!r} is not one of sgd, adam, adamw")
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
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"center loss: local_embeddings must be [B, {self.embedding_size}], got "
                f"{tuple(local_embeddings.shape)}"
            )
        if local_labels.shape != local_embeddings.shape[:1]:
            raise ValueError(
                f"center loss: local_labels must be [{local_embeddings.shape[0]}], got "
                f"{tuple(local_labels.shape)}"
            )
        global_embeddings = all_gather_with_grad(local_embeddings)
        global_labels = all_gather_no_grad(local_labels)
        if global_labels.numel():
            lo, hi = int(global_labels.min()), int(global_labels.max())  # CPU-GPU sync point
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"center loss: labels must be in [0, {self.num_classes}), the global batch "
                    f"has labels in [{lo}, {hi}]"
                )
        n_global = max(1, global_labels.numel())
        compute_dtype = torch.promote_types(self.centers_shard.dtype, torch.float32)
        with torch.autocast(global_embeddings.device.type, enabled=False):
            mine = ((global_labels >= self.start) & (global_labels < self.stop)).nonzero()
            mine = mine.squeeze(1)
            rows = global_labels[mine] - self.start
            # Always indexed, even when empty: every rank must reach the gather's backward.
            x = global_embeddings[mine].to(compute_dtype)
            centers = self.centers_shard[rows].to(compute_dtype)
            partial = (x - centers).pow(2).sum() * (self.weight / (2.0 * n_global))
            total = all_reduce(partial.detach().clone(), "sum")
            # The value is the full loss; autograd sees only this rank's part.
            loss = partial + (total - partial.detach())
        if self.update == "alpha" and self.training:
            self._alpha_update(x.detach(), rows)
        return loss

    @torch.no_grad()
    def _alpha_update(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        shard = self.centers_shard
        counts = torch.bincount(rows, minlength=shard.shape[0]).to(x.dtype)[:, None]
        sums = torch.zeros(shard.shape, dtype=x.dtype, device=x.device).index_add_(0, rows, x)
        delta = (counts * shard.to(x.dtype) - sums) / (1.0 + counts)
        shard.sub_((self.alpha * delta).to(shard.dtype))

    # ---- world-size-free state ----

    def _gather_rows(self, shard: torch.Tensor) -> torch.Tensor:
        # Shards are contiguous class ranges in rank order, so concatenation is class order.
        # A copy: at world size 1 the gather is the identity and the saved state must not
        # alias live centres or optimizer buffers.
        return all_gather_no_grad(shard.detach()).to("cpu", copy=True)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """Full centres ``[C, D]`` (and optimizer rows), independent of the world size.

        Collective: call it on every rank; every rank gets the same dict (CPU tensors).
        Keys: ``format``, ``num_classes``, ``embedding_size``, ``update``, ``centers`` and, once
        the optimizer has state, ``optimizer`` with ``param_groups``, ``rows`` (per-class state
        such as ``momentum_buffer`` or ``exp_avg`` as full ``[C, D]`` tensors) and ``scalars``
        (such as Adam's ``step``).
        """
        if args or kwargs:
            raise TypeError(
                "ShardedCenterLoss.state_dict() is collective and world-size-free: save it on "
                "its own (state['center_loss'] = module.state_dict()), not as a submodule"
            )
        state: dict[str, Any] = {
            "format": _FORMAT,
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "update": self.update,
            "centers": self._gather_rows(self.centers_shard),
        }
        if self.optimizer is not None:
            opt = self.optimizer.state_dict()
            param_state = opt["state"].get(0, {})
            rows, scalars = {}, {}
            for key, value in sorted(param_state.items()):
                if torch.is_tensor(value) and value.shape == self.centers_shard.shape:
                    rows[key] = self._gather_rows(value)
                else:
                    scalars[key] = value.to("cpu", copy=True) if torch.is_tensor(value) else value
            state["optimizer"] = {
                "param_groups": opt["param_groups"],
                "rows": rows,
                "scalars": scalars,
            }
        return state

    def load_state_dict(  # type: ignore[override]
        self, state: dict[str, Any], strict: bool = True
    ) -> None:
        """Loads a :meth:`state_dict` written with any world size; keeps this rank's rows.

        The optimizer part is applied now if :meth:`configure_optimizer` was called, otherwise
        when it is.

        Raises:
            ValueError: when the format, C or D differ, naming the key.
        """
        for key, want in (
            ("format", _FORMAT),
            ("num_classes", self.num_classes),
            ("embedding_size", self.embedding_size),
        ):
            if state.get(key) != want:
                raise ValueError(
                    f"center loss state_dict: key {key!r} is {state.get(key)!r}, expected {want!r}"
                )
        centers = state["centers"]
        if tuple(centers.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"center loss state_dict: key 'centers' has shape {tuple(centers.shape)}, "
                f"expected {(self.num_classes, self.embedding_size)}"
            )
        with torch.no_grad():
            self.centers_shard.copy_(centers[self.start : self.stop])
        if "optimizer" in state:
            if self.update != "gradient":
                if strict:
                    raise ValueError(
                        "center loss state_dict: key 'optimizer' present but update='alpha'"
                    )
            elif self.optimizer is None:
                self._pending_optimizer_state = state["optimizer"]
            else:
                self._load_optimizer(state["optimizer"])

    def _load_optimizer(self, saved: dict[str, Any]) -> None:
        assert self.optimizer is not None
        device = self.centers_shard.device
        # Copies: the optimizer updates its state in place and must not write into `saved`.
        param_state = {
            key: rows[self.start : self.stop].to(device, copy=True)
            for key, rows in saved["rows"].items()
        }
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

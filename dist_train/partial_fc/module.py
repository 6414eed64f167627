"""Partial FC: the classifier sharded by class across ranks, sampled per step.

Owns: the weight shard (rank r holds the contiguous classes ``shard_range(C, r, W)``), the
per-step class sampling, the cosine logits, the softmax cross-entropy across shards, the
row-wise optimizer of the shard (:class:`PartialFCOptimizer`), and a world-size-free state
(:meth:`PartialFC.state_dict`, :func:`merge_state_dicts`, :func:`export_class_centers`).
Does not own the margin maths (``heads.margins``), the backbone or its optimizer.

One step on rank r::

    global_labels     = all-gather(local_labels)                     # [N], checked in [0, C)
    global_embeddings = all_gather_with_grad(local_embeddings)       # [N, D]
    index             = sampled classes of the shard (all positives)  # [S], sorted
    cosine            = x̂ · ŵ[index]ᵀ  (fp32, autocast off)           # [N, S]
    logits            = margin(cosine, target column or -1)
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

Memory: margin heads derived from ``heads.margins.MarginHead`` are fused into the
cross-entropy, so a step holds two [N, S] fp32 buffers (cosines, and logits → softmax →
gradient) besides the sampled rows and their gradient. The model per rank is
:func:`estimate_memory_bytes`; ``docs/partial_fc.md`` checks it against measured peaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.collectives import all_gather_no_grad, all_gather_with_grad
from dist_train.distributed import (
    all_gather_object,
    all_reduce,
    get_rank,
    get_world_size,
    shard_range,
)
from heads.margins import MarginHead

INIT_BLOCK_ROWS = 65536
"""Classes per initialisation block; each block has its own seed, so the initial weights of
a class do not depend on the world size."""

STEP_CHUNK_ROWS = 8192
"""Rows updated at once by the optimizer: bounds its temporaries to ~16 MB each at D = 512."""

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"weight_dtype must be one of {list(_DTYPES)}, got {dtype}")
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"weight_dtype must be one of {list(_DTYPES)}, got {dtype!r}") from None


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the maths and of the optimizer state: fp32, or fp64 for fp64 weights."""
    return torch.promote_types(dtype, torch.float32)


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


def _stochastic_round_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16 rounding up or down with probability given by the distance (unbiased).

    Small optimizer updates (lr·g far below bf16's 8-bit mantissa) would otherwise round to
    nothing every step; stochastic rounding keeps their expected value.
    """
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device)
    # Adding to the integer view rounds the magnitude; masking drops the 16 bits bf16 lacks,
    # so the final cast is exact.
    return torch.bitwise_and(bits + noise, -65536).view(torch.float32).to(torch.bfloat16)


class _CosineLinear(torch.autograd.Function):
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


class _ShardedCrossEntropy(torch.autograd.Function):
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
        rows = torch.nonzero(target >= 0).squeeze(1)
        cols = target[rows]
        ctx.head = head
        if head is not None:
            with torch.enable_grad():
                cos_t = z[rows, cols].detach().requires_grad_(True)
                value_t = head.target_logit(cos_t) * head.s
            logits = z * head.s
            if head.interclass_threshold > 0:
                logits.masked_fill_(_filtered(z, rows, cols, head.interclass_threshold), 0.0)
            logits[rows, cols] = value_t.detach()
            ctx.graph = (cos_t, value_t)
        else:
            logits = z.clone()
        row_max = logits.amax(dim=1) if s > 0 else logits.new_full((n,), -math.inf)
        all_reduce(row_max, "max")
        target_shifted = logits.new_zeros(n)
        target_shifted[rows] = logits[rows, cols] - row_max[rows]
        all_reduce(target_shifted, "sum")
        probs = logits.sub_(row_max.unsqueeze(1)).exp_()  # in place: logits become exp(z − max)
        sum_exp = probs.sum(dim=1)
        all_reduce(sum_exp, "sum")
        loss = (sum_exp.log() - target_shifted).mean()
        probs.div_(sum_exp.unsqueeze(1))
        to_save = (probs, rows, cols) + ((z,) if head is not None else ())
        ctx.save_for_backward(*to_save)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("PartialFC's cross-entropy cannot be back-propagated twice")
        ctx.consumed = True
        probs, rows, cols, *rest = ctx.saved_tensors
        # The softmax turns into ∂loss/∂logits in place: one [N, S] buffer for the whole chain.
        grad = probs
        grad[rows, cols] -= 1.0
        grad.mul_(grad_loss / probs.shape[0])
        head = ctx.head
        if head is None:
            return grad, None, None
        cos_t, value_t = ctx.graph
        # A scalar output (no explicit grad_outputs): autograd's shape check for explicit
        # gradients imports sympy on first use, seconds per process.
        with torch.enable_grad():
            weighted = (value_t * grad[rows, cols]).sum()
        (grad_cos_t,) = torch.autograd.grad(weighted, cos_t)
        grad.mul_(head.s)
        if head.interclass_threshold > 0:
            grad.masked_fill_(_filtered(rest[0], rows, cols, head.interclass_threshold), 0.0)
        grad[rows, cols] = grad_cos_t
        ctx.graph = None
        return grad, None, None


def _filtered(cos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, threshold: float):
    """Mask of non-target cosines above the inter-class filtering threshold."""
    dirty = cos > threshold
    dirty[rows, cols] = False
    return dirty


class PartialFC(nn.Module):
    """Class-sharded, sampled softmax classifier with a margin head.

    Args:
        margin: a ``kind == "margin"`` head from :mod:`heads.margins`; its ``normalized``
            attribute says whether it receives cosines (True) or raw dot products W·x.
        embedding_size: D.
        num_classes: C, the total over all ranks.
        sample_rate: fraction r in (0, 1] of this rank's classes used per step; exactly
            max(#positives on the shard, int(r·C_local)) classes are used.
        update: ``"sparse"`` or ``"dense"`` (see the module docstring).
        weight_dtype: storage of the shard: float32, bfloat16 or float16 (float64 for tests).
            The maths and the optimizer state are fp32 (fp64 for float64) in every case.
        init_std: standard deviation of the initial rows.
        seed: seeds the initial rows (world-size independent) and the sampling (per rank).
        stochastic_rounding: round updates into bf16 storage stochastically.

    Attributes:
        weight: ``[C_local, D]`` the shard (a buffer: not a ``Parameter``, the optimizer of
            :meth:`configure_optimizer` updates it).
        class_start, class_stop: this rank's class range.
        sampled_index: ``[S]`` int64, sorted shard rows used by the last forward.
        sampled_weight: ``[S, D]`` leaf of the last forward; its ``.grad`` after backward is
            the gradient of the global loss with respect to those rows.
    """

    def __init__(
        self,
        margin: nn.Module,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        update: str = "sparse",
        weight_dtype: torch.dtype | str = torch.float32,
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
        self.weight_dtype = _as_dtype(weight_dtype)
        self.stochastic_rounding = stochastic_rounding
        self.seed = int(seed)
        self.rank, self.world_size = get_rank(), get_world_size()
        self.class_start, self.class_stop = shard_range(num_classes, self.rank, self.world_size)
        self.num_local = self.class_stop - self.class_start
        self.num_sample = int(self.sample_rate * self.num_local)
        weight = init_rows(
            self.class_start,
            self.class_stop,
            num_classes,
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

    # ------------------------------------------------------------------ forward
    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Global mean loss of the batch (same value on every rank).

        Args:
            local_embeddings: ``[B_local, D]`` any float dtype (bf16/fp16 under autocast).
            local_labels: ``[B_local]`` int class ids in [0, C).

        Returns:
            Scalar fp32 (fp64 for fp64 weights and embeddings) loss.
        """
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"PartialFC expects embeddings [B, {self.embedding_size}], "
                f"got {tuple(local_embeddings.shape)}"
            )
        if local_labels.shape != local_embeddings.shape[:1]:
            raise ValueError(
                f"labels {tuple(local_labels.shape)} do not match embeddings "
                f"{tuple(local_embeddings.shape)}"
            )
        device = self.weight.device
        global_labels = all_gather_no_grad(local_labels.to(device=device, dtype=torch.long))
        self._check_labels(global_labels)
        global_embeddings = all_gather_with_grad(local_embeddings)
        compute_dtype = _master_dtype(
            torch.promote_types(local_embeddings.dtype, self.weight.dtype)
        )
        index, target = self.sample(global_labels)
        sub = self._sampled_leaf(index, compute_dtype)
        self.sampled_index, self.sampled_weight = index, sub

        with torch.autocast(device_type=device.type, enabled=False):
            x = global_embeddings.to(compute_dtype)
            if getattr(self.margin, "normalized", True):
                cosine = _CosineLinear.apply(F.normalize(x, dim=1), sub)
            else:
                cosine = x @ sub.t()
            if isinstance(self.margin, MarginHead):
                loss = _ShardedCrossEntropy.apply(cosine, target, self.margin)
            else:
                loss = _ShardedCrossEntropy.apply(self.margin(cosine, target), target, None)
            extra_fn = getattr(self.margin, "extra_loss_sum", None)
            if extra_fn is not None and getattr(self.margin, "intra_alpha", 0.0) > 0:
                # The per-sample penalty of sample i lives on the one shard holding its class:
                # the local part carries the gradient, the all-reduced total gives the value.
                local_extra = extra_fn(cosine, target) / x.shape[0]
                total_extra = all_reduce(local_extra.detach().clone(), "sum")
                loss = loss + local_extra + (total_extra - local_extra.detach())
        if self.optimizer is not None:
            self.optimizer._attach(sub, index)
        return loss

    def _check_labels(self, global_labels: torch.Tensor) -> None:
        if global_labels.numel() == 0:
            return
        bad = (global_labels < 0) | (global_labels >= self.num_classes)
        if bool(bad.any()):  # CPU-GPU sync point: a bad label must stop the run here
            pos = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"PartialFC: label {int(global_labels[pos])} at position {pos} of the global "
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

    def sample(self, global_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chooses this step's rows of the shard.

        Args:
            global_labels: ``[N]`` int64 class ids of the global batch.

        Returns:
            ``index``: ``[S]`` sorted int64 shard rows, S = max(#positives, int(r·C_local)),
            every positive included, the negatives a uniform random subset of the others;
            ``target``: ``[N]`` int64 column of each sample's class in ``index``, or -1 when its
            class is on another shard.
        """
        device = global_labels.device
        local = global_labels - self.class_start
        on_shard = (local >= 0) & (local < self.num_local)
        if self.num_sample >= self.num_local:
            index = torch.arange(self.num_local, device=device)
            return index, torch.where(on_shard, local, torch.full_like(local, -1))
        positives = torch.unique(local[on_shard])
        num = max(int(positives.numel()), self.num_sample)
        # Uniform scores with positives forced to the top: the top-`num` are the positives plus
        # a uniformly random subset of the negatives.
        score = torch.rand(self.num_local, device=device, generator=self._generator(device))
        score[positives] = 2.0
        index = torch.topk(score, num, sorted=False).indices.sort().values
        column = torch.searchsorted(index, local.clamp(0, max(self.num_local - 1, 0)))
        return index, torch.where(on_shard, column, torch.full_like(local, -1))

    def _sampled_leaf(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if index.numel() == self.num_local and self.weight.dtype == dtype:
            # Every row is used: alias the shard instead of copying it (saves C_local·D·4 B).
            sub = self.weight.detach()
        else:
            sub = self.weight.index_select(0, index).to(dtype)
        return sub.requires_grad_(True)

    # ---------------------------------------------------------------- optimizer
    def configure_optimizer(
        self,
        name: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        nesterov: bool = False,
    ) -> PartialFCOptimizer:
        """Creates ``self.optimizer`` for the shard (``"sgd"``, ``"adam"`` or ``"adamw"``)."""
        self.optimizer = PartialFCOptimizer(
            self,
            name,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            nesterov=nesterov,
        )
        if self._pending_rows:
            if self._pending_optimizer != self.optimizer.name:
                raise ValueError(
                    f"the loaded state holds {self._pending_optimizer!r} optimizer rows, "
                    f"the optimizer configured is {self.optimizer.name!r}"
                )
            for a, b, rows in self._pending_rows:
                self.optimizer._load_rows(a, b, rows)
            self._pending_rows = []
        return self.optimizer

    # -------------------------------------------------------------------- state
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """This rank's rows and optimizer rows, tagged with their class range.

        The format does not depend on the world size: pieces from every rank, joined with
        :func:`merge_state_dicts` (or :meth:`gathered_state_dict`), load into any world size.
        Tensors alias the live ones, like ``nn.Module.state_dict``.
        """
        piece: dict[str, Any] = {
            "start": self.class_start,
            "stop": self.class_stop,
            "weight": self.weight.detach(),
            "rows": dict(self.optimizer.rows) if self.optimizer is not None else {},
            # the negative-sampling stream, so a resume at the same world size draws the same
            # negatives as the uninterrupted run (another world size reseeds)
            "sampler": {
                "rank": self.rank,
                "world_size": self.world_size,
                "states": {str(d): g.get_state() for d, g in self._generators.items()},
            },
        }
        opt = None
        if self.optimizer is not None:
            opt = {"name": self.optimizer.name, **self.optimizer.hyperparameters()}
        return {
            "format": "partial_fc",
            "version": 1,
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "optimizer": opt,
            "pieces": [piece],
        }

    def gathered_state_dict(self) -> dict[str, Any]:
        """The state of every rank, merged, on every rank (CPU tensors; for small C)."""
        local = self.state_dict()
        for piece in local["pieces"]:
            piece["weight"] = piece["weight"].cpu()
            piece["rows"] = {k: v.cpu() for k, v in piece["rows"].items()}
        return merge_state_dicts(all_gather_object(local))

    def load_state_dict(  # type: ignore[override]
        self, state: dict[str, Any] | Sequence[dict[str, Any]], strict: bool = True
    ) -> None:
        """Loads rows of this rank's class range from a state of any world size.

        Args:
            state: one :meth:`state_dict` (merged, or covering this range) or a list of them.
            strict: raise when the state lacks some of this rank's classes.
        """
        if not isinstance(state, dict):
            state = merge_state_dicts(list(state))
        if state.get("format") != "partial_fc":
            raise ValueError("not a PartialFC state dict (missing format 'partial_fc')")
        for key, mine in (
            ("num_classes", self.num_classes),
            ("embedding_size", self.embedding_size),
        ):
            if state[key] != mine:
                raise ValueError(f"PartialFC state has {key}={state[key]}, this model has {mine}")
        opt_name = state["optimizer"]["name"] if state.get("optimizer") else None
        if self.optimizer is not None and opt_name is not None and opt_name != self.optimizer.name:
            raise ValueError(
                f"PartialFC state holds {opt_name!r} optimizer rows, the configured optimizer "
                f"is {self.optimizer.name!r}"
            )
        covered = 0
        self._pending_rows = []
        for piece in state["pieces"]:
            a, b = max(self.class_start, piece["start"]), min(self.class_stop, piece["stop"])
            if a >= b:
                continue
            src = slice(a - piece["start"], b - piece["start"])
            with torch.no_grad():
                self.weight[a - self.class_start : b - self.class_start].copy_(piece["weight"][src])
            rows = {k: v[src] for k, v in piece.get("rows", {}).items()}
            if rows:
                if self.optimizer is not None:
                    self.optimizer._load_rows(a - self.class_start, b - self.class_start, rows)
                else:
                    self._pending_rows.append((a - self.class_start, b - self.class_start, rows))
            covered += b - a
            self._load_sampler(piece)
        self._pending_optimizer = opt_name
        if strict and covered != self.num_local:
            raise ValueError(
                f"PartialFC state covers {covered} of the {self.num_local} classes "
                f"[{self.class_start}, {self.class_stop}) of rank {self.rank}"
            )

    def _load_sampler(self, piece: dict[str, Any]) -> None:
        """Restores this rank's sampling generators from its own piece of the same world size."""
        sampler = piece.get("sampler")
        if (
            not sampler
            or sampler.get("world_size") != self.world_size
            or sampler.get("rank") != self.rank
            or (piece["start"], piece["stop"]) != (self.class_start, self.class_stop)
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
            f"D={self.embedding_size}, sample_rate={self.sample_rate}, update={self.update}, "
            f"weight_dtype={self.weight_dtype}"
        )


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
            weight_dtype, lr_scale).
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
        seed=seed,
    ).to(device)
    # The optimizer rows are allocated on the shard's device: create it after the move.
    pfc.configure_optimizer(
        optim_cfg.name,
        lr=optim_cfg.lr * pfc_cfg.lr_scale,
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        nesterov=optim_cfg.nesterov,
    )
    return pfc


def merge_state_dicts(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Joins the per-rank states of one model into a single state with every piece.

    Raises:
        ValueError: the states disagree on C or D, or their class ranges overlap.
    """
    if not states:
        raise ValueError("no PartialFC states to merge")
    first = states[0]
    pieces = []
    for st in states:
        for key in ("num_classes", "embedding_size"):
            if st[key] != first[key]:
                raise ValueError(f"PartialFC states disagree on {key}: {st[key]} vs {first[key]}")
        pieces.extend(st["pieces"])
    pieces.sort(key=lambda p: p["start"])
    for prev, nxt in zip(pieces, pieces[1:]):
        if nxt["start"] < prev["stop"]:
            raise ValueError(
                f"PartialFC state pieces overlap: [{prev['start']}, {prev['stop']}) and "
                f"[{nxt['start']}, {nxt['stop']})"
            )
    return {**first, "pieces": pieces}


def export_class_centers(pfc: PartialFC) -> torch.Tensor:
    """The full ``[C, D]`` class-centre matrix (un-normalised), gathered on every rank.

    fp32 for fp32/bf16/fp16 storage, fp64 for fp64 weights.
    """
    return all_gather_no_grad(pfc.weight.detach().to(_master_dtype(pfc.weight.dtype)))


class PartialFCOptimizer(torch.optim.Optimizer):
    """Row-wise SGD (momentum, Nesterov) / Adam / AdamW for a :class:`PartialFC` shard.

    ``param_groups[0]["params"]`` holds the sampled-rows leaf of the last forward, so
    ``torch.amp.GradScaler.unscale_`` / ``step`` see, unscale and inf-check exactly the
    gradient that :meth:`step` applies; ``param_groups[0]["lr"]`` is read at every step (set
    it from the scheduler). Several forwards before one step (gradient accumulation) each
    attach a leaf; the step applies their summed gradients over the union of their rows
    (see :meth:`_attach`).

    State ``rows`` (fp32, or fp64 for fp64 weights) is per class: ``momentum_buffer``
    ``[C_local, D]`` for SGD with momentum; ``exp_avg``, ``exp_avg_sq`` ``[C_local, D]`` and
    ``step`` ``[C_local]`` int32 (updates of the row so far) for Adam/AdamW. It is saved by
    :meth:`PartialFC.state_dict`, not by this optimizer's own ``state_dict`` (which keeps
    only the hyper-parameters).
    """

    def __init__(
        self,
        pfc: PartialFC,
        name: str,
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        nesterov: bool = False,
    ) -> None:
        if name not in ("sgd", "adam", "adamw"):
            raise ValueError(f"PartialFC optimizer must be 'sgd', 'adam' or 'adamw', got {name!r}")
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and (name != "sgd" or momentum <= 0):
            raise ValueError("nesterov needs SGD with momentum > 0")
        device = pfc.weight.device
        self.state_dtype = _master_dtype(pfc.weight.dtype)
        placeholder = torch.zeros(0, pfc.embedding_size, device=device, requires_grad=True)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "betas": tuple(float(b) for b in betas),
            "eps": eps,
            "nesterov": nesterov,
        }
        super().__init__([placeholder], defaults)
        self.name = name
        self._pfc = pfc
        self._index: torch.Tensor | None = None
        self._indices: list[torch.Tensor] = []
        self._stepped = False
        shape = (pfc.num_local, pfc.embedding_size)
        kw = {"device": device, "dtype": self.state_dtype}
        self.rows: dict[str, torch.Tensor] = {}
        if name == "sgd" and momentum > 0:
            self.rows["momentum_buffer"] = torch.zeros(shape, **kw)
        elif name in ("adam", "adamw"):
            self.rows["exp_avg"] = torch.zeros(shape, **kw)
            self.rows["exp_avg_sq"] = torch.zeros(shape, **kw)
            self.rows["step"] = torch.zeros(pfc.num_local, device=device, dtype=torch.int32)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Installs the single group (called once by ``Optimizer.__init__``).

        The base version validates user parameter lists and, being wrapped for
        ``torch.compile``, imports ``torch._dynamo`` (seconds per process); this optimizer's
        only group holds the leaf that :class:`PartialFC` attaches at every forward.
        """
        if self.param_groups:
            raise ValueError("PartialFCOptimizer has exactly one parameter group")
        group = {**self.defaults, **param_group}
        group["params"] = list(group["params"])
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drops (or zeroes) the gradients of the attached sampled-rows leaves.

        Also detaches the leaves, so the next forward starts a new accumulation.
        """
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self.param_groups[0]["params"] = self.param_groups[0]["params"][-1:]
        self._indices = self._indices[-1:]

    def hyperparameters(self) -> dict[str, Any]:
        group = self.param_groups[0]
        return {k: group[k] for k in ("lr", "momentum", "weight_decay", "betas", "eps", "nesterov")}

    def _attach(self, leaf: torch.Tensor, index: torch.Tensor) -> None:
        """Registers the sampled-rows leaf of a forward.

        Gradient accumulation: while an earlier leaf of this step already holds a gradient
        (a micro-step's backward ran and no ``step``/``zero_grad`` followed), the new leaf is
        appended, and :meth:`step` applies the sum of the micro-steps' gradients over the
        union of their sampled rows. Otherwise the new leaf replaces the old one.
        """
        params = self.param_groups[0]["params"]
        if not self._stepped and any(p.grad is not None for p in params):
            params.append(leaf)
            self._indices.append(index)
        else:
            self.param_groups[0]["params"] = [leaf]
            self._indices = [index]
        self._stepped = False
        self._index = index

    def _load_rows(self, a: int, b: int, rows: dict[str, torch.Tensor]) -> None:
        for key, value in rows.items():
            if key not in self.rows:
                raise ValueError(
                    f"PartialFC state has optimizer rows {key!r}, {self.name} has none"
                )
            self.rows[key][a:b].copy_(value)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Applies the gradient of the sampled rows (no-op without a backward since attach)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        parts = [
            (idx, leaf.grad)
            for leaf, idx in zip(group["params"], self._indices)
            if leaf.grad is not None
        ]
        if not parts:
            return loss
        if len(parts) == 1:
            index, grad = parts[0]
        else:
            # Accumulated micro-steps: sum their gradients over the union of sampled rows.
            all_index = torch.cat([i for i, _ in parts])
            index, inverse = torch.unique(all_index, sorted=True, return_inverse=True)
            grad = torch.zeros(
                index.numel(),
                self._pfc.embedding_size,
                device=all_index.device,
                dtype=self.state_dtype,
            )
            grad.index_add_(0, inverse, torch.cat([g.to(self.state_dtype) for _, g in parts]))
        if grad.shape != (index.numel(), self._pfc.embedding_size):
            raise RuntimeError(f"gradient {tuple(grad.shape)} does not match {index.numel()} rows")
        if self._pfc.update == "sparse":
            self._sparse_step(index, grad, group)
        else:
            self._dense_step(index, grad, group)
        self._stepped = True  # the next forward starts a new step even without zero_grad
        return loss

    def _store(self, dst: torch.Tensor, rows: torch.Tensor | None, w: torch.Tensor) -> None:
        """Writes updated rows ``w`` back into the shard (``rows`` index, or ``dst`` a view)."""
        weight = self._pfc.weight
        if weight.dtype == torch.bfloat16 and self._pfc.stochastic_rounding:
            w = _stochastic_round_bf16(w)
        else:
            w = w.to(weight.dtype)
        if rows is None:
            dst.copy_(w)
        else:
            weight.index_copy_(0, rows, w)

    def _sparse_step(self, index: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        weight = self._pfc.weight
        if index.numel() == weight.shape[0]:
            # Every row sampled (sorted and unique, so index = arange): update through views.
            self._blockwise_step(group, lambda a, b: grad[a:b].to(self.state_dtype, copy=True))
            return
        # Gathers go into buffers kept across steps: a fresh multi-MB tensor per chunk costs
        # more in page faults than the gather itself.
        bufs = self._chunk_buffers()
        for a in range(0, index.numel(), STEP_CHUNK_ROWS):
            rows = index[a : a + STEP_CHUNK_ROWS]
            k = rows.numel()
            w = bufs["weight"][:k]
            if weight.dtype == self.state_dtype:
                torch.index_select(weight, 0, rows, out=w)
            else:
                w.copy_(weight.index_select(0, rows))
            g = bufs["grad"][:k]
            g.copy_(grad[a : a + k])
            state = {
                key: torch.index_select(v, 0, rows, out=bufs[key][:k])
                if key in bufs
                else v.index_select(0, rows)
                for key, v in self.rows.items()
            }
            self._update_rows(w, g, state, group)
            self._store(weight, rows, w)
            for key, v in state.items():
                self.rows[key].index_copy_(0, rows, v)

    def _chunk_buffers(self) -> dict[str, torch.Tensor]:
        """[STEP_CHUNK_ROWS, D] state-dtype buffers for the sparse step (made once)."""
        if not hasattr(self, "_bufs"):
            weight = self._pfc.weight
            n = min(STEP_CHUNK_ROWS, weight.shape[0])
            names = ["weight", "grad"] + [k for k, v in self.rows.items() if v.dim() == 2]
            self._bufs = {
                k: torch.empty(n, weight.shape[1], device=weight.device, dtype=self.state_dtype)
                for k in names
            }
        return self._bufs

    def _dense_step(self, index: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        weight = self._pfc.weight
        bounds = torch.arange(0, weight.shape[0] + STEP_CHUNK_ROWS, STEP_CHUNK_ROWS)
        # Where each block's sampled rows start in `index`: one sync for the whole step.
        starts = torch.searchsorted(index, bounds.to(index.device)).tolist()

        def block_grad(a: int, b: int) -> torch.Tensor:
            g = torch.zeros(b - a, weight.shape[1], device=weight.device, dtype=self.state_dtype)
            lo, hi = starts[a // STEP_CHUNK_ROWS], starts[a // STEP_CHUNK_ROWS + 1]
            if hi > lo:
                g.index_copy_(0, index[lo:hi] - a, grad[lo:hi].to(self.state_dtype))
            return g

        self._blockwise_step(group, block_grad)

    def _blockwise_step(self, group: dict, block_grad) -> None:
        """Updates every row, block by block, through views of the shard and state."""
        weight = self._pfc.weight
        n = weight.shape[0]
        for a in range(0, n, STEP_CHUNK_ROWS):
            b = min(a + STEP_CHUNK_ROWS, n)
            view = weight[a:b]
            w = view if view.dtype == self.state_dtype else view.to(self.state_dtype)
            state = {k: v[a:b] for k, v in self.rows.items()}  # views: updated in place
            self._update_rows(w, block_grad(a, b), state, group)
            if w is not view:
                self._store(view, None, w)

    def _update_rows(
        self, w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], group: dict
    ) -> None:
        """In-place update of rows ``w`` [k, D] with gradient ``g`` (consumed) and ``state``."""
        lr, wd = group["lr"], group["weight_decay"]
        if self.name == "sgd":
            if wd:
                g.add_(w, alpha=wd)
            mu = group["momentum"]
            if mu:
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(g)
                g = g.add_(buf, alpha=mu) if group["nesterov"] else buf
            w.add_(g, alpha=-lr)
            return
        beta1, beta2 = group["betas"]
        step = state["step"]
        step += 1
        t = step.to(torch.float64)
        # Per-row bias correction: a row updated k times is corrected for k steps.
        step_size = (lr / (1.0 - beta1**t)).to(w.dtype).unsqueeze(1)
        bc2_sqrt = (1.0 - beta2**t).sqrt().to(w.dtype).unsqueeze(1)
        if self.name == "adamw":
            w.mul_(1.0 - lr * wd)
        elif wd:
            g.add_(w, alpha=wd)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = v.sqrt().div_(bc2_sqrt).add_(group["eps"])
        w.sub_(torch.div(m, denom).mul_(step_size))


def estimate_memory_bytes(
    num_classes: int,
    world_size: int,
    *,
    embedding_size: int = 512,
    global_batch: int = 256,
    sample_rate: float = 1.0,
    weight_dtype: torch.dtype | str = torch.float32,
    optimizer: str = "sgd",
    momentum: float = 0.9,
) -> dict[str, int]:
    """Memory model of one rank's classifier (see docs/partial_fc.md), in bytes.

    Persistent: the shard (C_local·D·bytes of the storage dtype) and the optimizer rows
    (fp32: D·4 for SGD momentum, D·8 + 4 for Adam/AdamW). Transient, per sampled row: the
    fp32 copy of the row (not made at rate 1 with fp32 storage, where the shard is used in
    place), its fp32 gradient, and two [N, S] fp32 buffers (cosines kept for backward; logits
    → softmax → gradient, one buffer) = 8·N bytes. Both update modes need the same memory.

    Returns:
        ``{"persistent", "transient", "total"}``; the process's own baseline (interpreter,
        torch, batch) is not included.
    """
    dtype = _as_dtype(weight_dtype)
    c_local = -(-num_classes // world_size)  # the largest shard
    d = embedding_size
    storage = dtype.itemsize
    state = 4 if dtype != torch.float64 else 8
    per_row = d * storage
    if optimizer == "sgd":
        per_row += d * state if momentum > 0 else 0
    else:
        per_row += 2 * d * state + 4
    sampled = max(int(sample_rate * c_local), 1)
    copy = 0 if (sampled >= c_local and dtype in (torch.float32, torch.float64)) else d * state
    transient_row = copy + d * state + 2 * global_batch * state
    persistent = c_local * per_row
    transient = sampled * transient_row
    return {"persistent": persistent, "transient": transient, "total": persistent + transient}

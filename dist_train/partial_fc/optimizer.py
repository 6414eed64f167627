"""The row-wise optimizer of a Partial FC shard.

Owns :class:`PartialFCOptimizer`: which rows a step updates (the sampled rows, or every row in
``"dense"`` mode), the per-class optimizer rows, gradient accumulation over several forwards,
which path a step takes (SGD with momentum on CPU in fp32/bf16 storage: the compiled kernel of
:mod:`dist_train.partial_fc.native`; everything else: the torch path here), the torch path's
chunked gather/update/scatter that bounds its temporaries (chunk size per device), and
the write-back of rows and optimizer rows into their storage dtypes (fp32 maths per chunk,
stochastic rounding into bf16/fp16, no fp32 master copy; the fp16-momentum range check).
The update rule itself (SGD, Adam, AdamW on rows) and the optimizer names and
hyper-parameters are :mod:`dist_train.optim`'s. Does not own
the forward, the sampling or the saved state (:mod:`dist_train.partial_fc.module`,
:mod:`dist_train.partial_fc.state`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dist_train.optim import OptimSpec, row_state_names, update_rows
from dist_train.partial_fc import native
from dist_train.partial_fc.dtypes import FP16_MAX, check_state_dtype, master_dtype, store_rounded

if TYPE_CHECKING:
    from dist_train.partial_fc.module import PartialFC

STEP_CHUNK_ROWS = 8192
"""The fewest rows of one optimizer chunk on CUDA."""
CPU_CHUNK_BYTES = 256 * 2**10
"""Size of one chunk temporary on CPU (128 rows at D = 512, fp32): the chunk's rows, gradient
and state stay in a core's cache across the update's elementwise passes. Measured on this
machine (1 thread, SGD momentum, 50,000 sampled rows): 128-row chunks take 0.80x the time of
8,192-row ones (fp32 and bf16 state, sparse and dense steps alike)."""
CUDA_CHUNK_BYTES = 256 * 2**20
"""Size of one chunk temporary on CUDA: few, large kernels (a 10M-row dense step is ~80 chunks
of each kernel, not ~1,200) at a bounded memory cost."""


def step_chunk_rows(device: torch.device, embedding_size: int, math_itemsize: int = 4) -> int:
    """Rows the optimizer updates at once on ``device``.

    CPU: rows whose ``[rows, D]`` temporary in the maths dtype fills :data:`CPU_CHUNK_BYTES`
    (at least 16). CUDA: rows whose temporary fills :data:`CUDA_CHUNK_BYTES` (131,072 rows at
    D = 512, fp32), at least :data:`STEP_CHUNK_ROWS`. Every row's update is independent of the
    others, so the chunk size changes the number of kernel launches, never the result (up to
    the stochastic rounding draws of bf16/fp16 storage, which are random either way).
    """
    if device.type != "cuda":
        return max(16, CPU_CHUNK_BYTES // (embedding_size * math_itemsize))
    return max(STEP_CHUNK_ROWS, CUDA_CHUNK_BYTES // (embedding_size * math_itemsize))


def update_stored_rows(
    name: str,
    stored: torch.Tensor,
    grad: torch.Tensor,
    stored_state: dict[str, torch.Tensor],
    group: dict[str, Any],
    math_dtype: torch.dtype,
    stochastic_rounding: bool = True,
) -> torch.Tensor | None:
    """One :func:`dist_train.optim.update_rows` step of rows kept in any storage dtype.

    ``stored`` (rows) and ``stored_state`` (their state rows, int32 step counts included) are
    views into the storage, updated in place: directly where they already are in
    ``math_dtype``, else through a ``math_dtype`` copy written back by
    :func:`~dist_train.partial_fc.dtypes.store_rounded`. ``grad`` (``math_dtype``) is consumed
    as scratch. Returns whether fp16 state left fp16's range (a device bool; None without fp16
    state), for the caller to check once per step.
    """
    w = stored if stored.dtype == math_dtype else stored.to(math_dtype)
    state = {
        k: v if v.dtype in (math_dtype, torch.int32) else v.to(math_dtype)
        for k, v in stored_state.items()
    }
    update_rows(name, w, grad, state, group)
    if w is not stored:
        stored.copy_(store_rounded(w, stored.dtype, stochastic_rounding))
    overflow = None
    for k, v in state.items():
        if v is stored_state[k]:
            continue
        if stored_state[k].dtype == torch.float16 and v.numel():
            big = v.abs().amax() > FP16_MAX
            overflow = big if overflow is None else overflow | big
        stored_state[k].copy_(store_rounded(v, stored_state[k].dtype, stochastic_rounding))
    return overflow


class PartialFCOptimizer(torch.optim.Optimizer):
    """Row-wise SGD (momentum, Nesterov) / Adam / AdamW for a :class:`PartialFC` shard.

    ``param_groups[0]["params"]`` holds the sampled-rows leaf of the last forward, so
    ``torch.amp.GradScaler.unscale_`` / ``step`` see, unscale and inf-check exactly the
    gradient that :meth:`step` applies; ``param_groups[0]["lr"]`` is read at every step (set
    it from the scheduler). Several forwards before one step (gradient accumulation) each
    attach a leaf; the step applies their summed gradients over the union of their rows
    (see :meth:`attach`).

    State ``rows`` is per class, stored in ``pfc.state_dtype`` (fp32 by default; bf16, fp16
    for SGD momentum, fp64 for tests): ``momentum_buffer`` ``[C_local, D]`` for SGD with
    momentum; ``exp_avg``, ``exp_avg_sq`` ``[C_local, D]`` and ``step`` ``[C_local]`` int32
    (updates of the row so far) for Adam/AdamW. A step gathers a chunk of rows and their state
    into ``math_dtype`` (fp32; fp64 when either storage is fp64) buffers, updates them and
    writes both back, stochastically rounded into half storage (``pfc.stochastic_rounding``).
    fp16 momentum is checked against fp16's range at every step (one host read; the step
    raises ``FloatingPointError`` rather than train on with an inf). It is saved by
    :meth:`PartialFC.shard_state`, not by this optimizer's own ``state_dict`` (which keeps
    only the hyper-parameters).

    Args:
        pfc: the module whose shard this optimizer updates.
        spec: the rule and its hyper-parameters (:class:`dist_train.optim.OptimSpec`).
    """

    def __init__(self, pfc: PartialFC, spec: OptimSpec) -> None:
        if spec.lr <= 0 or spec.momentum < 0 or spec.weight_decay < 0:
            raise ValueError(
                f"invalid lr={spec.lr}, momentum={spec.momentum}, weight_decay={spec.weight_decay}"
            )
        if spec.nesterov and (spec.name != "sgd" or spec.momentum <= 0):
            raise ValueError("nesterov needs SGD with momentum > 0")
        device = pfc.weight.device
        self.state_dtype = pfc.state_dtype
        check_state_dtype(self.state_dtype, spec.name)
        self.math_dtype = master_dtype(torch.promote_types(pfc.weight.dtype, self.state_dtype))
        # rows updated at once; any value gives the same result (tests set small ones)
        self.chunk_rows = step_chunk_rows(device, pfc.embedding_size, self.math_dtype.itemsize)
        self._overflow: torch.Tensor | None = None  # fp16 momentum's range check
        # SGD with momentum on CPU in fp32/bf16 storage: the compiled kernel where it builds
        # (the torch path below gives the same result up to rounding; tests compare the two)
        self.use_native = True
        placeholder = torch.zeros(0, pfc.embedding_size, device=device, requires_grad=True)
        super().__init__([placeholder], spec.hyperparameters())
        self.name = spec.name
        self._pfc = pfc
        self._index: torch.Tensor | None = None
        self._indices: list[torch.Tensor] = []
        self._stepped = False
        self.rows: dict[str, torch.Tensor] = {}
        for key in row_state_names(spec):
            if key == "step":
                self.rows[key] = torch.zeros(pfc.num_rows, device=device, dtype=torch.int32)
            else:
                self.rows[key] = torch.zeros(
                    pfc.num_rows, pfc.embedding_size, device=device, dtype=self.state_dtype
                )

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

    def attach(self, leaf: torch.Tensor, index: torch.Tensor) -> None:
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

    def load_rows(self, a: int, b: int, rows: dict[str, torch.Tensor]) -> None:
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
        elif all(i.numel() == self._pfc.num_rows for i, _ in parts):
            # Accumulated micro-steps that each used every row (index = arange): a plain sum.
            index = parts[0][0]
            grad = parts[0][1].to(self.math_dtype, copy=True)
            for _, g in parts[1:]:
                grad.add_(g.to(self.math_dtype))
        else:
            # Accumulated micro-steps: sum their gradients over the union of sampled rows (a
            # data-dependent size: the one host read of the step besides the skip flag).
            all_index = torch.cat([i for i, _ in parts])
            index, inverse = torch.unique(all_index, sorted=True, return_inverse=True)
            grad = torch.zeros(
                index.numel(),
                self._pfc.embedding_size,
                device=all_index.device,
                dtype=self.math_dtype,
            )
            grad.index_add_(0, inverse, torch.cat([g.to(self.math_dtype) for _, g in parts]))
        if grad.shape != (index.numel(), self._pfc.embedding_size):
            raise RuntimeError(f"gradient {tuple(grad.shape)} does not match {index.numel()} rows")
        if not self._native_step(index, grad, group):
            if self._pfc.update == "sparse":
                self._sparse_step(index, grad, group)
            else:
                self._dense_step(index, grad, group)
        self._check_range()
        self._stepped = True  # the next forward starts a new step even without zero_grad
        return loss

    def _native_step(self, index: torch.Tensor, grad: torch.Tensor, group: dict) -> bool:
        """SGD with momentum through the compiled CPU kernel (:mod:`dist_train.partial_fc.native`:
        each row read and written once); False where it does not apply (other rules, fp16 or
        fp64 storage, CUDA, no compiler, ``use_native`` off)."""
        if not self.use_native or self.name != "sgd":
            return False
        weight = self._pfc.weight
        every = index.numel() == weight.shape[0]  # sorted and unique: index = arange
        dense = self._pfc.update != "sparse" and not every
        return native.sgd_step(
            weight,
            self.rows.get("momentum_buffer"),
            index if dense or not every else None,
            grad,
            group,
            self._pfc.stochastic_rounding,
            dense=dense,
        )

    def _store(
        self, dst: torch.Tensor, rows: torch.Tensor | None, w: torch.Tensor, state: bool = False
    ) -> None:
        """Writes updated rows ``w`` into ``dst`` (at index ``rows``, or ``dst`` is a view).

        ``dst`` is the shard or (``state``) an optimizer-state tensor; half storage gets
        stochastic rounding.
        """
        if state and dst.dtype == torch.float16 and w.numel():
            # SGD momentum in fp16: remember whether any value left fp16's range
            big = w.detach().abs().amax() > FP16_MAX
            self._overflow = big if self._overflow is None else self._overflow | big
        w = store_rounded(w, dst.dtype, self._pfc.stochastic_rounding)
        if rows is None:
            dst.copy_(w)
        else:
            dst.index_copy_(0, rows, w)

    def _check_range(self) -> None:
        """Raises when this step's fp16 momentum left fp16's range (one host read)."""
        if self._overflow is not None:
            overflow, self._overflow = bool(self._overflow), None
            if overflow:
                raise FloatingPointError(
                    "PartialFC: SGD momentum exceeds fp16's range (65504); set "
                    "partial_fc.state_dtype to bfloat16 or float32"
                )

    def _sparse_step(self, index: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        weight = self._pfc.weight
        if index.numel() == weight.shape[0]:
            # Every row sampled (sorted and unique, so index = arange): update through views.
            self._blockwise_step(group, lambda a, b: grad[a:b].to(self.math_dtype, copy=True))
            return
        # Gathers go into buffers kept across steps: a fresh multi-MB tensor per chunk costs
        # more in page faults than the gather itself.
        bufs = self._chunk_buffers(index.numel())
        for a in range(0, index.numel(), self.chunk_rows):
            rows = index[a : a + self.chunk_rows]
            k = rows.numel()
            w = self._gather(weight, rows, bufs["weight"][:k])
            g = bufs["grad"][:k]
            g.copy_(grad[a : a + k])
            state = {
                key: self._gather(v, rows, bufs[key][:k])
                if key in bufs
                else v.index_select(0, rows)
                for key, v in self.rows.items()
            }
            update_rows(self.name, w, g, state, group)
            self._store(weight, rows, w)
            for key, v in state.items():
                self._store(self.rows[key], rows, v, state=True)

    def _gather(self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of ``src`` in ``out`` (a maths-dtype buffer)."""
        if src.dtype == out.dtype:
            return torch.index_select(src, 0, rows, out=out)
        return out.copy_(src.index_select(0, rows))

    def _chunk_buffers(self, rows: int) -> dict[str, torch.Tensor]:
        """[min(chunk_rows, rows), D] maths-dtype buffers for the sparse step.

        Made at the first step (the sampled count is fixed per batch size), again only when
        a step updates more rows.
        """
        n = min(self.chunk_rows, rows)
        if not hasattr(self, "_bufs") or self._bufs["grad"].shape[0] < n:
            weight = self._pfc.weight
            names = ["weight", "grad"] + [k for k, v in self.rows.items() if v.dim() == 2]
            self._bufs = {
                k: torch.empty(n, weight.shape[1], device=weight.device, dtype=self.math_dtype)
                for k in names
            }
        return self._bufs

    def _dense_step(self, index: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        weight = self._pfc.weight
        bounds = torch.arange(0, weight.shape[0] + self.chunk_rows, self.chunk_rows)
        # Where each block's sampled rows start in `index`: one sync for the whole step.
        starts = torch.searchsorted(index, bounds.to(index.device)).tolist()

        def block_grad(a: int, b: int) -> torch.Tensor:
            g = torch.zeros(b - a, weight.shape[1], device=weight.device, dtype=self.math_dtype)
            lo, hi = starts[a // self.chunk_rows], starts[a // self.chunk_rows + 1]
            if hi > lo:
                g.index_copy_(0, index[lo:hi] - a, grad[lo:hi].to(self.math_dtype))
            return g

        self._blockwise_step(group, block_grad)

    def _blockwise_step(self, group: dict, block_grad) -> None:
        """Updates every row, block by block, through views of the shard and state."""
        weight = self._pfc.weight
        n = weight.shape[0]
        for a in range(0, n, self.chunk_rows):
            b = min(a + self.chunk_rows, n)
            views = {k: v[a:b] for k, v in self.rows.items()}
            big = update_stored_rows(
                self.name, weight[a:b], block_grad(a, b), views, group, self.math_dtype,
                self._pfc.stochastic_rounding,
            )  # fmt: skip
            if big is not None:
                self._overflow = big if self._overflow is None else self._overflow | big

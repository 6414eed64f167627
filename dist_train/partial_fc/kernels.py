"""Autograd kernels of Partial FC: cosine logits and the cross-entropy across class shards.

Owns :class:`CosineCrossEntropy` (cosines, margin and the sharded cross-entropy in one
blockwise kernel, for heads with the fusion hooks of :mod:`heads.margins`) with its
:class:`Workspace` (its step-sized buffers, kept across steps), and for the other
cases (sub-centre heads, heads of raw logits) :class:`CosineLinear` (cosines of embeddings
with sampled class rows, with a backward that keeps only the rows' inverse norms) and
:class:`ShardedCrossEntropy` (the mean softmax cross-entropy whose columns are split across
ranks, optionally with a margin head fused into it). Both run
in the dtype of their inputs; :class:`dist_train.partial_fc.PartialFC` calls them in fp32 with
autocast off. Does not own the sampling, the weights or their optimizer
(:mod:`dist_train.partial_fc.module`, :mod:`dist_train.partial_fc.optimizer`), nor the margin
maths (``heads.margins``).

Gradient convention: the backward gives this shard's columns exactly their part of
∂loss/∂logits for the *global* mean loss (the same value on every rank); the all-gather's
backward then sums the parts over ranks (see :mod:`dist_train.collectives`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dist_train.distributed import all_reduce


class CosineLinear(torch.autograd.Function):
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


class ShardedCrossEntropy(torch.autograd.Function):
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
        # Every row takes part with a fixed shape (no data-dependent row selection, hence no
        # host read): rows whose class is on another shard point at column 0 and are masked.
        valid = target >= 0
        col = target.clamp_min(0).unsqueeze(1)
        ctx.head = head
        if s == 0:  # no class on this shard: only the all-reduces take part
            logits = z.clone()
            row_max = logits.new_full((n,), -math.inf)
            all_reduce(row_max, "max")
            target_shifted = logits.new_zeros(n)
            all_reduce(target_shifted, "sum")
            sum_exp = logits.new_zeros(n)
            all_reduce(sum_exp, "sum")
            ctx.save_for_backward(logits, valid, col)
            ctx.graph = None
            ctx.consumed = False
            return (sum_exp.log() - target_shifted).mean()
        if head is not None:
            with torch.enable_grad():
                # A neutral cosine on masked rows keeps their (discarded) derivative finite.
                cos_t = torch.where(valid, _take(z, col), 0.0).detach().requires_grad_(True)
                value_t = head.target_logit(cos_t) * head.s
            logits = z * head.s
            if head.interclass_threshold > 0:
                logits.masked_fill_(_filtered(z, valid, col, head.interclass_threshold), 0.0)
            _put(logits, col, valid, value_t.detach())
            ctx.graph = (cos_t, value_t)
        else:
            logits = z.clone()
            ctx.graph = None
        row_max = logits.amax(dim=1)
        all_reduce(row_max, "max")
        target_shifted = torch.where(valid, _take(logits, col) - row_max, 0.0)
        all_reduce(target_shifted, "sum")
        probs = logits.sub_(row_max.unsqueeze(1)).exp_()  # in place: logits become exp(z − max)
        sum_exp = probs.sum(dim=1)
        all_reduce(sum_exp, "sum")
        loss = (sum_exp.log() - target_shifted).mean()
        probs.div_(sum_exp.unsqueeze(1))
        to_save = (probs, valid, col) + ((z,) if head is not None else ())
        ctx.save_for_backward(*to_save)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("PartialFC's cross-entropy cannot be back-propagated twice")
        ctx.consumed = True
        probs, valid, col, *rest = ctx.saved_tensors
        # The softmax turns into ∂loss/∂logits in place: one [N, S] buffer for the whole chain.
        grad = probs
        if grad.shape[1] == 0:
            return grad, None, None
        grad.scatter_add_(1, col, valid.to(grad.dtype).neg_().unsqueeze(1))
        grad.mul_(grad_loss / probs.shape[0])
        head = ctx.head
        if head is None:
            return grad, None, None
        cos_t, value_t = ctx.graph
        # A scalar output (no explicit grad_outputs): autograd's shape check for explicit
        # gradients imports sympy on first use, seconds per process.
        with torch.enable_grad():
            weighted = (value_t * torch.where(valid, _take(grad, col), 0.0)).sum()
        (grad_cos_t,) = torch.autograd.grad(weighted, cos_t)
        grad.mul_(head.s)
        if head.interclass_threshold > 0:
            grad.masked_fill_(_filtered(rest[0], valid, col, head.interclass_threshold), 0.0)
        _put(grad, col, valid, grad_cos_t)
        ctx.graph = None
        return grad, None, None


def _take(t: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``t[i, col[i]]`` for every row i."""
    return t.gather(1, col).squeeze(1)


def _put(t: torch.Tensor, col: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> None:
    """``t[i, col[i]] = values[i]`` on the rows where ``valid``; other rows keep their entry."""
    t.scatter_(1, col, torch.where(valid, values, _take(t, col)).unsqueeze(1))


def _filtered(cos: torch.Tensor, valid: torch.Tensor, col: torch.Tensor, threshold: float):
    """Mask of non-target cosines above the inter-class filtering threshold."""
    dirty = cos > threshold
    _put(dirty, col, valid, torch.zeros_like(valid))
    return dirty


class Workspace:
    """The step-sized buffers of :class:`CosineCrossEntropy` (the ``[S + 1, N]`` logits and the
    ``[S, D]`` rows' gradient), kept from one step to the next on CPU.

    glibc serves allocations above 32 MB with fresh ``mmap`` pages, so buffers of this size
    allocated every step page-fault on their first write, every step (a tenth of the matmuls'
    time at S = 50,000, N = 256, D = 512). A buffer is handed out again only when nothing but
    the workspace holds its storage: a gradient still held (a leaf's ``.grad`` under gradient
    accumulation, a caller's reference) or the buffer of a forward whose backward has not run
    keeps its memory, and the next request gets a new buffer. A handed-out tensor is a fresh
    view, so autograd's gradient accumulation takes it over without a copy. On other devices
    (CUDA's caching allocator already reuses blocks) every request is a plain allocation.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def __reduce__(self):  # a copy (deepcopy, pickle) of the owner starts with no buffers
        return (Workspace, ())

    def empty(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape``, with ``like``'s dtype and device."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != like.dtype or buf.numel() < numel or _held(buf):
            buf = self._buffers[name] = like.new_empty(numel)
        return buf[:numel].view(shape)


def _held(buf: torch.Tensor) -> bool:
    """True when a tensor other than ``buf`` shares its storage. The count includes ``buf``
    and the storage object that the call creates (or one that already exists)."""
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) > 2


CPU_BLOCK_BYTES = 2**20
"""Size of the ``[rows, N]`` logits block of :class:`CosineCrossEntropy` on CPU: the block and
its ``[rows, D]`` class rows stay in a core's L2/L3 across the elementwise steps. At N = 256,
D = 512 (2 MiB L2 per core) 1 MiB beat 256 KiB, 512 KiB and 2 MiB by 0.02–0.03× the matmuls'
time: fewer, larger matmuls and fewer per-block dispatches."""
RADIAL_ROWS = 128
"""Rows per sub-block of the rows' gradient in the backward of :func:`_linear_forward`: the
matmul writes 128·D values that the radial part's row dot products and update then read
from L2 (on CPU at S = 50,000, N = 256, D = 512, 0.04× the matmuls' time less than whole
blocks; 256 rows gained nothing)."""
CUDA_BLOCK_BYTES = 256 * 2**20
"""The same on CUDA: few, large kernels at a bounded memory cost."""


def block_rows(device: torch.device, batch: int, itemsize: int) -> int:
    """Classes per block of :class:`CosineCrossEntropy` for a global batch of ``batch`` rows.

    Any value gives the same result up to the rounding of the blockwise sums.
    """
    size = CUDA_BLOCK_BYTES if device.type == "cuda" else CPU_BLOCK_BYTES
    return max(16, size // (max(batch, 1) * itemsize))


def fused(head: Any) -> bool:
    """True when ``head`` supplies the hooks of :class:`CosineCrossEntropy` (see
    :mod:`heads.margins`: ``target_logit``, ``nontarget_logits``, ``nontarget_grad_``)."""
    return all(
        callable(getattr(head, name, None))
        for name in ("target_logit", "nontarget_logits", "nontarget_grad_")
    )


class ClassRows:
    """The S class rows of a step in the maths dtype, read a block at a time.

    ``source=None``: views of ``w`` (a materialised ``[S, D]`` tensor). ``source=(weight,
    index)``: rows ``weight[index[a:b]]`` of the shard (any storage dtype), gathered into one
    block buffer reused for every block, so the ``[S, D]`` copy of the sampled rows never
    exists (its write and page faults were a sixth of the matmuls' time on CPU).
    """

    def __init__(self, w: torch.Tensor, source: tuple | None, rows: int) -> None:
        self.w, self.source = w, source
        self.buf = None if source is None else w.new_empty(min(rows, w.shape[0]), w.shape[1])

    def block(self, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)``."""
        if self.source is None:
            return self.w[a:b]
        weight, index = self.source
        out = self.buf[: b - a]
        if weight.dtype == out.dtype:
            return torch.index_select(weight, 0, index[a:b], out=out)
        return out.copy_(weight.index_select(0, index[a:b]))

    def take(self, cols: torch.Tensor) -> torch.Tensor:
        """Rows at the positions ``cols`` (``[len(cols), D]``, a new tensor)."""
        if self.source is None:
            return self.w.detach().index_select(0, cols)
        weight, index = self.source
        return weight.index_select(0, index.index_select(0, cols)).to(self.w.dtype)


def target_cosines(
    x_hat: torch.Tensor, w: torch.Tensor, target: torch.Tensor, source: tuple | None = None
) -> torch.Tensor:
    """``[N]`` cosine of each row with its target class row ``w[target[i]]`` (the rows as
    :class:`ClassRows` of ``w``, ``source`` reads them); 0 where ``target[i] < 0`` (the class
    is on another shard). No graph: N dot products."""
    if w.shape[0] == 0:
        return x_hat.new_zeros(x_hat.shape[0])
    rows = ClassRows(w, source, 0).take(target.clamp_min(0))
    cos = torch.linalg.vecdot(x_hat.detach(), rows).div_(rows.norm(dim=1).clamp_min_(1e-12))
    return torch.where(target >= 0, cos, 0.0)


class CosineCrossEntropy(torch.autograd.Function):
    """Cosines x̂·ŵᵀ, margin and the cross-entropy across class shards, class block by block.

    ``apply(x_hat [N, D], w [S, D], target [N], head, norms [N] or None, source, workspace)
    -> (loss, cos_t)``; ``source``: ``None`` (the rows are ``w``'s values) or ``(weight,
    index)``: the rows are ``weight[index]``, read block by block (:class:`ClassRows`), and
    ``w`` is only the leaf that receives their gradient (its values are not read);
    ``workspace``: a :class:`Workspace` that serves the ``[S + 1, N]`` buffer and ``w``'s
    gradient across steps (``None``: new ones every call).
    ``loss`` the global mean loss (same value on every rank), ``cos_t [N]`` each row's target
    cosine (0 on rows whose class is on another shard), differentiable (a penalty on it, such
    as the intra-class angle, back-propagates into ``x_hat`` and ``w``).

    The logits of a row are ``head.s · head.target_logit(cos_t[, norms])`` at its target column
    (with autograd on the ``[N]`` target cosines only, so any target logit gets its true
    gradient, including through ``norms``) and ``head.nontarget_logits(cos)`` elsewhere.

    The classes are processed in blocks of :func:`block_rows` rows, class-major (``[S, N]``),
    so that a block's ``[rows, D]`` rows, their cosines and logits stay in cache between the
    matmul and the elementwise steps. Heads whose non-target logit is ``s·cos``
    (``nontarget_scale``; ArcFace, CosFace, AdaFace, ElasticFace, MagFace, …) take a two-sweep
    path (:func:`_linear_forward`): 5 elementwise passes over ``[S, N]`` in forward, 1 in
    backward, the scale and 1/‖w_j‖ folded into one multiply. Other heads (CurricularFace,
    inter-class filtering) take the general path: in forward, per block, the head's
    ``nontarget_logits`` and an online log-sum-exp (running max, rescaled running sum); in
    backward the softmax rebuilt per block, times the head's ``nontarget_grad_``. Memory
    either way: one ``[S, N]`` tensor kept for backward (logits → exponentials → gradient, or
    the cosines), plus a block-sized scratch. Collectives: one all-reduce of the row max and
    one of (sum of exponentials, target logit) per step.
    """

    @staticmethod
    def forward(ctx, x_hat, w, target, head, norms, source=None, workspace=None):  # type: ignore[override]
        n = x_hat.shape[0]
        s = w.shape[0]
        valid = target >= 0
        col = target.clamp_min(0)
        cos_t = target_cosines(x_hat, w, target, source)
        with torch.enable_grad():
            cos_leaf = cos_t.detach().requires_grad_(True)
            inputs, kw = [cos_leaf], {}
            if norms is not None:
                kw["norms"] = norms.detach().requires_grad_(ctx.needs_input_grad[4])
                if ctx.needs_input_grad[4]:
                    inputs.append(kw["norms"])
            value_t = head.s * head.target_logit(cos_leaf, **kw)
        value = torch.where(valid, value_t.detach(), 0.0)
        rows = block_rows(x_hat.device, n, x_hat.element_size())
        ctx.head, ctx.graph, ctx.rows, ctx.consumed = head, (inputs, value_t), rows, False
        ctx.linear = getattr(head, "nontarget_scale", None)
        ctx.source = source
        ctx.workspace = workspace = workspace if workspace is not None else Workspace()
        w_rows = ClassRows(w, source, rows)
        if ctx.linear is not None:
            loss = _linear_forward(ctx, x_hat, w, w_rows, value, valid, col, rows, ctx.linear)
            return loss, cos_t
        cos_all = workspace.empty("logits", (s, n), x_hat)  # class-major: blocks contiguous
        inv = x_hat.new_empty(s)
        scratch = x_hat.new_empty(rows + 1, n)  # the extra row takes the other blocks' targets
        pos = _target_positions(col, valid, s, rows, n)
        run_max = x_hat.new_full((n,), torch.finfo(x_hat.dtype).min)
        new_max = torch.empty_like(run_max)
        run_sum = x_hat.new_zeros(n)
        flat = scratch.view(-1)
        xt = x_hat.t()
        for blk, a in enumerate(range(0, s, rows)):
            b = min(a + rows, s)
            wb, cb, iv, lb = w_rows.block(a, b), cos_all[a:b], inv[a:b], scratch[: b - a]
            torch.linalg.vector_norm(wb, dim=1, out=iv).clamp_min_(1e-12).reciprocal_()
            torch.mm(wb, xt, out=cb).mul_(iv.unsqueeze(1))
            head.nontarget_logits(cb, lb)
            flat.index_fill_(0, pos[blk], -math.inf)  # the target logits are added below
            torch.maximum(run_max, lb.amax(dim=0), out=new_max)
            run_sum.mul_(run_max.sub_(new_max).exp_())
            run_sum.add_(lb.sub_(new_max).exp_().sum(dim=0))
            run_max, new_max = new_max, run_max
        # Across ranks: the row max (the target logit included), then Σ exp(z − max) and the
        # target's shifted logit in one all-reduce.
        row_max = torch.where(valid, torch.maximum(run_max, value), run_max)
        all_reduce(row_max, "max")
        sums = torch.stack(
            [
                run_sum.mul_(run_max.sub_(row_max).exp_()).add_(
                    torch.where(valid, (value - row_max).exp(), 0.0)
                ),
                torch.where(valid, value - row_max, 0.0),
            ]
        )
        all_reduce(sums, "sum")
        lse = sums[0].log().add_(row_max)
        loss = (sums[0].log() - sums[1]).mean()
        ctx.save_for_backward(x_hat, w, cos_all, inv, lse, value, valid, col, pos)
        return loss, cos_t

    @staticmethod
    def backward(ctx, grad_loss, grad_cos_t):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError("PartialFC's cross-entropy cannot be back-propagated twice")
        ctx.consumed = True
        x_hat, w, buf, inv, lse, value, valid, col, pos = ctx.saved_tensors
        head, (inputs, value_t), rows = ctx.head, ctx.graph, ctx.rows
        ctx.graph = None
        n, s = x_hat.shape[0], w.shape[0]
        scale = grad_loss / n
        # ∂loss/∂(target logit) = (p_target − 1)/N on the rows whose class is here
        d_value = torch.where(valid, (value - lse).exp().sub_(1.0).mul_(scale), 0.0)
        with torch.enable_grad():  # a scalar output: no shape check of explicit gradients
            grads = torch.autograd.grad((value_t * d_value).sum(), inputs, allow_unused=True)
        if len(grads) > 1 and grads[1] is None:
            grads = (grads[0], torch.zeros_like(inputs[1]))
        d_cos_t = grads[0] if grads[0] is not None else torch.zeros_like(d_value)
        if grad_cos_t is not None:
            d_cos_t = d_cos_t + grad_cos_t
        d_cos_t = torch.where(valid, d_cos_t, 0.0)
        grad_norms = grads[1] if len(grads) > 1 else None
        grad_x = torch.zeros_like(x_hat) if ctx.needs_input_grad[0] else None
        grad_w = ctx.workspace.empty("grad_rows", w.shape, w) if ctx.needs_input_grad[1] else None
        ctx.workspace = None
        if s == 0 or (grad_x is None and grad_w is None):
            return grad_x, grad_w, None, None, grad_norms, None, None
        # ∂loss/∂(x̂·w_j) at the target columns: the target cosine's gradient / ‖w_j‖
        d_target = d_cos_t * inv.index_select(0, col)
        w_rows = ClassRows(w, ctx.source, rows)
        ctx.source = None
        if ctx.linear is not None:
            _linear_backward(
                ctx, x_hat, w_rows, buf, inv, lse, pos, d_target, scale, grad_x, grad_w
            )
            return grad_x, grad_w, None, None, grad_norms, None, None
        cos_all = buf
        scratch = x_hat.new_empty(rows + 1, n)
        flat = scratch.view(-1)
        for blk, a in enumerate(range(0, s, rows)):
            b = min(a + rows, s)
            wb, cb, iv, gb = w_rows.block(a, b), cos_all[a:b], inv[a:b], scratch[: b - a]
            head.nontarget_logits(cb, gb)
            gb.sub_(lse).exp_().mul_(scale)
            head.nontarget_grad_(cb, gb)
            gb.mul_(iv.unsqueeze(1))
            flat.index_put_((pos[blk],), d_target)
            if grad_w is not None:
                torch.mm(gb, x_hat, out=grad_w[a:b])
            if grad_x is not None:
                grad_x.addmm_(gb.t(), wb)
            if grad_w is not None:
                # ∂cos_ij/∂w_j = (x̂_i − cos_ij ŵ_j)/‖w_j‖: the radial part, row by row
                coef = gb.mul_(cb).sum(dim=1).mul_(iv)
                grad_w[a:b].addcmul_(wb, coef.unsqueeze(1), value=-1.0)
        return grad_x, grad_w, None, None, grad_norms, None, None


def _target_positions(
    col: torch.Tensor, valid: torch.Tensor, s: int, rows: int, n: int, whole: bool = False
) -> torch.Tensor:
    """``[blocks, N]`` flat positions of each row's target logit, block by block.

    In a ``[rows + 1, N]`` block buffer (``whole=False``): ``(col − block start)·N + i`` in
    the block holding row i's class, the spare last row (``rows·N + i``) in every other
    block. In the ``[S + 1, N]`` buffer of all blocks (``whole=True``): ``col·N + i`` in its
    block, the spare row ``S·N + i`` elsewhere.
    """
    blocks = max(1, -(-s // rows))
    i = torch.arange(n, device=col.device)
    spare = (s if whole else rows) * n + i
    pos = spare.expand(blocks, n).clone()
    blk = torch.where(valid, col // rows, 0)
    here = torch.where(valid, (col if whole else col - blk * rows) * n + i, spare)
    pos.scatter_(0, blk.unsqueeze(0), here.unsqueeze(0))
    return pos


def _linear_forward(
    ctx, x_hat, w, w_rows, value, valid, col, rows: int, scale: float
) -> torch.Tensor:
    """Forward of :class:`CosineCrossEntropy` for heads whose non-target logits are ``s·cos``.

    Two sweeps over one ``[S + 1, N]`` buffer: the first writes the logits s·x̂·ŵᵀ block by
    block (the matmul, then one multiply by s/‖w_j‖ while the block is in cache) and takes
    the row max; after the max's all-reduce the second turns them into exp(z − max) in place
    (the targets' entries 0) and sums them. The buffer is kept: backward needs only it.
    """
    n, s = x_hat.shape[0], w.shape[0]
    buf = ctx.workspace.empty("logits", (s + 1, n), x_hat)  # spare row: other blocks' targets
    inv = x_hat.new_empty(s)
    run_max = x_hat.new_full((n,), torch.finfo(x_hat.dtype).min)
    xt = x_hat.t()
    for a in range(0, s, rows):
        b = min(a + rows, s)
        wb, lb, iv = w_rows.block(a, b), buf[a:b], inv[a:b]
        torch.linalg.vector_norm(wb, dim=1, out=iv).clamp_min_(1e-12).reciprocal_()
        torch.mm(wb, xt, out=lb).mul_(iv.mul(scale).unsqueeze(1))
        torch.maximum(run_max, lb.amax(dim=0), out=run_max)
    # The target entry's s·cos_t is in the max: any shift at or above the row's largest logit
    # (up to a few units) gives the same loss; then Σ exp(z − max) and the target's shifted
    # logit in one all-reduce.
    row_max = torch.where(valid, torch.maximum(run_max, value), run_max)
    all_reduce(row_max, "max")
    pos = _target_positions(col, valid, s, rows, n, whole=True)
    flat = buf.view(-1)
    flat.index_fill_(0, pos.flatten(), -math.inf)  # the target logits are added below
    run_sum = x_hat.new_zeros(n)
    for a in range(0, s, rows):
        run_sum.add_(buf[a : min(a + rows, s)].sub_(row_max).exp_().sum(dim=0))
    sums = torch.stack(
        [
            run_sum.add_(torch.where(valid, (value - row_max).exp(), 0.0)),
            torch.where(valid, value - row_max, 0.0),
        ]
    )
    all_reduce(sums, "sum")
    lse = sums[0].log().add_(row_max)
    loss = (sums[0].log() - sums[1]).mean()
    ctx.row_max = row_max
    ctx.save_for_backward(x_hat, w, buf, inv, lse, value, valid, col, pos)
    return loss


def _linear_backward(
    ctx, x_hat, w_rows, buf, inv, lse, pos, d_target, scale, grad_x, grad_w
) -> None:
    """Backward of :func:`_linear_forward`, in place in its buffer.

    The buffer holds e_ij = exp(z_ij − max_i); the gradient wrt x̂·w_j is
    e_ij · r_i · c_j with r_i = exp(max_i − lse_i) ∈ (0, 1] and c_j = s/(N‖w_j‖): one
    multiply by c per block, r folded into the embeddings (for the rows' gradient) and applied
    to the embeddings' gradient once at the end. The radial part of ∂cos/∂w_j needs
    Σ_i g_ij cos_ij = (w_j · Σ_i g_ij x̂_i)/‖w_j‖: a row dot product of the block's rows and
    their fresh gradient, both in cache (the rows' gradient is made :data:`RADIAL_ROWS` rows
    at a time).
    """
    s, rows = w_rows.w.shape[0], ctx.rows
    row_f = (ctx.row_max - lse).exp_()
    x_r = x_hat * row_f.unsqueeze(1)
    col_f = inv * (scale * ctx.linear)
    inv_sq = inv.square()
    t_vals = d_target / row_f
    acc_x = torch.zeros_like(x_hat) if grad_x is not None else None
    flat = buf.view(-1)
    for blk, a in enumerate(range(0, s, rows)):
        b = min(a + rows, s)
        wb, gb = w_rows.block(a, b), buf[a:b]
        gb.mul_(col_f[a:b].unsqueeze(1))
        flat.index_put_((pos[blk],), t_vals)
        if acc_x is not None:
            acc_x.addmm_(gb.t(), wb)
        if grad_w is not None:
            # In sub-blocks, so that a sub-block's gradient is still in L2 for its radial part.
            for c in range(0, b - a, RADIAL_ROWS):
                e = min(c + RADIAL_ROWS, b - a)
                gw = torch.mm(gb[c:e], x_r, out=grad_w[a + c : a + e])
                # Σ_i g_ij cos_ij / ‖w_j‖ = (w_j · Σ_i g_ij x̂_i) / ‖w_j‖²
                coef = torch.linalg.vecdot(wb[c:e], gw).mul_(inv_sq[a + c : a + e])
                gw.addcmul_(wb[c:e], coef.unsqueeze(1), value=-1.0)
    if grad_x is not None:
        torch.mul(acc_x, row_f.unsqueeze(1), out=grad_x)

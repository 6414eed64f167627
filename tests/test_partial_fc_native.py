"""The compiled SGD row update (dist_train.partial_fc.native) against the torch path.

The kernel must give the torch path's result (bit for bit in fp32 storage, where both round
alike), round bf16 storage without bias, not depend on how rows are split across threads, and
step aside cleanly (one warning, the torch path) where it cannot be built.
"""

from __future__ import annotations

import pytest
import torch

from dist_train.optim import update_rows
from dist_train.partial_fc import native

D = 64
GROUP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": False}

needs_kernel = pytest.mark.skipif(
    native.library() is None, reason="no C compiler: the compiled kernel cannot be built"
)


def torch_step(w, m, index, grad, group, dense=False):
    """dist_train.optim.update_rows on fp32 copies of the rows (the reference)."""
    w32, m32 = w.float().clone(), m.float().clone()
    if dense:
        g = torch.zeros_like(w32)
        g[index] = grad
        rows = torch.arange(w.shape[0])
    else:
        g, rows = grad.clone(), index
    ww, mm = w32[rows], m32[rows]
    update_rows("sgd", ww, g, {"momentum_buffer": mm}, group)
    w32[rows], m32[rows] = ww, mm
    return w32, m32


def problem(c=300, k=70, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c, D, generator=gen)
    m = torch.randn(c, D, generator=gen)
    index = torch.randperm(c, generator=gen)[:k].sort().values
    grad = torch.randn(k, D, generator=gen)
    return w, m, index, grad


@needs_kernel
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mode", ["sparse", "dense", "every"])
def test_fp32_rows_match_the_torch_rule_exactly(mode, nesterov):
    w, m, index, grad = problem()
    group = {**GROUP, "nesterov": nesterov}
    if mode == "every":
        index, grad = torch.arange(w.shape[0]), torch.randn(w.shape[0], D)
    want_w, want_m = torch_step(w, m, index, grad, group, dense=mode == "dense")
    ok = native.sgd_step(
        w, m, None if mode == "every" else index, grad, group, True, dense=mode == "dense"
    )
    assert ok
    # the same fp32 operations in the same order, fused where torch's kernels fuse them
    assert torch.equal(w, want_w)
    assert torch.equal(m, want_m)
    if mode == "sparse":  # rows outside the index are untouched
        others = torch.ones(w.shape[0], dtype=torch.bool)
        others[index] = False
        w0, m0, _, _ = problem()
        assert torch.equal(w[others], w0[others]) and torch.equal(m[others], m0[others])


@needs_kernel
@pytest.mark.parametrize(
    "wdt,mdt",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],  # fmt: skip
)
def test_bf16_storage_rounds_to_nearest_even_like_torch(wdt, mdt):
    w, m, index, grad = problem()
    w, m = w.to(wdt), m.to(mdt)
    want_w, want_m = torch_step(w, m, index, grad, GROUP)
    assert native.sgd_step(w, m, index, grad, GROUP, stochastic=False)
    assert torch.equal(w, want_w.to(wdt))
    assert torch.equal(m, want_m.to(mdt))


@needs_kernel
def test_bf16_stochastic_rounding_is_unbiased_and_seeded():
    # w - lr·m lands between two bf16 neighbours of 1: the mean over many rows keeps it
    c = 4000
    w = torch.ones(c, D, dtype=torch.bfloat16)
    m = torch.zeros(c, D, dtype=torch.bfloat16)
    grad = torch.full((c, D), -(2**-10) / 0.05)  # w + 2^-10, a third of bf16's ulp at 1 (2^-7)
    group = {**GROUP, "momentum": 0.5, "weight_decay": 0.0}
    torch.manual_seed(3)
    assert native.sgd_step(w, m, None, grad, group, stochastic=True)
    assert set(w.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert w.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert m.float().mean().item() == pytest.approx(-(2**-10) / 0.05, rel=1e-3)
    # seeded by torch's generator: the same seed gives the same rows
    w2 = torch.ones(c, D, dtype=torch.bfloat16)
    m2 = torch.zeros(c, D, dtype=torch.bfloat16)
    torch.manual_seed(3)
    native.sgd_step(w2, m2, None, grad, group, stochastic=True)
    assert torch.equal(w, w2) and torch.equal(m, m2)
    # round to nearest loses the update entirely
    w3 = torch.ones(c, D, dtype=torch.bfloat16)
    native.sgd_step(w3, torch.zeros_like(m), None, grad, group, stochastic=False)
    assert w3.float().unique().tolist() == [1.0]


@needs_kernel
def test_infinities_and_nan_survive_the_bf16_store():
    inf, nan = float("inf"), float("nan")
    w = torch.ones(1, 4, dtype=torch.bfloat16)
    m = torch.tensor([[inf, -inf, 0.0, nan]], dtype=torch.bfloat16)
    torch.manual_seed(0)
    assert native.sgd_step(w, m, None, torch.zeros(1, 4), GROUP, stochastic=True)
    assert m[0, :2].tolist() == [inf, -inf] and torch.isnan(m[0, 3])
    assert w[0, :2].tolist() == [-inf, inf] and torch.isnan(w[0, 3])
    assert w[0, 2].item() == pytest.approx(1.0 - 0.05 * 1e-3, abs=2**-7)


@needs_kernel
def test_the_result_does_not_depend_on_the_thread_split(monkeypatch):
    w, m, index, grad = problem(c=3000, k=900)
    w, m = w.bfloat16(), m.bfloat16()
    w1, m1 = w.clone(), m.clone()
    torch.manual_seed(5)
    native.sgd_step(w1, m1, index, grad, GROUP, stochastic=True)
    monkeypatch.setattr(native, "MIN_ROWS_PER_THREAD", 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert len(native._split(900)) == 3
        w2, m2 = w.clone(), m.clone()
        torch.manual_seed(5)
        native.sgd_step(w2, m2, index, grad, GROUP, stochastic=True)
        w3, m3 = w.clone(), m.clone()
        torch.manual_seed(5)
        native.sgd_step(w3, m3, index, grad, GROUP, stochastic=True, dense=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(w1, w2) and torch.equal(m1, m2)
    assert not torch.equal(w3, w1)  # dense: the rows outside the index decay too


def test_unsupported_tensors_are_left_to_the_torch_path():
    w, m, index, grad = problem()
    assert not native.sgd_step(w.double(), m.double(), index, grad.double(), GROUP, True)
    assert not native.sgd_step(w.half(), m.half(), index, grad, GROUP, True)
    assert not native.sgd_step(w, None, index, grad, {**GROUP, "momentum": 0.0}, True)
    assert not native.sgd_step(w.t(), m, index, grad, GROUP, True)


def test_without_a_compiler_the_optimizer_warns_once_and_takes_the_torch_path(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setenv("DIST_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    w, m, index, grad = problem()
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert not native.sgd_step(w, m, index, grad, GROUP, True)
    assert not native.sgd_step(w, m, index, grad, GROUP, True)  # no second warning, no build
    assert not list(tmp_path.iterdir())


@needs_kernel
def test_the_build_is_cached_and_a_failed_build_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setenv("DIST_TRAIN_CACHE", str(tmp_path))
    assert native.library() is not None
    built = list(tmp_path.glob("pfc_rows-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    assert native._build(native.shutil.which("cc")) == built[0]
    assert built[0].stat().st_mtime_ns == stamp  # not rebuilt
    # a source the compiler rejects: one line naming the compiler and the file
    bad = tmp_path / "rows.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(RuntimeError, match=r"failed on .*rows\.c: "):
        native._build(native.shutil.which("cc"))
    assert not list(tmp_path.glob("*.tmp"))


@needs_kernel
@pytest.mark.parametrize("update", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_optimizer_step_is_the_same_through_either_path(update, dtype):
    from dist_train.losses import build_head
    from dist_train.partial_fc import PartialFC

    def run(use_native):
        torch.manual_seed(0)
        pfc = PartialFC(
            build_head("arcface", {"s": 16.0, "m": 0.3}, 200), D, 200, sample_rate=0.3,
            update=update, weight_dtype=dtype, state_dtype=dtype, stochastic_rounding=False,
        )  # fmt: skip
        opt = pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        opt.use_native = use_native
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(16, D, generator=gen), torch.randint(0, 200, (16,), generator=gen)
            pfc(x, y).backward()
            opt.step()
            opt.zero_grad()
        return pfc.weight, opt.rows["momentum_buffer"], hasattr(opt, "_bufs")

    (w1, m1, bufs1), (w2, m2, bufs2) = run(True), run(False)
    assert not bufs1 and (bufs2 or update == "dense")  # each run took its own path
    # the same fp32 maths and the same rounding to nearest: the same bits
    assert torch.equal(w1, w2) and torch.equal(m1, m2)

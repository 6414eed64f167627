"""PartialFC in one process: parity with a full softmax, sampling, optimizers, dtypes, state.

The multi-process checks (2 and 3 gloo ranks) are in ``tests/test_partial_fc_dist.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import heads
from dist_train.losses import build_head
from dist_train.partial_fc import (
    CosineLinear,
    PartialFC,
    export_class_centers,
    init_rows,
    kernels,
    merge_state_dicts,
)
from dist_train.partial_fc.module import candidate_draws
from heads.margins_magnitude import takes_norms

D = 8


def make(name="arcface", c=11, rate=1.0, update="sparse", dtype=torch.float64, **kw):
    head = build_head(name, {}, c)
    return PartialFC(head, D, c, sample_rate=rate, update=update, weight_dtype=dtype, **kw)


def batch(n=6, c=11, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen, dtype=dtype), torch.randint(0, c, (n,), generator=gen)


def reference_loss(head, weight, x, labels):
    """Full-softmax loss; ``weight`` holds K = ``head.sub_centers`` rows per class."""
    extra = getattr(head, "extra_loss_sum", lambda c, y, **kw: c.new_zeros(()))
    cos = F.normalize(x) @ F.normalize(weight).t() if head.normalized else x @ weight.t()
    kw = {"norms": x.norm(dim=1)} if takes_norms(head) else {}
    loss = F.cross_entropy(head(cos, labels, **kw), labels)
    if getattr(head, "sub_centers", 1) > 1:
        cos = head.reduce_sub_centers(cos)
    return loss + extra(cos, labels, **kw) / x.shape[0]


def _assert_matches_full_softmax(pfc):
    """Loss and gradients of ``pfc`` (rate 1) equal a float64 full softmax over its classes."""
    x, y = batch()
    x.requires_grad_(True)
    loss = pfc(x, y)
    loss.backward()
    w_ref = pfc.weight.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_loss(pfc.margin, w_ref, x_ref, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pfc.sampled_weight.grad, w_ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", heads.HEADS.names(kind="margin"))
def test_single_process_matches_full_softmax(name):
    _assert_matches_full_softmax(make(name, init_std=0.5))


@pytest.mark.parametrize("name", heads.HEADS.names(kind="margin"))
def test_blockwise_kernel_matches_full_softmax_across_blocks(monkeypatch, name):
    # 11 classes in blocks of 3: four blocks, the last one partial, targets in each; the rows'
    # gradient in sub-blocks of 2 (the last one of each block partial)
    monkeypatch.setattr(kernels, "block_rows", lambda *args: 3)
    monkeypatch.setattr(kernels, "RADIAL_ROWS", 2)
    _assert_matches_full_softmax(make(name, init_std=0.5))


@pytest.mark.parametrize(
    "name,params",
    [
        ("arcface", {"interclass_threshold": 0.05, "intra_alpha": 0.3}),
        ("curricularface", {"intra_alpha": 0.3}),
    ],
)
def test_blockwise_kernel_filtering_and_penalty(monkeypatch, name, params):
    monkeypatch.setattr(kernels, "block_rows", lambda *args: 3)
    pfc = PartialFC(build_head(name, params, 11), D, 11, weight_dtype=torch.float64, init_std=0.5)
    _assert_matches_full_softmax(pfc)


def test_fused_heads_take_the_blockwise_kernel():
    fused = {n for n in heads.HEADS.names(kind="margin") if kernels.fused(build_head(n, {}, 11))}
    assert {"arcface", "cosface", "curricularface", "magface", "adaface"} <= fused
    assert "softmax" not in fused


def test_cosine_linear_gradcheck():
    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(4, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(CosineLinear.apply, (x, w))


def test_large_scale_loss_is_exact_in_log_space():
    # A target probability of e^-100 would be clamped by a 1e-30 floor (loss 69.08).
    pfc = make("softmax", c=2, init_std=1.0, dtype=torch.float32)
    with torch.no_grad():
        pfc.weight.copy_(torch.tensor([[10.0] + [0.0] * (D - 1), [0.0] * D]))
    x = torch.zeros(1, D)
    x[0, 0] = 10.0
    loss = pfc(x, torch.tensor([1]))
    assert loss.item() == pytest.approx(100.0, rel=1e-6)


@pytest.mark.parametrize("bad", [-1, 11, 1000])
def test_out_of_range_label_raises_naming_the_value(bad):
    pfc = make()
    x, y = batch()
    y[2] = bad
    with pytest.raises(ValueError, match=rf"label {bad} at position 2 .*\[0, 11\)"):
        pfc(x, y)


def test_wrong_shapes_raise():
    pfc = make()
    with pytest.raises(ValueError, match="embeddings"):
        pfc(torch.zeros(3, D + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        pfc(torch.zeros(3, D), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("rate,c", [(0.1, 1000), (0.3, 1000), (0.05, 57), (0.02, 5000)])
def test_sampling_count_positives_and_target_columns(rate, c):
    pfc = make(c=c, rate=rate)
    for seed in range(5):
        _, labels = batch(n=40, c=c, seed=seed)
        index, target = pfc.sample(labels)
        positives = torch.unique(labels)
        assert index.numel() == min(c, max(int(rate * c), labels.numel())) == pfc.sample_size(40)
        assert torch.equal(index, torch.unique(index)), "sorted and without repeats"
        assert torch.isin(positives, index).all()
        assert torch.equal(index[target], labels)


@pytest.mark.parametrize(
    "c,rate,draws",
    [(200, 0.25, False), (2000, 0.05, True)],  # every row scored; O(S) draws (candidate_draws)
)
def test_negatives_are_uniform(c, rate, draws):
    trials = 2000
    pfc = make(c=c, rate=rate)
    assert (candidate_draws(c, pfc.sample_size(4)) is not None) == draws
    labels = torch.tensor([3, 7, 7, 150])
    counts = torch.zeros(c)
    for _ in range(trials):
        index, _ = pfc.sample(labels)
        counts[index] += 1
    negatives = torch.ones(c, dtype=torch.bool)
    negatives[[3, 7, 150]] = False
    assert (counts[~negatives] == trials).all()
    p = (int(rate * c) - 3) / (c - 3)
    freq = counts[negatives] / trials
    sd = math.sqrt(p * (1 - p) / trials)
    assert counts[negatives].sum().item() == trials * (int(rate * c) - 3)  # k − P per draw
    assert (freq - p).abs().max().item() < 5 * sd
    # Chi-square of the inclusion counts: a uniform sampler gives about dof ± a few √(2 dof).
    chi2 = (((counts[negatives] - trials * p) ** 2) / (trials * p * (1 - p))).sum().item()
    dof = int(negatives.sum())
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "opt", [dict(name="sgd", momentum=0.9, weight_decay=5e-4), dict(name="adamw", weight_decay=0.1)]
)
def test_sparse_update_leaves_unsampled_rows_and_state_bit_identical(opt, state_dtype):
    pfc = make(c=500, rate=0.1, dtype=torch.float32, state_dtype=state_dtype)
    pfc.configure_optimizer(lr=0.1, **opt)
    for step in range(3):
        weight0 = pfc.weight.clone()
        rows0 = {k: v.clone() for k, v in pfc.optimizer.rows.items()}
        x, y = batch(n=8, c=500, seed=step, dtype=torch.float32)
        pfc(x, y).backward()
        pfc.optimizer.step()
        pfc.optimizer.zero_grad()
        untouched = torch.ones(500, dtype=torch.bool)
        untouched[pfc.sampled_index] = False
        assert untouched.sum() == 500 - 50
        assert torch.equal(pfc.weight[untouched], weight0[untouched])
        assert not torch.equal(pfc.weight[~untouched], weight0[~untouched])
        for key, value in pfc.optimizer.rows.items():
            assert torch.equal(value[untouched], rows0[key][untouched]), key
    if opt["name"] == "adamw":
        assert pfc.optimizer.rows["step"].max() <= 3 and pfc.optimizer.rows["step"].min() == 0


@pytest.mark.parametrize(
    "name,kw,ref_cls",
    [
        ("sgd", dict(momentum=0.9, weight_decay=1e-3), torch.optim.SGD),
        ("sgd", dict(momentum=0.9, weight_decay=1e-3, nesterov=True), torch.optim.SGD),
        ("adam", dict(weight_decay=1e-3), torch.optim.Adam),
        ("adamw", dict(weight_decay=0.05), torch.optim.AdamW),
    ],
)
@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_rate_one_matches_torch_optimizer(name, kw, ref_cls, update):
    pfc = make(c=11, update=update, init_std=0.5)
    pfc.configure_optimizer(name, lr=0.05, **kw)
    w_ref = pfc.weight.clone().requires_grad_(True)
    ref_opt = ref_cls([w_ref], lr=0.05, **kw)
    for step in range(4):
        x, y = batch(seed=step)
        pfc(x, y).backward()
        pfc.optimizer.step()
        pfc.optimizer.zero_grad()
        reference_loss(pfc.margin, w_ref, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    torch.testing.assert_close(pfc.weight, w_ref.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_dense_mode_matches_torch_optimizer_on_the_full_shard(name):
    # partial_fc_v2: one parameter, zero gradient on unsampled rows, decay on every row.
    pfc = make(c=40, rate=0.25, update="dense", init_std=0.5)
    pfc.configure_optimizer(name, lr=0.05, momentum=0.9, weight_decay=0.01)
    w_ref = pfc.weight.clone().requires_grad_(True)
    ref_cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    extra = {"momentum": 0.9} if name == "sgd" else {}
    ref_opt = ref_cls([w_ref], lr=0.05, weight_decay=0.01, **extra)
    for step in range(4):
        x, y = batch(n=5, c=40, seed=step)
        pfc(x, y).backward()
        grad = torch.zeros_like(w_ref)
        grad[pfc.sampled_index] = pfc.sampled_weight.grad
        w_ref.grad = grad
        pfc.optimizer.step()
        ref_opt.step()
    torch.testing.assert_close(pfc.weight, w_ref.detach(), rtol=1e-9, atol=1e-12)


def test_optimizer_is_a_torch_optimizer_with_lr_in_param_groups():
    pfc = make(dtype=torch.float32)
    opt = pfc.configure_optimizer("sgd", lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    x, y = batch(dtype=torch.float32)
    pfc(x, y).backward()
    w0 = pfc.weight.clone()
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert torch.equal(pfc.weight, w0 * 1.0 - 0.0 * w0)
    opt.param_groups[0]["lr"] = 0.1
    opt.step()
    assert not torch.equal(pfc.weight, w0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    del scheduler


def test_grad_scaler_unscales_steps_and_skips_inf():
    pfc = make(c=50, rate=0.5, dtype=torch.float32)
    opt = pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = batch(n=6, c=50, dtype=torch.float32)
    scaler.scale(pfc(x, y)).backward()
    scaled = pfc.sampled_weight.grad.clone()
    scaler.unscale_(opt)
    torch.testing.assert_close(pfc.sampled_weight.grad, scaled / 1024.0)
    w0 = pfc.weight.clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(pfc.weight, w0)
    # An inf gradient: the step is skipped, weights and momentum unchanged, scale halved.
    opt.zero_grad()
    scaler.scale(pfc(x, y)).backward()
    pfc.sampled_weight.grad[0, 0] = float("inf")
    w1, m1 = pfc.weight.clone(), opt.rows["momentum_buffer"].clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(pfc.weight, w1) and torch.equal(opt.rows["momentum_buffer"], m1)
    assert scaler.get_scale() == 512.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage_under_autocast_trains_with_fp32_state(dtype):
    torch.manual_seed(0)
    c = 20
    pfc = PartialFC(heads.get_head("arcface"), D, c, weight_dtype=dtype, init_std=0.1)
    opt = pfc.configure_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=0.0)
    x = torch.randn(16, D)
    y = torch.arange(16) % c
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=dtype):
            loss = pfc(x.to(dtype), y)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert pfc.weight.dtype == dtype
    assert opt.rows["momentum_buffer"].dtype == torch.float32
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_stochastic_rounding_is_unbiased():
    from dist_train.partial_fc import stochastic_round_bf16

    torch.manual_seed(0)
    x = torch.full((200000,), 1.0 + 2**-10)  # between two bf16 neighbours (1 and 1 + 2^-7)
    rounded = stochastic_round_bf16(x).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)


def test_init_rows_do_not_depend_on_the_split():
    full = init_rows(0, 150000, 150000, 4, std=0.01, seed=5, dtype=torch.float32)
    part = init_rows(60000, 140000, 150000, 4, std=0.01, seed=5, dtype=torch.float32)
    assert torch.equal(full[60000:140000], part)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_state_dict_round_trip_and_errors(state_dtype):
    pfc = make(c=11, update="sparse", state_dtype=state_dtype)
    pfc.configure_optimizer("adamw", lr=0.01)
    x, y = batch()
    pfc(x, y).backward()
    pfc.optimizer.step()
    state = pfc.shard_state()
    assert state["pieces"][0]["start"] == 0 and state["pieces"][0]["stop"] == 11
    other = make(c=11, seed=9, state_dtype=state_dtype)
    other.load_shard_pieces(state)  # rows wait for the optimizer
    other.configure_optimizer("adamw", lr=0.01)
    assert torch.equal(other.weight, pfc.weight)
    for key, value in pfc.optimizer.rows.items():
        assert torch.equal(other.optimizer.rows[key], value)
    torch.testing.assert_close(other(x, y), pfc(x, y))
    wrong = make(c=11)
    wrong.load_shard_pieces(state)
    with pytest.raises(ValueError, match="'adamw' optimizer rows"):
        wrong.configure_optimizer("sgd", lr=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        make(c=12).load_shard_pieces(state)
    half = {**state, "pieces": [{**state["pieces"][0], "stop": 5, "rows": {}}]}
    half["pieces"][0]["weight"] = state["pieces"][0]["weight"][:5]
    with pytest.raises(ValueError, match="covers 5 of the 11"):
        make(c=11).load_shard_pieces(half)
    with pytest.raises(ValueError, match="overlap"):
        merge_state_dicts([state, state])


def test_resume_draws_the_same_negatives_as_the_uninterrupted_run():
    pfc = make(c=200, rate=0.1, seed=4)
    for seed in range(3):
        pfc.sample(batch(n=8, c=200, seed=seed)[1])
    state = pfc.shard_state()
    later = [batch(n=8, c=200, seed=10 + k)[1] for k in range(3)]
    want = [pfc.sample(labels)[0] for labels in later]
    resumed = make(c=200, rate=0.1, seed=4)
    resumed.load_shard_pieces(state)
    assert all(torch.equal(resumed.sample(y)[0], w) for y, w in zip(later, want))
    fresh = make(c=200, rate=0.1, seed=4)  # without the saved stream: the run's first draws
    assert not torch.equal(fresh.sample(later[0])[0], want[0])
    # a state from another world size (or another rank) leaves the seeded stream alone
    other = {**state, "pieces": [{**state["pieces"][0]}]}
    other["pieces"][0]["sampler"] = {**state["pieces"][0]["sampler"], "world_size": 2}
    reseeded = make(c=200, rate=0.1, seed=4)
    reseeded.load_shard_pieces(other)
    first = make(c=200, rate=0.1, seed=4).sample(later[0])[0]
    assert torch.equal(reseeded.sample(later[0])[0], first)
    # states written before the stream was saved still load
    old = {**state, "pieces": [{k: v for k, v in state["pieces"][0].items() if k != "sampler"}]}
    make(c=200, rate=0.1, seed=4).load_shard_pieces(old)


def test_export_class_centers_single_process():
    pfc = make(c=11, dtype=torch.bfloat16)
    centers = export_class_centers(pfc)
    assert centers.shape == (11, D) and centers.dtype == torch.float32
    assert torch.equal(centers, pfc.weight.float())


class _QuadraticHead(torch.nn.Module):
    """A head outside heads.margins: PartialFC must take its logits through autograd."""

    kind = "margin"
    normalized = True
    s = 8.0

    def forward(self, cosine, labels):
        logits = self.s * cosine**2
        rows = labels >= 0
        return (
            logits - self.s * 0.1 * F.one_hot(labels.clamp_min(0), cosine.shape[1]) * rows[:, None]
        )


def test_any_margin_module_goes_through_the_generic_path():
    pfc = PartialFC(_QuadraticHead(), D, 11, weight_dtype=torch.float64, init_std=0.5)
    _assert_matches_full_softmax(pfc)


def test_build_from_config_sections():
    from dist_train.config import OptimConfig, PartialFCConfig
    from dist_train.partial_fc import build_partial_fc

    pfc_cfg = PartialFCConfig(sample_rate=0.5, update="dense", weight_dtype="bfloat16", lr_scale=2)
    optim_cfg = OptimConfig(name="adamw", lr=0.01, weight_decay=0.05)
    pfc = build_partial_fc(
        heads.get_head("cosface"), pfc_cfg, optim_cfg, embedding_size=D, num_classes=30
    )
    assert pfc.weight.dtype == torch.bfloat16 and pfc.update == "dense"
    assert pfc.num_sample == 15
    assert pfc.optimizer.name == "adamw"
    assert pfc.optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    assert pfc.optimizer.param_groups[0]["weight_decay"] == 0.05

"""Margin heads: formulas, the monotone extension beyond θ + m > π, gradients, options."""

from __future__ import annotations

import math

import pytest
import torch

import heads
from heads.margins import CombinedMargin, monotone_cos
from heads.margins_adaptive import prepare_unsharded
from heads.margins_magnitude import takes_norms

# Every registered margin head: a new one is tested without editing a list.
MARGIN_NAMES = heads.HEADS.names(kind="margin")


def build(name: str, **kw):
    if "num_classes" in heads.HEADS.keywords(name):  # adacos: filled by the trainer in training
        kw.setdefault("num_classes", 11)
    return heads.get_head(name, **kw)


def prepared(head, cosine, labels):
    """``head`` ready for this batch: an adaptive head (``batch_inputs``) gets the inputs of
    a single process (rows labelled -1 take column 0's cosine; norms from 10 to 30)."""
    norms = torch.linspace(10.0, 30.0, cosine.shape[0], dtype=cosine.dtype)
    prepare_unsharded(head, cosine.detach(), labels.clamp_min(0), norms)
    return head


def _cos_labels(b=6, c=7, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    cosine = torch.rand(b, c, generator=gen, dtype=dtype) * 1.8 - 0.9
    labels = torch.randint(0, c, (b,), generator=gen)
    labels[1] = -1
    return cosine, labels


@pytest.mark.parametrize("name", MARGIN_NAMES)
def test_every_margin_is_registered_with_kind_scale_and_formula(name):
    head = build(name)
    assert head.kind == "margin"
    assert head.s > 0
    assert type(head).__doc__ and heads.HEADS.get(name).__doc__
    k = getattr(head, "sub_centers", 1)  # a sub-centre head takes K columns per class
    cosine, labels = _cos_labels(c=7 * k, dtype=torch.float32)
    labels = labels // k
    cosine.requires_grad_(True)
    # a head taking the embedding norms (heads.margins_magnitude) gets them, with a gradient
    norms = torch.linspace(0.5, 120.0, 6).requires_grad_(True)
    head = prepared(head, cosine, labels)
    out = head(cosine, labels, **({"norms": norms} if takes_norms(head) else {}))
    assert out.shape == (6, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(cosine.grad).all()


def test_combined_margin_is_exported_from_heads():
    assert heads.CombinedMargin is CombinedMargin
    assert isinstance(build("combined"), CombinedMargin)


@pytest.mark.parametrize(
    "name,kw,target",
    [
        ("normface", {"s": 30.0}, lambda c: 30.0 * c),
        ("cosface", {"s": 30.0, "m": 0.1}, lambda c: 30.0 * (c - 0.1)),
        ("amsoftmax", {"s": 30.0, "m": 0.35}, lambda c: 30.0 * (c - 0.35)),
        ("arcface", {"s": 64.0, "m": 0.5}, lambda c: 64.0 * torch.cos(torch.arccos(c) + 0.5)),
        (
            "arcface_deg",
            {"s": 10.0, "m": 30.0},
            lambda c: 10.0 * torch.cos(torch.arccos(c) + math.pi / 6),
        ),
        ("sphereface", {"s": 20.0, "m": 1.35}, lambda c: 20.0 * torch.cos(1.35 * torch.arccos(c))),
        (
            "combined",
            {"s": 16.0, "m1": 1.1, "m2": 0.2, "m3": 0.15},
            lambda c: 16.0 * (torch.cos(1.1 * torch.arccos(c) + 0.2) - 0.15),
        ),
    ],
)
def test_target_logit_formula_and_untouched_columns(name, kw, target):
    # Cosines in (0, 0.9): every angle stays below π − margin, where the closed form holds.
    cosine, labels = _cos_labels()
    cosine = cosine.abs()
    out = build(name, **kw)(cosine, labels)
    s = kw["s"]
    for i, y in enumerate(labels.tolist()):
        expected_row = s * cosine[i].clone()
        if y >= 0:
            expected_row[y] = target(cosine[i, y])
        torch.testing.assert_close(out[i], expected_row, rtol=1e-12, atol=1e-12)


def test_softmax_head_is_unnormalised_and_scaled():
    head = build("softmax")
    assert head.normalized is False and head.s == 1.0
    z = torch.randn(3, 4) * 10
    torch.testing.assert_close(head(z, torch.tensor([0, -1, 2])), z)
    torch.testing.assert_close(build("softmax", s=2.0)(z, torch.tensor([0, 1, 2])), 2 * z)


def test_adacos_fixed_scale():
    assert build("adacos", num_classes=85742).s == pytest.approx(math.sqrt(2) * math.log(85741))
    with pytest.raises(ValueError, match="num_classes"):
        build("adacos", num_classes=2)


def test_arcface_deg_equals_arcface_in_radians():
    cosine, labels = _cos_labels()
    a = build("arcface_deg", s=64.0, m=45.0)(cosine, labels)
    b = build("arcface", s=64.0, m=math.pi / 4)(cosine, labels)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("m1,m2", [(1.0, 0.5), (1.0, 1.2), (1.35, 0.0), (4.0, 0.0), (1.2, 0.3)])
def test_target_logit_is_continuous_and_monotone_over_all_angles(m1, m2):
    head = CombinedMargin(s=1.0, m1=m1, m2=m2, m3=0.0)
    theta = torch.linspace(1e-3, math.pi - 1e-3, 20001, dtype=torch.float64)
    value = head.target_logit(torch.cos(theta))
    step = torch.diff(value)
    assert (step <= 1e-12).all(), "target logit must not rise as the angle grows"
    # Continuity: no jump larger than the largest slope (m1) times the grid spacing allows.
    assert step.abs().max() <= m1 * (theta[1] - theta[0]) * 1.01
    # Beyond π the extension is SphereFace's: −cos φ − 2 on [π, 2π].
    phi = torch.tensor([math.pi, 1.5 * math.pi, 2 * math.pi], dtype=torch.float64)
    torch.testing.assert_close(monotone_cos(phi), torch.tensor([-1.0, -2.0, -3.0]).double())


def test_arcface_gradient_goes_through_the_margin():
    # InsightFace's no-grad trick would give ∂/∂cos = s; the true one is s·sin(θ+m)/sin θ.
    head = build("arcface", s=64.0, m=0.5)
    c = torch.tensor([[0.3, 0.1]], dtype=torch.float64, requires_grad=True)
    head(c, torch.tensor([0]))[0, 0].backward()
    theta = math.acos(0.3)
    assert c.grad[0, 0].item() == pytest.approx(64.0 * math.sin(theta + 0.5) / math.sin(theta))
    assert c.grad[0, 1].item() == 0.0


@pytest.mark.parametrize("name", MARGIN_NAMES)
def test_gradcheck_float64(name):
    head = build(name)
    k = getattr(head, "sub_centers", 1)  # a sub-centre head takes K columns per class
    cosine, labels = _cos_labels(b=4, c=5 * k)
    labels = labels // k
    cosine.requires_grad_(True)
    head = prepared(head, cosine, labels)
    if takes_norms(head):  # the gradient through the embedding norms too (inside the clip)
        norms = torch.linspace(20.0, 100.0, 4, dtype=torch.float64).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda c, a: head(c, labels, norms=a), (cosine, norms))
        assert torch.autograd.gradcheck(
            lambda c, a: head.extra_loss_sum(c, labels, norms=a), (cosine, norms)
        )
    else:
        assert torch.autograd.gradcheck(lambda c: head(c, labels), (cosine,))
    if name != "softmax" and "intra_alpha" in heads.HEADS.keywords(name):
        opts = build(name, intra_alpha=0.7)
        assert torch.autograd.gradcheck(lambda c: opts.extra_loss_sum(c, labels), (cosine,))


def test_interclass_filtering_zeroes_close_negatives_only():
    head = build("cosface", s=10.0, m=0.2, interclass_threshold=0.5)
    cosine = torch.tensor([[0.9, 0.6, 0.1], [0.7, 0.2, 0.8]], requires_grad=True)
    out = head(cosine, torch.tensor([0, -1]))
    expected = torch.tensor([[10 * 0.7, 0.0, 1.0], [0.0, 2.0, 0.0]])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    torch.testing.assert_close(cosine.grad, torch.tensor([[10.0, 0.0, 10.0], [0.0, 10.0, 0.0]]))


def test_intra_class_penalty_sums_target_angles():
    head = build("arcface", intra_alpha=0.5)
    cosine, labels = _cos_labels()
    rows = labels >= 0
    expected = 0.5 / math.pi * torch.arccos(cosine[rows, labels[rows]]).sum()
    torch.testing.assert_close(head.extra_loss_sum(cosine, labels), expected)
    assert build("arcface").extra_loss_sum(cosine, labels).item() == 0.0


@pytest.mark.parametrize(
    "name,kw",
    [
        ("arcface", {"s": 0.0}),
        ("combined", {"m1": 0.5}),
        ("combined", {"m2": -0.1}),
        ("cosface", {"interclass_threshold": 1.5}),
        ("normface", {"intra_alpha": -1.0}),
    ],
)
def test_invalid_parameters_raise(name, kw):
    with pytest.raises(ValueError):
        build(name, **kw)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="labels"):
        build("arcface")(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))

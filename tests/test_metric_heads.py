"""Metric heads against plain loop references, float64 gradient checks, and input errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import heads
from heads.metric import AMSoftmaxProto, AngleProtoLoss, MarginLoss, pairwise_distances

# Every registered metric head: a new one is tested without editing a list.
METRIC_HEADS = heads.HEADS.names(kind="metric")


def _batch(n_classes=4, m=3, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(m)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    x = torch.randn(labels.numel(), d, generator=g, dtype=dtype)
    return x, labels


def _unit(x):
    return [row / torch.sqrt((row * row).sum()) for row in x]


def _val(t):
    return t.detach().item()


def _dist(u, v):
    return torch.sqrt(((u - v) ** 2).sum())


# ---- plain references: loops over pairs and triplets, no masks, no vectorisation ----


def ref_contrastive(x, labels, margin, miner="none", miner_margin=0.2):
    e, lab, n = _unit(x), labels.tolist(), len(x)
    pos, neg = [], []
    if miner == "none":
        for i in range(n):
            for j in range(i + 1, n):
                (pos if lab[i] == lab[j] else neg).append(_dist(e[i], e[j]))
    else:
        for a in range(n):
            for p in range(n):
                if p == a or lab[p] != lab[a]:
                    continue
                for q in range(n):
                    if lab[q] == lab[a]:
                        continue
                    dap, daq = _dist(e[a], e[p]), _dist(e[a], e[q])
                    if dap < daq < dap + miner_margin:
                        pos.append(dap)
                        neg.append(daq)
    loss = x.sum() * 0
    if pos:
        loss = loss + sum(d**2 for d in pos) / len(pos)
    if neg:
        loss = loss + sum(max(margin - d, d * 0) ** 2 for d in neg) / len(neg)
    return loss


def ref_triplet(x, labels, margin, mining):
    e, lab, n = _unit(x), labels.tolist(), len(x)
    costs = []
    for a in range(n):
        ps = [p for p in range(n) if p != a and lab[p] == lab[a]]
        ns = [q for q in range(n) if lab[q] != lab[a]]
        if not ps or not ns:
            continue
        if mining == "batch_hard":
            dap = max((_dist(e[a], e[p]) for p in ps), key=_val)
            dan = min((_dist(e[a], e[q]) for q in ns), key=_val)
            costs.append(max(dap - dan + margin, dap * 0))
            continue
        for p in ps:
            dap = _dist(e[a], e[p])
            farther = [_dist(e[a], e[q]) for q in ns if _dist(e[a], e[q]) > dap]
            if farther:
                dan = min(farther, key=_val)
            else:
                dan = max((_dist(e[a], e[q]) for q in ns), key=_val)
            costs.append(max(dap - dan + margin, dap * 0))
    return sum(costs) / len(costs)


def ref_margin_loss(x, labels, beta, triplets, alpha, nu, per_class):
    e, lab = _unit(x), labels.tolist()
    total, reg = 0.0, 0.0
    for a, p, q in triplets:
        b = beta[lab[a]] if per_class else beta[0]
        total = total + max(alpha + _dist(e[a], e[p]) - b, b * 0)
        total = total + max(alpha + b - _dist(e[a], e[q]), b * 0)
        reg = reg + b
    return total / (2 * len(triplets)) + nu * reg / len(triplets)


def ref_margin_weights(x, labels, cutoff, nonzero_cutoff):
    e, lab, n, dim = _unit(x), labels.tolist(), len(x), x.shape[1]
    w = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        for q in range(n):
            dist = float(_dist(e[a], e[q]))
            if lab[q] == lab[a] or dist >= nonzero_cutoff:
                continue
            dc = max(dist, cutoff)
            w[a, q] = dc ** (2 - dim) * (1 - dc * dc / 4) ** (-(dim - 3) / 2)
        if w[a].sum() > 0:
            w[a] /= w[a].sum()
    return w


def ref_angleproto(x, labels, w, b):
    groups = {}
    for row, lab in zip(x, labels.tolist()):
        groups.setdefault(lab, []).append(row)
    classes = sorted(groups)
    queries = [groups[c][0] for c in classes]
    protos = [sum(groups[c][1:]) / (len(groups[c]) - 1) for c in classes]

    def cos(u, v):
        return (u * v).sum() / torch.sqrt((u * u).sum() * (v * v).sum())

    total = 0.0
    for j, q in enumerate(queries):
        logits = [w * cos(q, c) + b for c in protos]
        total = total - (logits[j] - torch.log(sum(torch.exp(z) for z in logits)))
    return total / len(classes)


# ---- formula tests: value and gradient against the loop references ----


def _value_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("miner", ["none", "semi_hard"])
def test_contrastive_matches_loop_reference(miner):
    x, labels = _batch(seed=1)
    head = heads.get_head("contrastive", margin=0.9, miner=miner, miner_margin=0.3)
    got = _value_and_grad(lambda t: head(t, labels), x)
    want = _value_and_grad(lambda t: ref_contrastive(t, labels, 0.9, miner, 0.3), x)
    torch.testing.assert_close(got, want)
    assert got[0] > 0


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
def test_triplet_matches_loop_reference(mining):
    x, labels = _batch(seed=2)
    head = heads.get_head("triplet", margin=0.3, mining=mining)
    got = _value_and_grad(lambda t: head(t, labels), x)
    want = _value_and_grad(lambda t: ref_triplet(t, labels, 0.3, mining), x)
    torch.testing.assert_close(got, want)
    assert got[0] > 0


def test_triplet_semi_hard_fallback_picks_farthest_negative():
    # Anchor 0's positive is farther than every negative: the fallback is the farthest one.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    head = heads.get_head("triplet", margin=0.1, mining="semi_hard")
    # pairs (0,1) and (1,0): d_ap = 2; negatives of 0 at sqrt(2) and sqrt(0.8); of 1 at
    # sqrt(2) and sqrt(3.2); anchors 2 and 3 have no positive.
    want = ((2 - math.sqrt(2) + 0.1) + (2 - math.sqrt(3.2) + 0.1)) / 2
    torch.testing.assert_close(head(x, labels).item(), want)


@pytest.mark.parametrize("per_class,nu", [(False, 0.0), (True, 0.1)])
def test_margin_loss_matches_loop_reference(per_class, nu):
    x, labels = _batch(n_classes=4, m=3, d=5, seed=3)
    head = MarginLoss(alpha=0.2, beta=1.0, beta_per_class=per_class, num_classes=4, nu=nu)
    head = head.double()
    with torch.no_grad():
        head.beta.copy_(torch.linspace(0.9, 1.2, head.beta.numel()))
    e = torch.nn.functional.normalize(x, dim=1)
    head.reseed(7)
    a, p, q = head.sample(pairwise_distances(e), labels, x.shape[1])
    triplets = list(zip(a.tolist(), p.tolist(), q.tolist()))
    # every ordered positive pair appears once, with a negative of its anchor
    assert len(triplets) == 4 * 3 * 2
    assert all(labels[t[2]] != labels[t[0]] for t in triplets)
    head.reseed(7)
    got = _value_and_grad(lambda t: head(t, labels), x)
    beta = head.beta.detach()
    want = _value_and_grad(
        lambda t: ref_margin_loss(t, labels, beta, triplets, 0.2, nu, per_class), x
    )
    torch.testing.assert_close(got, want)


def test_margin_sampling_weights_follow_inverse_density():
    x, labels = _batch(n_classes=5, m=2, d=4, seed=4)
    head = MarginLoss(cutoff=0.5, nonzero_loss_cutoff=1.4)
    e = torch.nn.functional.normalize(x, dim=1)
    d = pairwise_distances(e)
    w = head.sampling_weights(d, labels[:, None] != labels[None, :], x.shape[1])
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(w, ref_margin_weights(x, labels, 0.5, 1.4))


def test_margin_sampler_draws_in_proportion_to_weights():
    x, labels = _batch(n_classes=6, m=2, d=4, seed=5)
    head = MarginLoss(cutoff=0.3, nonzero_loss_cutoff=2.0, seed=11)
    e = torch.nn.functional.normalize(x, dim=1)
    d = pairwise_distances(e)
    probs = ref_margin_weights(x, labels, 0.3, 2.0)
    counts = torch.zeros_like(probs)
    draws = 1000
    for _ in range(draws):
        a, _, q = head.sample(d, labels, x.shape[1])
        counts.index_put_((a, q), torch.ones(a.numel(), dtype=counts.dtype), accumulate=True)
    # each anchor has one positive (m=2), so one draw per anchor per call
    freq = counts / draws
    assert (freq[probs == 0] == 0).all()
    torch.testing.assert_close(freq, probs, atol=0.06, rtol=0)


def test_margin_sampling_is_reproducible_from_the_seed():
    x, labels = _batch(seed=6)
    a, b = MarginLoss(seed=3), MarginLoss(seed=3)
    assert a(x, labels).item() == b(x, labels).item()
    assert a(x, labels).item() == b(x, labels).item()


def test_margin_sampling_stream_resumes_from_the_state_dict():
    x, labels = _batch(seed=6)
    run = MarginLoss(seed=3)
    run(x, labels)
    state = run.state_dict()
    want = [run(x, labels).item() for _ in range(3)]
    resumed = MarginLoss(seed=0)
    resumed.load_state_dict(state)
    assert resumed.seed == 3 and [resumed(x, labels).item() for _ in range(3)] == want
    unsaved = MarginLoss(seed=3)  # a fresh stream starts over: the first draw again
    assert unsaved(x, labels).item() != want[0] or unsaved(x, labels).item() != want[1]
    MarginLoss(seed=3).load_state_dict(MarginLoss(seed=3).state_dict())  # before any draw


@pytest.mark.parametrize("m", [2, 3])
def test_angleproto_matches_loop_reference(m):
    x, labels = _batch(n_classes=4, m=m, d=5, seed=7)
    head = heads.get_head("angleproto").double()
    assert head.w.item() == 10.0 and head.b.item() == -5.0
    got = _value_and_grad(lambda t: head(t, labels), x)
    want = _value_and_grad(lambda t: ref_angleproto(t, labels, 10.0, -5.0), x)
    torch.testing.assert_close(got, want)


def test_angleproto_query_is_first_row_of_each_class():
    # Reordering rows of one class changes the query, so the loss must change.
    x, labels = _batch(n_classes=3, m=3, d=4, seed=8)
    head = AngleProtoLoss().double()
    first = (labels == labels[0]).nonzero().squeeze(1)
    perm = torch.arange(len(labels))
    perm[first[0]], perm[first[1]] = first[1], first[0]
    assert not torch.isclose(head(x, labels), head(x[perm], labels[perm]))
    torch.testing.assert_close(
        head(x[perm], labels[perm]), ref_angleproto(x[perm], labels[perm], 10.0, -5.0)
    )


# ---- float64 gradient checks (embeddings and learnable parameters) ----


@pytest.mark.parametrize(
    "name,kw",
    [
        ("contrastive", {}),
        ("contrastive", {"miner": "semi_hard", "miner_margin": 0.5}),
        ("triplet", {"mining": "batch_hard", "margin": 0.5}),
        ("triplet", {"mining": "semi_hard", "margin": 0.5}),
    ],
)
def test_gradcheck_parameter_free_heads(name, kw):
    x, labels = _batch(n_classes=3, m=3, d=4, seed=9)
    head = heads.get_head(name, **kw)
    assert torch.autograd.gradcheck(lambda t: head(t, labels), (x.requires_grad_(),))


@pytest.mark.parametrize("per_class", [False, True])
def test_gradcheck_margin_loss(per_class):
    x, labels = _batch(n_classes=3, m=3, d=4, seed=10)
    head = MarginLoss(beta=1.0, beta_per_class=per_class, num_classes=3, nu=0.05).double()
    beta = head.beta.detach().clone() + torch.linspace(0, 0.1, head.beta.numel()).double()

    def fn(t, b):
        head.reseed(1)  # the same negatives at every evaluation
        return functional_call(head, {"beta": b}, (t, labels))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), beta.requires_grad_()))


def test_gradcheck_angleproto():
    x, labels = _batch(n_classes=3, m=3, d=4, seed=11)
    head = AngleProtoLoss().double()
    w = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)

    def fn(t, w, b):
        return functional_call(head, {"w": w, "b": b}, (t, labels))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w, b))


# ---- every registered metric head: forward/backward, gradients, dtype, edge cases ----


@pytest.mark.parametrize("name", METRIC_HEADS)
def test_every_metric_head_trains_and_reaches_every_parameter(name):
    assert name in heads.names()
    head = heads.get_head(name)
    assert head.kind == "metric"
    x, labels = _batch(n_classes=4, m=2, d=8, seed=12, dtype=torch.float32)
    x.requires_grad_(True)
    loss = head(x, labels)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", METRIC_HEADS)
def test_bfloat16_embeddings_are_computed_in_float32(name):
    head = heads.get_head(name)
    x, labels = _batch(n_classes=4, m=2, d=8, seed=13, dtype=torch.float32)
    ref = head(x, labels)
    if name == "margin":
        head.reseed()
    got = head(x.bfloat16(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.02)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("contrastive", {"miner": "semi_hard"}),
        ("triplet", {"mining": "batch_hard"}),
        ("triplet", {"mining": "semi_hard"}),
        ("margin", {}),
    ],
)
def test_batch_without_pairs_gives_attached_zero(name, kw):
    x = torch.randn(4, 3, requires_grad=True)
    labels = torch.arange(4)  # no positives, so no triplet
    loss = heads.get_head(name, **kw)(x, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="contrastive: labels must be"):
        heads.get_head("contrastive")(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="triplet: mining='hard'"):
        heads.get_head("triplet", mining="hard")
    with pytest.raises(ValueError, match="contrastive: miner"):
        heads.get_head("contrastive", miner="hardest")
    with pytest.raises(ValueError, match=r"margin: labels must be in \[0, 2\)"):
        heads.get_head("margin", beta_per_class=True, num_classes=2)(x, torch.arange(6))
    with pytest.raises(ValueError, match="label 2: 1"):
        heads.get_head("angleproto")(x, torch.tensor([0, 0, 1, 1, 2, 3]))
    with pytest.raises(ValueError, match="M = 3 from m_per_class"):
        heads.get_head("angleproto", m_per_class=3)(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="M >= 2"):
        heads.get_head("angleproto")(x, torch.arange(6))
    with pytest.raises(ValueError, match="at least 2 classes"):
        heads.get_head("angleproto")(x, torch.zeros(6, dtype=torch.long))


# ---- the combined head ----


class _PlainCosFace(nn.Module):
    """A direct CosFace on cosine logits: an independent reference for the registered one."""

    kind = "margin"

    def __init__(self, s: float, m: float) -> None:
        super().__init__()
        self.s, self.m = s, m

    def forward(self, cosine, labels):
        onehot = torch.zeros_like(cosine)
        rows = labels >= 0
        onehot[rows.nonzero().squeeze(1), labels[rows]] = 1.0
        return self.s * (cosine - self.m * onehot)


def test_combined_head_weights_the_metric_term():
    combined = AMSoftmaxProto(_PlainCosFace(30.0, 0.1), AngleProtoLoss(), metric_weight=0.5)
    assert combined.kind == "combined"
    x, labels = _batch(n_classes=3, m=2, d=4, seed=14, dtype=torch.float32)
    torch.testing.assert_close(combined(x, labels), 0.5 * AngleProtoLoss()(x, labels))
    with pytest.raises(ValueError, match="must be a margin head"):
        AMSoftmaxProto(AngleProtoLoss(), AngleProtoLoss())
    with pytest.raises(ValueError, match="must be a metric head"):
        AMSoftmaxProto(_PlainCosFace(30.0, 0.1), _PlainCosFace(30.0, 0.1))


def test_amsoftmax_proto_builds_cosface_from_the_registry():
    head = heads.get_head("amsoftmax_proto", s=30.0, m=0.1, metric_weight=2.0, m_per_class=2)
    assert head.kind == "combined" and head.margin.kind == "margin"
    assert head.margin.s == 30.0 and head.metric_weight == 2.0
    assert isinstance(head.metric, AngleProtoLoss)
    cosine = torch.tensor([[0.5, 0.2], [0.1, 0.4]])
    labels = torch.tensor([0, -1])
    ref = _PlainCosFace(30.0, 0.1)(cosine, labels)
    torch.testing.assert_close(head.margin(cosine, labels), ref)


@pytest.mark.parametrize("name", heads.HEADS.names(kind="combined"))
def test_every_combined_head_pairs_a_margin_and_a_metric_head(name):
    head = heads.get_head(name)
    assert head.kind == "combined"
    assert head.margin.kind == "margin" and head.metric.kind == "metric"
    x, labels = _batch(n_classes=4, m=2, d=8, seed=12, dtype=torch.float32)
    x.requires_grad_(True)
    loss = head(x, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_margin_anchor_without_weighted_negative_draws_uniformly():
    # Every negative lies beyond nonzero_loss_cutoff: the anchor draws uniformly among them.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 2, 3])
    head = MarginLoss(cutoff=0.5, nonzero_loss_cutoff=0.6, seed=2)
    d = pairwise_distances(torch.nn.functional.normalize(x, dim=1))
    counts = torch.zeros(5)
    for _ in range(300):
        a, _, n = head.sample(d, labels, 2)
        assert a.tolist() == [0, 1]
        counts += torch.bincount(n, minlength=5).float()
    assert counts[:2].sum() == 0
    torch.testing.assert_close(
        counts[2:] / counts.sum(), torch.full((3,), 1 / 3), atol=0.05, rtol=0
    )

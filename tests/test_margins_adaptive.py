"""AdaFace, CurricularFace and ElasticFace: the papers' formulas, their running state inside
Partial FC (saved once, restored, the same whatever the world size) and training on 2 and 3
gloo ranks against one process.

The float64 loss and gradient parity of each head on 2 and 3 ranks at rate 1 is
``tests/test_partial_fc_dist.py`` (registry-driven); here the heads also run at rate 0.5 (a
shard that really samples), with gradient accumulation, and their state is compared.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import heads
from dist_train.distributed import get_rank, get_world_size
from dist_train.losses import build_head
from dist_train.partial_fc import PartialFC, init_rows
from heads.margins_adaptive import AdaFace, CurricularFace, ElasticFace, prepare_unsharded
from tests.dist_utils import run_distributed
from tests.test_partial_fc_dist import C_SAMPLED, check_parity

# Every margin head registered by heads/margins_adaptive.py (a new one there needs its entries
# in PARAMS and TRAIN_PARAMS, or these tests fail with a KeyError naming it).
ADAPTIVE = [
    n
    for n in heads.HEADS.names(kind="margin")
    if heads.HEADS.get(n).__module__ == "heads.margins_adaptive"
]
# Fast-moving statistics, so that a few steps change the state visibly.
PARAMS = {
    "adaface": {"s": 32.0, "t_alpha": 0.5},
    "curricularface": {"s": 32.0, "t_alpha": 0.5},
    "elasticface_arc": {"s": 32.0, "sigma": 0.2, "seed": 3},
    "elasticface_cos": {"s": 32.0, "sigma": 0.2, "seed": 3},
}
C, D, N = 11, 6, 12
OPTIM = {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4}


def _cos_labels(n=8, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cosine = torch.rand(n, c, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    labels = torch.randint(0, c, (n,), generator=gen)
    return cosine, labels


# ------------------------------------------------------------------ the papers' formulas
def test_adaface_equals_the_papers_formula_and_updates_its_ema():
    """Eq. 10–12 with the authors' EMA (α = 0.01, μ₀ = 20, σ₀ = 100), written out directly."""
    head = heads.get_head("adaface")
    assert (head.s, head.m, head.h, head.t_alpha) == (64.0, 0.4, 0.333, 0.01)
    cosine, labels = _cos_labels()
    cosine = cosine.abs() * 0.8 + 0.1  # angles where θ + g_angle stays in [0, π]
    norms = torch.tensor([5.0, 12.0, 20.0, 33.0, 48.0, 0.0001, 150.0, 25.0], dtype=torch.float64)
    prepare_unsharded(head, cosine, labels, norms)
    out = head(cosine, labels)

    safe = norms.clamp(0.001, 100)
    mean = 0.01 * safe.mean() + 0.99 * 20.0
    std = 0.01 * safe.std() + 0.99 * 100.0
    assert head.batch_mean.item() == pytest.approx(mean.item(), rel=1e-14)
    assert head.batch_std.item() == pytest.approx(std.item(), rel=1e-14)
    z = (0.333 * (safe - mean) / (std + 1e-3)).clamp(-1, 1)
    expected = 64.0 * cosine.clone()
    rows = torch.arange(len(labels))
    theta = torch.arccos(cosine[rows, labels])
    expected[rows, labels] = 64.0 * (torch.cos(theta - 0.4 * z) - (0.4 * z + 0.4))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_adaface_margin_follows_the_norm():
    """A large norm (easy sample) gets the angular margin, a small one the additive one."""
    head = AdaFace(s=1.0, m=0.4, h=1.0, t_alpha=1.0)
    cos = torch.full((2, 2), 0.5, dtype=torch.float64)
    labels = torch.tensor([0, 0])
    prepare_unsharded(head, cos, labels, torch.tensor([1.0, 100.0], dtype=torch.float64))
    low, high = head(cos, labels)[:, 0].tolist()
    theta = math.acos(0.5)
    z = 49.5 / (head.batch_std.item() + 1e-3)  # ẑ = ∓z: the norms are 50.5 ∓ 49.5
    assert low == pytest.approx(math.cos(theta + 0.4 * z) - 0.4 * (1 - z))
    assert high == pytest.approx(math.cos(theta - 0.4 * z) - 0.4 * (1 + z))


def _curricular_reference(cosine, labels, t, s=64.0, m=0.5, alpha=0.01):
    """The authors' CurricularFace code, written on a full cosine matrix."""
    target = cosine[torch.arange(len(labels)), labels].view(-1, 1)
    cos_m = torch.cos(torch.arccos(target) + m)
    mask = cosine > cos_m
    t = target.mean() * alpha + (1 - alpha) * t
    out = cosine.clone()
    out[mask] = cosine[mask] * (t + cosine[mask])
    out.scatter_(1, labels.view(-1, 1), cos_m)
    return out * s, t


def test_curricularface_equals_the_authors_code_and_updates_t():
    head = heads.get_head("curricularface")
    assert (head.s, head.m, head.t_alpha, head.t.item()) == (64.0, 0.5, 0.01, 0.0)
    t = torch.tensor(0.0, dtype=torch.float64)
    for seed in range(3):  # t carries over between batches
        cosine, labels = _cos_labels(seed=seed)
        cosine[:, 0] = 0.95  # hard negatives for every row whose class is not 0
        cosine = cosine.clamp(-0.45, 0.95)  # θ_y + m ≤ π: the closed form holds
        prepare_unsharded(head, cosine, labels)
        out = head(cosine, labels)
        expected, t = _curricular_reference(cosine, labels, t)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        assert head.t.item() == pytest.approx(t.item(), rel=1e-14)


def test_curricularface_modulates_hard_negatives_of_rows_held_elsewhere():
    """A shard without a row's class still modulates that row's hard negatives (T_i given)."""
    head = CurricularFace(s=1.0, m=0.5, t_alpha=1.0)
    full = torch.tensor([[0.6, 0.5, 0.1]], dtype=torch.float64)
    prepare_unsharded(head, full, torch.tensor([0]))  # t = 0.6, T = cos(acos 0.6 + 0.5)
    threshold = math.cos(math.acos(0.6) + 0.5)
    assert 0.1 < threshold < 0.5
    shard = full[:, 1:]  # the columns of another shard: class 0 is not among them
    out = head(shard, torch.tensor([-1]))
    torch.testing.assert_close(out, torch.tensor([[0.5 * (0.6 + 0.5), 0.1]], dtype=torch.float64))


@pytest.mark.parametrize("name,m", [("elasticface_arc", 0.5), ("elasticface_cos", 0.35)])
def test_elasticface_equals_the_papers_formula_with_its_own_margins(name, m):
    head = heads.get_head(name, seed=7)
    assert (head.s, head.m, head.sigma) == (64.0, m, 0.05)
    cosine, labels = _cos_labels()
    cosine = cosine.abs() * 0.8 + 0.1
    prepare_unsharded(head, cosine, labels)
    out = head(cosine, labels)
    margins = head.margins(len(labels), 0)
    rows = torch.arange(len(labels))
    c = cosine[rows, labels]
    target = torch.cos(torch.arccos(c) + margins) if name.endswith("arc") else c - margins
    expected = 64.0 * cosine.clone()
    expected[rows, labels] = 64.0 * target
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert head.draws == 1


def test_elasticface_stream_is_normal_seeded_and_advances_per_training_forward():
    head = ElasticFace(m=0.5, sigma=0.05, seed=11)
    draws = torch.stack([head.margins(1000, k) for k in range(20)])
    assert draws.mean().item() == pytest.approx(0.5, abs=0.002)  # 20,000 draws: SE 0.00035
    assert draws.std().item() == pytest.approx(0.05, rel=0.03)
    assert torch.equal(head.margins(1000, 3), draws[3]), "a pure function of (seed, draw)"
    assert not torch.equal(draws[3], draws[4])
    assert not torch.equal(ElasticFace(seed=12).margins(1000, 3), draws[3])
    # the first rows of a larger batch are those of a smaller one: a row's margin depends on
    # its index in the global batch and the draw, not on how the batch is split over ranks
    assert torch.equal(head.margins(10, 2), head.margins(1000, 2)[:10])
    head.prepare_batch(num_rows=4)
    head.prepare_batch(num_rows=4)
    assert head.draws == 2
    head.eval()
    head.prepare_batch(num_rows=4)
    assert head.draws == 2 and torch.equal(head._margins, torch.full((4,), 0.5).double())


@pytest.mark.parametrize("name", ADAPTIVE)
def test_a_head_called_without_its_batch_inputs_raises(name):
    head = heads.get_head(name)
    cosine, labels = _cos_labels()
    with pytest.raises(RuntimeError, match="prepare_batch"):
        head(cosine, labels)
    prepare_unsharded(head, cosine, labels, torch.ones(len(labels), dtype=torch.float64))
    with pytest.raises(RuntimeError, match="prepare_batch"):
        head(cosine[:3], labels[:3])  # prepared for another batch size


# --------------------------------------------------- inside Partial FC: state and resume
def _pfc(name: str, *, c: int = C, seed: int = 1, rate: float = 1.0) -> PartialFC:
    head = build_head(name, PARAMS[name], c)
    pfc = PartialFC(
        head, D, c, sample_rate=rate, weight_dtype=torch.float64, init_std=0.5, seed=seed
    )
    pfc.configure_optimizer(**OPTIM)
    return pfc


def _batch(step: int, micro: int, c: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + micro)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64) * (
        1 + torch.rand(N, 1, generator=gen) * 4
    )
    return x, torch.randint(0, c, (N,), generator=gen)


def _train(pfc: PartialFC, steps: range, accum: int = 2, c: int = C) -> list[float]:
    """SGD steps of ``accum`` forwards each (gradient accumulation), on this rank's part."""
    rank, world = get_rank(), get_world_size()
    losses = []
    for step in steps:
        for micro in range(accum):
            x, y = _batch(step, micro, c)
            loss = pfc(torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank])
            loss.backward()
            losses.append(loss.item())
        pfc.optimizer.step()
        pfc.optimizer.zero_grad()
    return losses


def _head_state(pfc: PartialFC) -> dict:
    return copy.deepcopy(pfc.margin.state_dict())


@pytest.mark.parametrize("name", ADAPTIVE)
def test_head_state_is_saved_once_and_a_resume_is_exact(name):
    pfc = _pfc(name)
    _train(pfc, range(2))
    state = copy.deepcopy(pfc.gathered_shard_state())
    assert set(state["margin_head"]) == set(pfc.margin.state_dict()) != set()
    assert all("margin_head" not in p for p in state["pieces"]), "one copy, not per shard"
    fresh = _head_state(_pfc(name))
    assert any(
        not torch.equal(torch.as_tensor(v), torch.as_tensor(fresh[k]))
        if torch.is_tensor(v)
        else v != fresh[k]
        for k, v in state["margin_head"].items()
    ), "training changed the state"
    uninterrupted = _train(pfc, range(2, 4))

    resumed = _pfc(name, seed=9)
    resumed.load_shard_pieces(state)
    assert _train(resumed, range(2, 4)) == uninterrupted
    assert str(_head_state(resumed)) == str(_head_state(pfc))


def test_a_state_of_another_head_does_not_load():
    state = _pfc("adaface").shard_state()
    with pytest.raises(ValueError, match="'margin_head' holds .*batch_mean.*CurricularFace"):
        _pfc("curricularface").load_shard_pieces(state)
    arc = PartialFC(heads.get_head("arcface"), D, C, weight_dtype=torch.float64)
    state = arc.shard_state()
    assert state["margin_head"] == {}
    del state["margin_head"]  # a state written before heads had state
    arc.load_shard_pieces(state)
    with pytest.raises(ValueError, match="'margin_head' holds \\[\\]"):
        _pfc("adaface").load_shard_pieces(state)


def test_adaface_inside_partial_fc_uses_the_global_norms():
    pfc = _pfc("adaface")
    x, y = _batch(0, 0)
    pfc(x, y)
    safe = x.norm(dim=1).clamp(0.001, 100)
    assert pfc.margin.batch_mean.item() == pytest.approx(0.5 * safe.mean().item() + 10.0)
    assert pfc.margin.batch_std.item() == pytest.approx(0.5 * safe.std().item() + 50.0)


def test_curricularface_inside_partial_fc_uses_the_target_cosines():
    pfc = _pfc("curricularface")
    x, y = _batch(0, 0)
    pfc(x, y)
    w = init_rows(0, C, C, D, std=0.5, seed=1, dtype=torch.float64)
    cos = F.normalize(x) @ F.normalize(w).t()
    mean = cos[torch.arange(N), y].mean().item()
    assert pfc.margin.t.item() == pytest.approx(0.5 * mean, rel=1e-12)


# ---------------------------------------------------------------- 2 and 3 gloo ranks
def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(rank: int, world: int, resume_from: bytes) -> dict:
    out: dict = {"parity": {}, "runs": {}, "resumed": {}}
    states = torch.load(io.BytesIO(resume_from))
    for name in ADAPTIVE:
        # one forward at rate 0.5 (a sampled shard) against a full softmax over the sampled
        # classes, as the parity test does at rate 1
        out["parity"][name] = check_parity(rank, world, name, PARAMS[name], 0.5, c=C_SAMPLED)
        pfc = _pfc(name)
        out["runs"][name] = {"losses": _train(pfc, range(4)), "head": _head_state(pfc)}
        resumed = _pfc(name, seed=5)
        resumed.load_shard_pieces(states[name])
        out["resumed"][name] = {
            "losses": _train(resumed, range(2, 4)),
            "head": _head_state(resumed),
        }
    return out


@pytest.fixture(scope="module")
def single_runs() -> dict:
    runs, states = {}, {}
    for name in ADAPTIVE:
        pfc = _pfc(name)
        losses = _train(pfc, range(2))
        states[name] = copy.deepcopy(pfc.gathered_shard_state())
        losses += _train(pfc, range(2, 4))
        runs[name] = {"losses": losses, "head": _head_state(pfc)}
    return {"runs": runs, "states": _to_bytes(states)}


@pytest.fixture(scope="module", params=[2, 3])
def world_runs(request, single_runs) -> list[dict]:
    return run_distributed(_worker, request.param, single_runs["states"])


def _same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=0)
        else:
            assert got[key] == value, key


@pytest.mark.slow
def test_adaptive_heads_on_gloo_ranks_equal_one_process(world_runs, single_runs):
    """At rate 0.5: loss and gradients equal a full softmax over the sampled classes. At rate
    1 with two micro-batches per step: 4 steps give the single process's losses and head state;
    a state written by one process loads and continues identically (another world size)."""
    for rank, res in enumerate(world_runs):
        for name in ADAPTIVE:
            for key, err in res["parity"][name].items():
                assert abs(err) <= 1e-10, f"rank {rank} {name} {key}: relative error {err:.2e}"
            want = single_runs["runs"][name]
            got = res["runs"][name]
            assert got["losses"] == pytest.approx(want["losses"], rel=1e-10), name
            _same_state(got["head"], want["head"])
            resumed = res["resumed"][name]
            assert resumed["losses"] == pytest.approx(want["losses"][4:], rel=1e-10), name
            _same_state(resumed["head"], want["head"])


# ------------------------------------------------- the trainer: 2 processes, then resume
TRAIN_PARAMS = {
    "adaface": "{s: 16.0, m: 0.4, t_alpha: 0.1}",
    "curricularface": "{s: 16.0, m: 0.2, t_alpha: 0.1}",
    "elasticface_arc": "{s: 16.0, m: 0.2, sigma: 0.05}",
    "elasticface_cos": "{s: 16.0, m: 0.2, sigma: 0.05}",
}


def _train_heads(rank, world, data, root):
    import tests.conftest  # noqa: F401 - registers the tiny test backbone in this process
    from dist_train.config import load_config
    from dist_train.distributed import current_info
    from dist_train.trainer import Trainer
    from tests.conftest import tiny_overrides

    def run(name, out, **extra):
        sets = {
            "head.name": name,
            "head.params": TRAIN_PARAMS[name],
            "data.batch_size": 4,
            "grad_accum_steps": 2,
            "partial_fc.sample_rate": 0.5,
            "max_steps": 10,
            "num_epochs": 3,
            "optim.lr": 0.01,
            **extra,
        }
        trainer = Trainer(
            load_config(None, tiny_overrides(data, root / out, **sets)), current_info()
        )
        losses: list[float] = []
        trainer.fit(on_step=losses.append)
        return losses, copy.deepcopy(trainer.loss.partial_fc.margin.state_dict())

    out = {}
    for name in ADAPTIVE:
        full, head = run(name, f"{name}-full")
        run(name, f"{name}-cut", max_steps=5, **{"checkpoint.every_steps": 5})
        ckpt = root / f"{name}-cut" / "checkpoints" / "step_00000005.pt"
        rest, resumed_head = run(name, f"{name}-resumed", **{"checkpoint.resume": str(ckpt)})
        out[name] = {"full": full, "rest": rest, "head": head, "resumed_head": resumed_head}
    return out


@pytest.mark.slow
def test_each_head_trains_on_two_processes_and_resumes_exactly(tiny_data, tmp_path):
    """The trainer with 2 gloo processes, rate 0.5 and 2 micro-batches per step: the loss
    falls over 10 steps, and a run cut at step 5 and resumed from its checkpoint gives the
    same losses and the same head state as the uninterrupted run."""
    results = run_distributed(_train_heads, 2, tiny_data, tmp_path)
    for name in ADAPTIVE:
        res = results[0][name]
        full, rest = res["full"], res["rest"]
        assert len(full) == 10 and len(rest) == 5, name
        assert sum(full[-3:]) < sum(full[:3]), f"{name}: loss did not fall: {full}"
        assert rest == pytest.approx(full[5:], rel=1e-6, abs=1e-6), name
        _same_state(res["resumed_head"], res["head"])
        assert str(results[1][name]["head"]) == str(res["head"]), "same state on every rank"

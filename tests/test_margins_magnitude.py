"""MagFace and Sub-center ArcFace: the paper's formulas, Partial FC's sub-centre rows, resume.

The single-process tests compare :class:`PartialFC` (world size 1, float64) with a direct
transcription of each paper's loss; the float64 multi-rank parity of both heads is in
``tests/test_partial_fc_dist.py`` (registry-driven ``MARGINS``). Here too: sub-centre rows in
checkpoints (stored, read a chunk at a time), resume on 1 → 2 → 3 ranks, and the offline
sub-centre cleaning step.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import heads
from dist_train import sharded_state
from dist_train.distributed import get_rank, get_world_size
from dist_train.partial_fc import PartialFC, export_class_centers, init_rows
from dist_train.sharded_state import StoredState, piece_ranges
from tests.dist_utils import run_distributed

D, N = 6, 10
SEED, STD = 3, 0.5
OPTIM = {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4}
# Every margin head registered by heads/margins_magnitude.py (a new one there needs its entry
# in TRAIN_PARAMS, or the training test fails with a KeyError naming it).
MAGNITUDE = [
    n
    for n in heads.HEADS.names(kind="margin")
    if heads.HEADS.get(n).__module__ == "heads.margins_magnitude"
]


def _batch(step: int, c: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64) * scale
    return x, torch.randint(0, c, (N,), generator=gen)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------
# MagFace


def test_magface_defaults_are_the_papers():
    head = heads.get_head("magface")
    assert head.kind == "margin"
    assert (head.s, head.l_a, head.u_a, head.l_m, head.u_m, head.lambda_g) == (
        64.0,
        10.0,
        110.0,
        0.45,
        0.8,
        35.0,
    )
    with pytest.raises(ValueError, match="norms"):
        head(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def _magface_paper_loss(x, w, y, s, l_a, u_a, l_m, u_m, lambda_g):
    """The MagFace loss of Meng et al. 2021, written out per sample."""
    losses = []
    for i in range(x.shape[0]):
        a = x[i].norm().clamp(l_a, u_a)
        m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
        cos = F.normalize(w) @ (x[i] / x[i].norm())
        theta = torch.arccos(cos[y[i]])
        assert theta + m < math.pi  # the plain cos(θ + m) of the paper
        logits = s * cos.clone()
        logits[y[i]] = s * torch.cos(theta + m)
        ce = torch.logsumexp(logits, 0) - logits[y[i]]
        losses.append(ce + lambda_g * (1 / a + a / u_a**2))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_magface_in_partial_fc_equals_the_paper_formula(rate):
    kw = {"s": 32.0, "l_a": 1.0, "u_a": 8.0, "l_m": 0.3, "u_m": 0.8, "lambda_g": 4.0}
    c = 13 if rate == 1.0 else 40

    def make() -> PartialFC:
        head = heads.get_head("magface", **kw)
        return PartialFC(
            head, D, c, sample_rate=rate, weight_dtype=torch.float64, init_std=STD, seed=SEED
        )

    pfc = make()
    x, y = _batch(0, c, scale=1.5)  # norms ≈ 1.5·√6: inside [l_a, u_a], the clip is inactive
    x = x.requires_grad_(True)
    loss = pfc(x, y)
    loss.backward()
    classes = pfc.sampled_index
    w = init_rows(0, c, c, D, std=STD, seed=SEED, dtype=torch.float64)[classes]
    w = w.clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _magface_paper_loss(x_ref, w, torch.searchsorted(classes, y), **kw)
    ref.backward()
    assert _rel(loss.detach(), ref.detach()) < 1e-12
    assert _rel(x.grad, x_ref.grad) < 1e-10
    assert _rel(pfc.sampled_weight.grad, w.grad) < 1e-10
    # the gradient through the norm is part of it: PartialFC with the margin and g fed
    # detached norms gives another embedding gradient
    pfc = make()  # the same sampled classes
    head = pfc.margin
    plain_forward, plain_extra = head.forward, head.extra_loss_sum
    head.forward = lambda c, t, norms: plain_forward(c, t, norms=norms.detach())
    head.extra_loss_sum = lambda c, t, norms: plain_extra(c, t, norms=norms.detach())
    x_det = x.detach().clone().requires_grad_(True)
    pfc(x_det, y).backward()
    assert torch.equal(pfc.sampled_index, classes)
    assert _rel(x_det.grad, x_ref.grad) > 1e-2


# ------------------------------------------------------------------------------------------
# Sub-center ArcFace


def test_subcenter_defaults_are_the_papers():
    head = heads.get_head("subcenter_arcface")
    assert (head.kind, head.s, head.m2, head.sub_centers) == ("margin", 64.0, 0.5, 3)
    with pytest.raises(ValueError, match="k"):
        heads.get_head("subcenter_arcface", k=0)


def _subcenter_paper_loss(x, w, y, s, m):
    """The loss of Deng et al. 2020: cos θ_j = max_k x̂·ŵ_jk, then ArcFace's margin."""
    cos = (F.normalize(x) @ F.normalize(w.flatten(0, 1)).t()).unflatten(1, w.shape[:2])
    cos = cos.max(dim=2).values
    theta = torch.arccos(cos.gather(1, y[:, None]).squeeze(1))
    assert (theta + m < math.pi).all()
    logits = (s * cos).scatter(1, y[:, None], (s * torch.cos(theta + m))[:, None])
    return F.cross_entropy(logits, y)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_subcenter_in_partial_fc_equals_the_paper_formula(rate):
    c, k = (13, 3) if rate == 1.0 else (40, 4)
    head = heads.get_head("subcenter_arcface", s=32.0, m=0.5, k=k)
    pfc = PartialFC(
        head, D, c, sample_rate=rate, weight_dtype=torch.float64, init_std=STD, seed=SEED
    )
    assert pfc.weight.shape == (c * k, D)
    x, y = _batch(1, c)
    x = x.requires_grad_(True)
    loss = pfc(x, y)
    loss.backward()
    rows = pfc.sampled_index
    classes = rows[::k] // k
    # every sampled class comes with all of its K rows, class-major
    assert torch.equal(rows, (classes[:, None] * k + torch.arange(k)).flatten())
    assert classes.numel() == (c if rate == 1.0 else max(int(rate * c), N))
    w_all = init_rows(0, c * k, c * k, D, std=STD, seed=SEED, dtype=torch.float64)
    w = w_all.view(c, k, D)[classes].clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _subcenter_paper_loss(x_ref, w, torch.searchsorted(classes, y), 32.0, 0.5)
    ref.backward()
    assert _rel(loss.detach(), ref.detach()) < 1e-12
    assert _rel(x.grad, x_ref.grad) < 1e-10
    assert _rel(pfc.sampled_weight.grad, w.grad.flatten(0, 1)) < 1e-10
    # with 2 samples at most 2 of a class's 3+ sub-centres are nearest to one: the others get
    # no gradient at all
    pfc.sampled_weight.grad = None
    pfc(x.detach()[:2], y[:2]).backward()
    w_s = pfc.sampled_weight.detach().view(-1, k, D)
    cos = torch.einsum("nd,ckd->nck", F.normalize(x.detach()[:2]), F.normalize(w_s, dim=2))
    used = F.one_hot(cos.argmax(dim=2), k).sum(dim=0) > 0  # [S, K]
    grad_norm = pfc.sampled_weight.grad.view(-1, k, D).norm(dim=2)
    assert (~used).any() and (grad_norm[~used] == 0).all() and (grad_norm[used] > 0).all()


def _subcenter_pfc(seed: int = SEED, c: int = 11, optim: dict | None = None) -> PartialFC:
    head = heads.get_head("subcenter_arcface", s=16.0, m=0.3, k=3)
    pfc = PartialFC(head, D, c, weight_dtype=torch.float64, init_std=STD, seed=seed)
    pfc.configure_optimizer(**(optim or OPTIM))
    return pfc


def _train(pfc: PartialFC, steps: range, c: int = 11) -> list[float]:
    rank, world = get_rank(), get_world_size()
    out = []
    for step in steps:
        x, y = _batch(10 + step, c)
        loss = pfc(torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank])
        loss.backward()
        pfc.optimizer.step()
        pfc.optimizer.zero_grad()
        out.append(loss.item())
    return out


def test_subcenter_state_is_per_class_and_loads_a_chunk_at_a_time(tmp_path, monkeypatch):
    adam = {"name": "adam", "lr": 0.01}
    pfc = _subcenter_pfc(optim=adam)
    _train(pfc, range(2))
    state = pfc.gathered_shard_state()
    piece = state["pieces"][0]
    assert state["sub_centers"] == 3
    assert piece["weight"].shape == (11, 3, D)
    assert piece["rows"]["exp_avg"].shape == (11, 3, D) and piece["rows"]["step"].shape == (11, 3)
    assert torch.equal(export_class_centers(pfc), pfc.weight.view(11, 3, D))
    path = tmp_path / "state.pt"
    torch.save(state, path)
    stored = StoredState(lambda: torch.load(path, mmap=True), piece_ranges(state), name="t")
    monkeypatch.setattr(sharded_state, "CHUNK_BYTES", 1)  # one class per chunk
    other = _subcenter_pfc(seed=SEED + 9, optim=adam)
    other.load_shard_pieces(stored)
    assert torch.equal(other.weight, pfc.weight)
    for key, rows in pfc.optimizer.rows.items():
        assert torch.equal(other.optimizer.rows[key], rows), key
    assert _train(other, range(2, 4)) == _train(pfc, range(2, 4))
    # a state of another K does not load
    plain = PartialFC(heads.get_head("arcface"), D, 11, weight_dtype=torch.float64)
    with pytest.raises(ValueError, match="'sub_centers' is 3"):
        plain.load_shard_pieces(state)


def _reshard_worker(rank: int, world: int, state_bytes: bytes, first: int) -> dict:
    pfc = _subcenter_pfc(seed=SEED + 77)  # only the loaded state can make the runs agree
    pfc.load_shard_pieces(torch.load(io.BytesIO(state_bytes)))
    losses = _train(pfc, range(first, first + 2))
    buf = io.BytesIO()
    torch.save(pfc.gathered_shard_state(), buf)
    return {"losses": losses, "state": buf.getvalue(), "rows": pfc.weight.shape[0]}


def _bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.mark.slow
def test_subcenter_rows_resume_on_other_world_sizes():
    single = _subcenter_pfc()
    losses = _train(single, range(2))
    a = copy.deepcopy(single.gathered_shard_state())  # the state aliases the live rows
    losses += _train(single, range(2, 4))
    b = copy.deepcopy(single.gathered_shard_state())
    losses += _train(single, range(4, 6))
    c = single.gathered_shard_state()

    two = run_distributed(_reshard_worker, 2, _bytes(a), 2)
    assert [r["rows"] for r in two] == [6 * 3, 5 * 3]
    three = run_distributed(_reshard_worker, 3, two[0]["state"], 4)
    assert [r["rows"] for r in three] == [4 * 3, 4 * 3, 3 * 3]
    for results, want, expected in ((two, losses[2:4], b), (three, losses[4:6], c)):
        got = torch.load(io.BytesIO(results[0]["state"]))
        for res in results:
            assert res["losses"] == pytest.approx(want, rel=1e-12)
        for path in (("weight",), ("rows", "momentum_buffer")):
            torch.testing.assert_close(
                sharded_state.full_rows(got, *path),
                sharded_state.full_rows(expected, *path),
                rtol=1e-12,
                atol=1e-14,
            )


# ------------------------------------------------------------------------------------------
# The offline cleaning step


def test_cleaning_finds_the_planted_outlier_and_the_dominant_centres():
    from dist_train.partial_fc.subcenters import clean_sub_centers

    gen = torch.Generator().manual_seed(0)
    c, k, d, per = 4, 3, 16, 9
    centers = torch.randn(c, k, d, generator=gen) * 3.0
    dominant = torch.tensor([0, 2, 1, 0])  # not always sub-centre 0
    labels = torch.arange(c).repeat_interleave(per)
    x = centers[labels, dominant[labels]] + 0.3 * torch.randn(c * per, d, generator=gen)
    planted = 2 * per + 4  # an image of class 2 that looks like its sub-centre 0
    x[planted] = centers[2, 0] + 0.3 * torch.randn(d, generator=gen)
    got = clean_sub_centers(centers, x, labels)
    assert torch.equal(got.dominant, dominant)
    assert torch.equal(got.centers, centers[torch.arange(c), dominant])
    assert got.outliers.tolist() == [planted]
    assert int(got.nearest[planted]) == 0
    assert got.counts.sum() == c * per and int(got.counts[2, 1]) == per - 1
    assert float(got.angle_to_dominant[planted]) > float(got.angle_to_dominant.median())
    with pytest.raises(ValueError, match="label 4 of image 0"):
        clean_sub_centers(centers, x, torch.full_like(labels, 4))


# ------------------------------------------------------------------------------------------
# Short 2-process training runs through the trainer: the loss falls, resume is exact

TRAIN_PARAMS = {
    "magface": "{s: 16.0, l_a: 0.5, u_a: 40.0, l_m: 0.1, u_m: 0.4, lambda_g: 2.0}",
    "subcenter_arcface": "{s: 16.0, m: 0.2, k: 3}",
}


def _train_then_resume(rank: int, world: int, data, run, head: str) -> dict:
    from dist_train.config import load_config
    from dist_train.distributed import DistInfo
    from dist_train.trainer import Trainer
    from tests.conftest import tiny_overrides

    extra = {
        "head.name": head,
        "head.params": TRAIN_PARAMS[head],
        "num_epochs": 2,
        "checkpoint.every_steps": 6,
        "partial_fc.sample_rate": 0.5,
        "optim.lr": 0.1,
    }
    info = DistInfo(rank=rank, local_rank=rank, world_size=world)
    out = {}
    for name, more in (
        ("full", {}),
        ("resumed", {"checkpoint.resume": f"{run}/full/checkpoints/step_00000006.pt"}),
    ):
        cfg = load_config(None, tiny_overrides(data, f"{run}/{name}", **extra, **more))
        seen: list[float] = []
        Trainer(cfg, info).fit(on_step=seen.append)
        out[name] = seen
    return out


@pytest.mark.slow
@pytest.mark.parametrize("head", MAGNITUDE)
def test_two_process_training_falls_and_resumes_exactly(head, tiny_data, tmp_path):
    results = run_distributed(_train_then_resume, 2, tiny_data, tmp_path, head)
    full, resumed = results[0]["full"], results[0]["resumed"]
    assert len(full) == 12 and len(resumed) == 6  # 96 images / (2 x 8) per step, 2 epochs
    assert sum(full[-3:]) < sum(full[:3]), full
    assert resumed == pytest.approx(full[6:], rel=1e-6, abs=1e-6)
    assert results[1]["full"] == full
    if head == "subcenter_arcface":
        _clean_the_run(tiny_data, tmp_path / "full" / "checkpoints" / "step_00000012.pt", tmp_path)


def _clean_the_run(data, checkpoint, tmp_path) -> None:
    """The cleaning CLI on the trained run: one dominant centre per class, a CSV of images."""
    import contextlib
    import csv
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "clean"
    cmd = [sys.executable, str(repo / "launch" / "subcenter_clean.py")]
    args = ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]
    # in this process: the run's backbone (_test_tinyconv) is registered by the tests only
    spec = importlib.util.spec_from_file_location("subcenter_clean", cmd[1])
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli.main(args)
    saved = torch.load(out / "dominant_centers.pt")
    assert saved["centers"].shape == (12, 16) and saved["counts"].shape == (12, 3)
    assert int(saved["counts"].sum()) == 96
    with open(out / "outliers.csv") as f:
        rows = list(csv.DictReader(f))
    assert "96 images, 12 classes x 3 sub-centres" in stdout.getvalue()
    assert all(r["nearest"] != r["dominant"] for r in rows)
    # an ArcFace checkpoint has no sub-centres: one line naming the key
    proc = subprocess.run(
        cmd[:2] + ["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "nope.pt" in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------------------
# Gradient accumulation


@pytest.mark.parametrize("update", ["sparse", "dense"])
@pytest.mark.parametrize("name", MAGNITUDE)
def test_two_micro_steps_equal_one_big_batch(name, update):
    kw = {"magface": {"s": 32.0, "l_a": 1.0, "u_a": 8.0}, "subcenter_arcface": {"k": 3}}[name]

    def make() -> PartialFC:
        pfc = PartialFC(
            heads.get_head(name, **kw), D, 11, update=update, weight_dtype=torch.float64, seed=SEED
        )
        pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=0.01)
        return pfc

    big, small = make(), make()
    x, y = _batch(3, 11, scale=1.5)
    big(x, y).backward()
    big.optimizer.step()
    for part in (slice(0, 5), slice(5, 10)):
        (small(x[part], y[part]) / 2).backward()
    small.optimizer.step()
    torch.testing.assert_close(small.weight, big.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        small.optimizer.rows["momentum_buffer"], big.optimizer.rows["momentum_buffer"]
    )


def test_sampled_sub_centre_micro_steps_update_the_union_of_their_rows():
    pfc = PartialFC(
        heads.get_head("subcenter_arcface"), D, 40, sample_rate=0.3, weight_dtype=torch.float64
    )
    pfc.configure_optimizer("sgd", lr=0.1, momentum=0.0, weight_decay=0.0)
    before = pfc.weight.detach().clone()
    expected, touched = before.clone(), set()
    for step in (4, 5):
        x, y = _batch(step, 40)
        pfc(x[:6], y[:6]).backward()
        expected[pfc.sampled_index] -= 0.1 * pfc.sampled_weight.grad
        touched |= set(pfc.sampled_index.tolist())
    pfc.optimizer.step()
    torch.testing.assert_close(pfc.weight, expected, rtol=1e-12, atol=1e-12)
    untouched = sorted(set(range(120)) - touched)
    assert untouched and torch.equal(pfc.weight[untouched], before[untouched])

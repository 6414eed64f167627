"""PartialFC on 2 and 3 gloo ranks against a single-process full softmax, and re-sharding.

Each world size is spawned once (spawning costs seconds); the spawned worker runs every
check and returns errors and results, and the tests below assert on them. Every rank builds
the full problem in float64 from one seed, computes the single-process reference itself and
compares it with its shard: loss, local-embedding gradient, weight-shard gradient. The class
count (11) and the per-rank batch sizes are uneven.

Re-sharding chain (SGD with momentum, sparse updates, rate 1): one process trains 2 steps
→ state A; 2 ranks load A and train 2 more → state B; 1 process and 3 ranks each load B and
train 2 more; all must follow the uninterrupted single-process run.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import heads
from dist_train.collectives import equal_local_batches
from dist_train.distributed import all_gather_object, get_rank, get_world_size
from dist_train.losses import build_head
from dist_train.partial_fc import PartialFC, export_class_centers, init_rows
from heads.margins_magnitude import takes_norms
from tests.dist_utils import run_distributed

C, D, N = 11, 6, 10
C_SAMPLED = 47  # classes of the sampled cases (a shard larger than the global batch)
SEED, STD = 1, 0.5
# Parameters that make each margin non-trivial at this size; a registered margin head not
# listed here runs with its defaults, so a new head is covered without editing this file.
MARGIN_PARAMS = {
    "normface": {"s": 30.0},
    "cosface": {"s": 30.0, "m": 0.35},
    "amsoftmax": {"s": 30.0, "m": 0.1},
    "arcface": {"s": 64.0, "m": 0.5},
    "arcface_deg": {"s": 64.0, "m": 45.0},
    "sphereface": {"s": 30.0, "m": 1.35},
    "combined": {"s": 32.0, "m1": 1.1, "m2": 0.3, "m3": 0.1},
    # t_alpha = 1: this batch's statistics weigh fully (the paper's 0.01 barely moves them in
    # one step); a wide σ makes the per-sample margins differ visibly
    "adaface": {"s": 32.0, "m": 0.4, "h": 0.333, "t_alpha": 1.0},
    "curricularface": {"s": 32.0, "m": 0.5, "t_alpha": 1.0},
    "elasticface_arc": {"s": 32.0, "m": 0.5, "sigma": 0.2},
    "elasticface_cos": {"s": 32.0, "m": 0.35, "sigma": 0.2},
    # norms of these embeddings lie in about [0.5, 5]: the clip must not hide their gradient
    "magface": {"s": 32.0, "l_a": 0.5, "u_a": 6.0, "l_m": 0.2, "u_m": 0.8, "lambda_g": 5.0},
    "subcenter_arcface": {"s": 32.0, "m": 0.5, "k": 3},
}
MARGINS = [(name, MARGIN_PARAMS.get(name, {})) for name in heads.HEADS.names(kind="margin")] + [
    ("arcface", {"s": 64.0, "m": 0.5, "interclass_threshold": 0.3}),
    ("cosface", {"s": 30.0, "m": 0.35, "intra_alpha": 0.5}),
]
OPTIM = {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4}


def global_batch(step: int, c: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (N,), generator=gen)
    if step == 0:
        # Samples almost opposite their class centre: θ_y + m > π, the margin's extension.
        w = init_rows(0, c, c, D, std=STD, seed=SEED, dtype=torch.float64)
        x[0] = -w[y[0]]
        x[1] = -w[y[1]] + 0.05 * x[1]
    return x, y


def local_part(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    # tensor_split gives ranks ragged batches (N = 10 on 3 ranks: 4, 3, 3).
    return torch.tensor_split(t, world)[rank]


def reference_loss(head, weight, x, labels):
    """Single-process loss; ``weight`` holds K = ``head.sub_centers`` rows per class."""
    cos = F.normalize(x) @ F.normalize(weight).t() if head.normalized else x @ weight.t()
    kw = {"norms": x.norm(dim=1)} if takes_norms(head) else {}
    loss = F.cross_entropy(head(cos, labels, **kw), labels)
    if getattr(head, "sub_centers", 1) > 1:
        cos = head.reduce_sub_centers(cos)
    return loss + head.extra_loss_sum(cos, labels, **kw) / x.shape[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def build_pfc(name="arcface", kw=None, rate=1.0, seed=SEED, c=C) -> PartialFC:
    head = build_head(name, kw if kw is not None else {"s": 16.0, "m": 0.3}, c)
    return PartialFC(
        head, D, c, sample_rate=rate, weight_dtype=torch.float64, init_std=STD, seed=seed
    )


def train(pfc: PartialFC, steps: range) -> list[float]:
    rank, world = get_rank(), get_world_size()
    losses = []
    for step in steps:
        x, y = global_batch(step)
        loss = pfc(local_part(x, rank, world), local_part(y, rank, world))
        loss.backward()
        pfc.optimizer.step()
        pfc.optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def check_parity(
    rank: int, world: int, name: str, kw: dict, rate: float, c: int = C, equal: bool = False
) -> dict[str, float]:
    pfc = build_pfc(name, kw, rate=rate, seed=SEED, c=c)
    x, y = global_batch(0, c)
    if equal:  # the training path: equal local batches, no size exchange, reduce-scatter
        x, y = x[: N // world * world], y[: N // world * world]
    x_local = local_part(x, rank, world).clone().requires_grad_(True)
    with equal_local_batches(equal):
        loss = pfc(x_local, local_part(y, rank, world))
    loss.backward()
    # The classes every rank sampled: the reference softmax runs over exactly those columns.
    k = pfc.sub_centers  # rows per class
    classes = torch.cat(all_gather_object(pfc.sampled_index[::k] // k + pfc.class_start))
    if rate < 1:
        assert pfc.sampled_index.numel() < pfc.num_rows, "the sampled case must sample"
    w_full = init_rows(0, c * k, c * k, D, std=STD, seed=SEED, dtype=torch.float64)
    w_ref = w_full.view(c, k, D)[classes].reshape(-1, D).clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    y_ref = torch.searchsorted(classes, y)
    assert torch.equal(classes[y_ref], y), "a positive class was not sampled"
    ref = reference_loss(pfc.margin, w_ref, x_ref, y_ref)
    ref.backward()
    mine = (classes >= pfc.class_start) & (classes < pfc.class_stop)
    return {
        "loss": rel_err(loss.detach(), ref.detach()),
        "embedding_grad": rel_err(x_local.grad, local_part(x_ref.grad, rank, world)),
        "weight_grad": rel_err(
            pfc.sampled_weight.grad, w_ref.grad.view(-1, k, D)[mine].reshape(-1, D)
        ),
        "same_loss_everywhere": float(max(all_gather_object(loss.item()))) - loss.item(),
    }


def check_empty_shard(rank: int, world: int) -> dict[str, float]:
    """Two classes on 2 or 3 ranks: the last rank of 3 holds none and must still take part."""
    head = heads.get_head("arcface", s=16.0, m=0.3)
    pfc = PartialFC(head, D, 2, weight_dtype=torch.float64, init_std=STD, seed=SEED)
    pfc.configure_optimizer(**OPTIM)
    x, y = global_batch(5)
    y = y % 2
    x_local = local_part(x, rank, world).clone().requires_grad_(True)
    loss = pfc(x_local, local_part(y, rank, world))
    loss.backward()
    pfc.optimizer.step()
    w_ref = init_rows(0, 2, 2, D, std=STD, seed=SEED, dtype=torch.float64).requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    ref = reference_loss(head, w_ref, x_ref, y)
    ref.backward()
    errs = {
        "loss": rel_err(loss.detach(), ref.detach()),
        "embedding_grad": rel_err(x_local.grad, local_part(x_ref.grad, rank, world)),
    }
    if pfc.num_local:
        errs["weight_grad"] = rel_err(
            pfc.sampled_weight.grad, w_ref.grad[pfc.class_start : pfc.class_stop]
        )
    return errs


def worker(rank: int, world: int, state: dict) -> dict:
    out: dict = {"parity": {}, "sampling": {}}
    for name, kw in MARGINS:
        label = name + "".join(
            f",{k}={v}" for k, v in kw.items() if k in ("interclass_threshold", "intra_alpha")
        )
        out["parity"][label] = check_parity(rank, world, name, kw, rate=1.0)
    # S = max(r·C_local, N) rows of a shard: sampling needs C_local > N = 10 (C_SAMPLED = 47)
    out["parity"]["arcface@rate0.5"] = check_parity(
        rank, world, "arcface", {}, rate=0.5, c=C_SAMPLED
    )
    for name in ("magface", "subcenter_arcface"):  # norms and sub-centre rows, sampled
        out["parity"][f"{name}@rate0.5"] = check_parity(
            rank, world, name, MARGIN_PARAMS[name], rate=0.5, c=C_SAMPLED
        )

    out["parity"]["arcface, equal local batches"] = check_parity(
        rank, world, "arcface", {}, rate=1.0, equal=True
    )
    out["parity"]["arcface@rate0.5, equal local batches"] = check_parity(
        rank, world, "arcface", {}, rate=0.5, c=C_SAMPLED, equal=True
    )

    out["parity"]["fewer classes than ranks"] = check_empty_shard(rank, world)

    pfc = build_pfc(rate=0.5, c=C_SAMPLED)
    x, y = global_batch(3, C_SAMPLED)
    local_y = y - pfc.class_start
    positives = torch.unique(local_y[(local_y >= 0) & (local_y < pfc.num_local)])
    index, target = pfc.sample(y)
    out["sampling"] = {
        "count": index.numel() == max(int(0.5 * pfc.num_local), y.numel()) < pfc.num_local,
        "positives": bool(torch.isin(positives, index).all()),
        "target": bool(torch.equal(index[target[target >= 0]] + pfc.class_start, y[target >= 0])),
    }

    bad = y.clone()
    bad[7] = C_SAMPLED
    try:
        pfc(local_part(x, rank, world), local_part(bad, rank, world))
        out["bad_label"] = "no error"
    except ValueError as exc:
        out["bad_label"] = str(exc)

    # Re-sharding: a different seed, so only the loaded state can make the runs agree.
    pfc = build_pfc(seed=SEED + 77)
    pfc.configure_optimizer(**OPTIM)
    pfc.load_shard_pieces(state)
    expected = torch.cat([p["weight"] for p in state["pieces"]])
    out["loaded_centers_equal"] = bool(torch.equal(export_class_centers(pfc).double(), expected))
    first = 2 if world == 2 else 4
    out["losses"] = train(pfc, range(first, first + 2))
    # Tensors cross the result queue as bytes: a tensor sent through a torch.multiprocessing
    # queue lives in the sender's shared memory, which is gone once the rank exits.
    buf = io.BytesIO()
    torch.save(pfc.gathered_shard_state(), buf)
    out["state"] = buf.getvalue()
    return out


def _state(result: dict) -> dict:
    return torch.load(io.BytesIO(result["state"]))


def _single_process_run() -> dict:
    pfc = build_pfc()
    pfc.configure_optimizer(**OPTIM)
    run = {"losses": train(pfc, range(0, 2))}
    run["A"] = copy.deepcopy(pfc.gathered_shard_state())
    run["losses"] += train(pfc, range(2, 4))
    run["B"] = copy.deepcopy(pfc.gathered_shard_state())
    run["losses"] += train(pfc, range(4, 6))
    run["C"] = copy.deepcopy(pfc.gathered_shard_state())
    return run


@pytest.fixture(scope="module")
def single():
    return _single_process_run()


@pytest.fixture(scope="module")
def world2(single):
    return run_distributed(worker, 2, single["A"])


@pytest.fixture(scope="module")
def world3(world2):
    return run_distributed(worker, 3, _state(world2[0]))


def _assert_parity(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        for label, errs in res["parity"].items():
            for key, err in errs.items():
                assert abs(err) <= 1e-10, f"rank {rank} {label} {key}: relative error {err:.2e}"


@pytest.mark.slow
def test_parity_two_ranks_every_margin(world2):
    _assert_parity(world2)


@pytest.mark.slow
def test_parity_three_ranks_every_margin(world3):
    _assert_parity(world3)


@pytest.mark.slow
@pytest.mark.parametrize("world", ["world2", "world3"])
def test_sampling_and_label_checks_on_every_rank(world, request):
    for res in request.getfixturevalue(world):
        assert all(res["sampling"].values()), res["sampling"]
        assert f"label {C_SAMPLED} at position 7" in res["bad_label"]


def _assert_state_close(got: dict, want: dict) -> None:
    g_w = torch.cat([p["weight"] for p in got["pieces"]])
    w_w = torch.cat([p["weight"] for p in want["pieces"]])
    torch.testing.assert_close(g_w, w_w, rtol=1e-12, atol=1e-14)
    g_m = torch.cat([p["rows"]["momentum_buffer"] for p in got["pieces"]])
    w_m = torch.cat([p["rows"]["momentum_buffer"] for p in want["pieces"]])
    torch.testing.assert_close(g_m, w_m, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_one_to_two_ranks_continues_identically(single, world2):
    assert all(r["loaded_centers_equal"] for r in world2)
    for res in world2:
        assert res["losses"] == pytest.approx(single["losses"][2:4], rel=1e-12)
    assert [len(p["weight"]) for p in _state(world2[0])["pieces"]] == [6, 5]
    _assert_state_close(_state(world2[0]), single["B"])


@pytest.mark.slow
def test_two_to_three_ranks_continues_identically(single, world3):
    assert all(r["loaded_centers_equal"] for r in world3)
    for res in world3:
        assert res["losses"] == pytest.approx(single["losses"][4:6], rel=1e-12)
    assert [len(p["weight"]) for p in _state(world3[0])["pieces"]] == [4, 4, 3]
    _assert_state_close(_state(world3[0]), single["C"])


@pytest.mark.slow
def test_two_to_one_process_continues_identically(single, world2):
    pfc = build_pfc(seed=SEED + 5)
    pfc.configure_optimizer(**OPTIM)
    pfc.load_shard_pieces(_state(world2[0]))
    assert train(pfc, range(4, 6)) == pytest.approx(single["losses"][4:6], rel=1e-12)
    _assert_state_close(pfc.gathered_shard_state(), single["C"])

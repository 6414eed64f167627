"""Half-precision Partial FC rows and optimizer state (``weight_dtype``, ``state_dtype``).

One process: the stochastic rounding of fp32 into fp16, the storage dtypes of the optimizer
rows, the update of half rows equal to ``torch.optim``'s rule applied to the stored values
(fp32 maths, no fp32 master copy), unbiased write-back, the refused combinations, and states
that load into any other dtype. Gloo ranks: a state of each half dtype trained on 1 process
re-shards 1 → 2 → 3 ranks (and 2 → 1) and continues like the uninterrupted run.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from core.errors import ConfigError
from dist_train.config import load_config
from dist_train.distributed import get_rank, get_world_size
from dist_train.losses import build_head
from dist_train.partial_fc import (
    PartialFC,
    estimate_memory_bytes,
    export_class_centers,
    native,
    stochastic_round_fp16,
)
from tests.dist_utils import run_distributed

D = 8
HALF = [torch.bfloat16, torch.float16]


def make(c=11, rate=1.0, update="sparse", weight=torch.float32, state=torch.float32, **kw):
    head = build_head("arcface", {"s": 16.0, "m": 0.3}, c)
    return PartialFC(
        head, D, c, sample_rate=rate, update=update, weight_dtype=weight, state_dtype=state, **kw
    )


def batch(n=6, c=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen), torch.randint(0, c, (n,), generator=gen)


def test_fp16_stochastic_rounding_is_unbiased_down_to_subnormals():
    torch.manual_seed(0)
    x = torch.full((200000,), 1.0 + 2**-13)  # between fp16 neighbours 1 and 1 + 2^-10
    r = stochastic_round_fp16(x).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-10}
    assert r.mean().item() == pytest.approx(1.0 + 2**-13, abs=2e-6)
    tiny = torch.full((200000,), 1e-8)  # a sixth of fp16's smallest subnormal (5.96e-8)
    assert stochastic_round_fp16(tiny).float().mean().item() == pytest.approx(1e-8, rel=0.03)
    assert tiny.half().float().max().item() == 0.0  # round to nearest loses it
    big = stochastic_round_fp16(torch.tensor([7e4, -7e4, 65504.0]))
    assert big.tolist() == [float("inf"), float("-inf"), 65504.0]


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("state", HALF + [torch.float32])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_rows_are_stored_in_the_state_dtype_without_a_master_copy(
    state, name, use_native
):
    if state == torch.float16 and name == "adamw":
        with pytest.raises(ValueError, match="state_dtype=float16 is refused for adamw"):
            make(state=state).configure_optimizer(name, lr=0.1)
        return
    pfc = make(c=500, rate=0.1, weight=torch.bfloat16, state=state)
    opt = pfc.configure_optimizer(name, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.use_native = use_native
    for step in range(3):
        rows0 = {k: v.clone() for k, v in opt.rows.items()}
        weight0 = pfc.weight.clone()
        x, y = batch(n=8, c=500, seed=step)
        pfc(x, y).backward()
        opt.step()
        opt.zero_grad()
        untouched = torch.ones(500, dtype=torch.bool)
        untouched[pfc.sampled_index] = False
        assert torch.equal(pfc.weight[untouched], weight0[untouched])
        for key, value in opt.rows.items():
            assert torch.equal(value[untouched], rows0[key][untouched]), key
            if key != "step":
                assert not torch.equal(value[~untouched], rows0[key][~untouched]), key
    assert {k: v.dtype for k, v in opt.rows.items() if k != "step"} == {
        k: state for k in opt.rows if k != "step"
    }
    # nothing of the shard's size is held in fp32: the torch path's maths buffers are one
    # chunk, the compiled kernel (SGD, bf16 or fp32 state) has none
    compiled = use_native and name == "sgd" and state != torch.float16 and native.library()
    if compiled:
        assert not hasattr(opt, "_bufs")
    else:
        assert all(b.shape[0] == 50 for b in opt._bufs.values())  # the sampled rows


def _reference_step(name, w, g, state, kw):
    """``torch.optim``'s fp32 rule on the stored (half) values, rounded to nearest."""
    p = w.float().clone().requires_grad_(True)
    p.grad = g.float().clone()
    if name == "sgd":
        opt = torch.optim.SGD([p], **kw)
        opt.state[p]["momentum_buffer"] = state["momentum_buffer"].float().clone()
    else:
        opt = torch.optim.AdamW([p], **kw)
        step = int(state["step"][0])
        opt.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": state["exp_avg"].float().clone(),
            "exp_avg_sq": state["exp_avg_sq"].float().clone(),
        }
    opt.step()
    out = {k: v.to(state[k].dtype) for k, v in opt.state[p].items() if k in state and k != "step"}
    return p.detach().to(w.dtype), out


@pytest.mark.parametrize("update", ["sparse", "dense"])
@pytest.mark.parametrize(
    "weight,state,name",
    [
        (torch.bfloat16, torch.bfloat16, "sgd"),
        (torch.float16, torch.float16, "sgd"),
        (torch.float32, torch.bfloat16, "sgd"),
        (torch.bfloat16, torch.bfloat16, "adamw"),
        (torch.float16, torch.bfloat16, "adamw"),
    ],
)
def test_half_rows_follow_the_torch_rule_on_the_stored_values(update, weight, state, name):
    # Round to nearest (no random draws): each step starts from the stored half values, so
    # the result is the fp32 rule applied to them, rounded; an fp32 master copy would drift.
    c = 11 if update == "sparse" else 40
    pfc = make(c=c, rate=1.0 if update == "sparse" else 0.25, update=update, weight=weight,
               state=state, init_std=0.5, stochastic_rounding=False)  # fmt: skip
    kw = {"lr": 0.05, "weight_decay": 1e-3}
    kw.update({"momentum": 0.9} if name == "sgd" else {})
    opt = pfc.configure_optimizer(name, **kw)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-20}
    for step in range(4):
        x, y = batch(n=5, c=c, seed=step)
        pfc(x, y).backward()
        grad = torch.zeros(pfc.num_rows, D)
        grad[pfc.sampled_index] = pfc.sampled_weight.grad
        rows = {k: v.clone() for k, v in opt.rows.items()}
        want_w, want_rows = _reference_step(name, pfc.weight, grad, rows, kw)
        opt.step()
        opt.zero_grad()
        # one ulp of the storage: the fp32 order of operations may differ from torch's
        torch.testing.assert_close(pfc.weight.float(), want_w.float(), rtol=ulp[weight], atol=0)
        for key, value in want_rows.items():
            torch.testing.assert_close(
                opt.rows[key].float(), value.float(), rtol=ulp[state], atol=1e-30
            )


@pytest.mark.parametrize("state", HALF)
def test_stochastic_rounding_keeps_the_momentum_update_that_rounding_loses(state):
    # m ← 0.9·m + g with m = 1 and g = 2⁻¹²: 0.900244 lies between two half values, nearer
    # the lower one; only stochastic rounding keeps its mean.
    means = {}
    for sr in (True, False):
        torch.manual_seed(0)
        pfc = make(c=2000, state=state, stochastic_rounding=sr)
        opt = pfc.configure_optimizer("sgd", lr=1e-30, momentum=0.9, weight_decay=0.0)
        opt.rows["momentum_buffer"].fill_(1.0)
        x, y = batch(n=4, c=2000)
        pfc(x, y)
        pfc.sampled_weight.grad = torch.full_like(pfc.sampled_weight, 2**-12)
        opt.step()
        means[sr] = opt.rows["momentum_buffer"].double().mean().item()
    want = 0.9 + 2**-12
    assert means[True] == pytest.approx(want, abs=1e-4)
    assert abs(means[False] - want) > 1e-4


def test_fp16_momentum_outside_fp16_range_raises():
    pfc = make(c=11, state=torch.float16)
    opt = pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9)
    x, y = batch()
    pfc(x, y)
    pfc.sampled_weight.grad = torch.full_like(pfc.sampled_weight, 1e5)
    with pytest.raises(FloatingPointError, match="partial_fc.state_dtype"):
        opt.step()


def test_config_keys_and_refused_combinations():
    cfg = load_config(None, ["partial_fc.state_dtype=bfloat16", "partial_fc.weight_dtype=float16"])
    assert (cfg.partial_fc.state_dtype, cfg.partial_fc.weight_dtype) == ("bfloat16", "float16")
    assert load_config(None).partial_fc.state_dtype == "float32"
    load_config(None, ["partial_fc.state_dtype=float16"])  # SGD momentum: allowed
    with pytest.raises(ConfigError, match="state_dtype=float16 is refused with optim.name=adamw"):
        load_config(None, ["partial_fc.state_dtype=float16", "optim.name=adamw"])
    with pytest.raises(ConfigError, match="partial_fc.state_dtype"):
        load_config(None, ["partial_fc.state_dtype=int8"])
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        make(state="int8")
    assert make().state_dtype == torch.float32
    assert make(weight=torch.float64, state=None).state_dtype == torch.float64


@pytest.mark.parametrize(
    "src,dst",
    [
        ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)),
        ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)),
        ((torch.float16, torch.float16), (torch.bfloat16, torch.float32)),
        ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)),
    ],
)
@pytest.mark.parametrize("configure_first", [True, False])
def test_a_state_loads_into_any_other_dtype(src, dst, configure_first):
    a = make(c=50, rate=0.2, weight=src[0], state=src[1], init_std=0.1)
    a.configure_optimizer("sgd", lr=0.5, momentum=0.9)
    for step in range(3):
        x, y = batch(n=8, c=50, seed=step)
        a(x, y).backward()
        a.optimizer.step()
        a.optimizer.zero_grad()
    buf = io.BytesIO()  # the checkpoint round trip keeps each tensor's dtype
    torch.save(a.shard_state(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["pieces"][0]["weight"].dtype == src[0]
    assert state["pieces"][0]["rows"]["momentum_buffer"].dtype == src[1]
    b = make(c=50, rate=0.2, weight=dst[0], state=dst[1], seed=3)
    if configure_first:
        b.configure_optimizer("sgd", lr=0.5, momentum=0.9)
    b.load_shard_pieces(state)
    if not configure_first:
        b.configure_optimizer("sgd", lr=0.5, momentum=0.9)
    assert b.weight.dtype == dst[0] and b.optimizer.rows["momentum_buffer"].dtype == dst[1]
    # a cast, rounded to nearest: exact wherever the destination holds the source's values
    assert torch.equal(b.weight, a.weight.to(dst[0]))
    m = a.optimizer.rows["momentum_buffer"]
    assert torch.equal(b.optimizer.rows["momentum_buffer"], m.to(dst[1]))
    torch.testing.assert_close(export_class_centers(b), export_class_centers(a), rtol=2**-7, atol=0)


# ------------------------------------------------------------------ gloo processes

C, N, SEED = 11, 10, 1
OPTIM = {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4}
MOMENTUM = "momentum_buffer"
# (weight, state, stochastic rounding): fp64 maths with round-to-nearest state is
# deterministic, so every world size must match the single process exactly; bf16 rows with
# stochastic rounding draw other random numbers per world size, so they match loosely.
CONFIGS = {
    "f64/bf16": (torch.float64, torch.bfloat16, False),
    "f64/fp16": (torch.float64, torch.float16, False),
    "bf16/bf16 sr": (torch.bfloat16, torch.bfloat16, True),
}


def _pfc(config: str, seed: int = SEED) -> PartialFC:
    weight, state, sr = CONFIGS[config]
    head = build_head("arcface", {"s": 16.0, "m": 0.3}, C)
    pfc = PartialFC(head, 6, C, weight_dtype=weight, state_dtype=state, init_std=0.5, seed=seed,
                    stochastic_rounding=sr)  # fmt: skip
    pfc.configure_optimizer(**OPTIM)
    return pfc


def _train(pfc: PartialFC, steps: range) -> list[float]:
    rank, world = get_rank(), get_world_size()
    losses = []
    for step in steps:
        gen = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(N, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, C, (N,), generator=gen)
        x = torch.tensor_split(x, world)[rank].to(pfc.weight.dtype)
        loss = pfc(x.float() if x.dtype != torch.float64 else x, torch.tensor_split(y, world)[rank])
        loss.backward()
        pfc.optimizer.step()
        pfc.optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _worker(rank: int, world: int, states: dict) -> dict:
    """Per config: load the given state (another seed), train 2 steps, return the state."""
    out = {}
    first = 2 if world == 2 else 4
    for config, blob in states.items():
        state = torch.load(io.BytesIO(blob), weights_only=True)
        pfc = _pfc(config, seed=SEED + 77)
        pfc.load_shard_pieces(state)
        now = pfc.gathered_shard_state()
        loaded = all(torch.equal(_flat(now, k), _flat(state, k)) for k in ("weight", MOMENTUM))
        out[config] = {
            "loaded": loaded,
            "losses": _train(pfc, range(first, first + 2)),
            "state": _bytes(pfc.gathered_shard_state()),
        }
    return out


def _flat(state: dict, key: str) -> torch.Tensor:
    pieces = state["pieces"]
    rows = [p[key] if key == "weight" else p["rows"][key] for p in pieces]
    return torch.cat(rows).double()


@pytest.fixture(scope="module")
def chain():
    single, a_states = {}, {}
    for config in CONFIGS:
        pfc = _pfc(config)
        run = {"losses": _train(pfc, range(0, 2))}
        a_states[config] = _bytes(pfc.gathered_shard_state())
        run["losses"] += _train(pfc, range(2, 4))
        run["B"] = copy.deepcopy(pfc.gathered_shard_state())
        run["losses"] += _train(pfc, range(4, 6))
        run["C"] = copy.deepcopy(pfc.gathered_shard_state())
        single[config] = run
    w2 = run_distributed(_worker, 2, a_states)
    w3 = run_distributed(_worker, 3, {k: v["state"] for k, v in w2[0].items()})
    return single, w2, w3


def _close(got: dict, want: dict, config: str) -> None:
    exact = not CONFIGS[config][2]
    for key in ("weight", "momentum_buffer"):
        g, w = _flat(got, key), _flat(want, key)
        if exact:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14, msg=f"{config} {key}")
        else:  # other rounding draws: within a few bf16 ulps of the row's scale
            assert (g - w).abs().max() <= 0.05 * w.abs().max(), f"{config} {key}"


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_half_state_reshards_one_two_three_one_and_continues(chain, config):
    single, w2, w3 = chain
    rel = 1e-12 if not CONFIGS[config][2] else 2e-2
    for world, results, steps, key in ((2, w2, slice(2, 4), "B"), (3, w3, slice(4, 6), "C")):
        for res in results:
            assert res[config]["loaded"], (config, world)
            assert res[config]["losses"] == pytest.approx(single[config]["losses"][steps], rel=rel)
        state = torch.load(io.BytesIO(results[0][config]["state"]), weights_only=True)
        assert [len(p["weight"]) for p in state["pieces"]] == ([6, 5] if world == 2 else [4, 4, 3])
        assert state["pieces"][0]["rows"]["momentum_buffer"].dtype == CONFIGS[config][1]
        _close(state, single[config][key], config)
    # 2 → 1 process
    pfc = _pfc(config, seed=SEED + 5)
    pfc.load_shard_pieces(torch.load(io.BytesIO(w2[0][config]["state"]), weights_only=True))
    assert _train(pfc, range(4, 6)) == pytest.approx(single[config]["losses"][4:6], rel=rel)
    _close(pfc.gathered_shard_state(), single[config]["C"], config)


@pytest.mark.parametrize(
    "weight,state,name,k",
    [
        ("float32", "float32", "sgd", 1),
        ("bfloat16", "float32", "sgd", 1),
        ("bfloat16", "bfloat16", "sgd", 1),
        ("float16", "float16", "sgd", 3),
        ("bfloat16", "bfloat16", "adamw", 1),
        ("float32", "bfloat16", "adam", 3),
    ],
)
def test_memory_model_persistent_bytes_are_what_the_module_holds(weight, state, name, k):
    c, d = 1000, 16
    kw = {"s": 16.0, "m": 0.3, "k": k} if k > 1 else {"s": 16.0, "m": 0.3}
    head = build_head("subcenter_arcface" if k > 1 else "arcface", kw, c)
    pfc = PartialFC(head, d, c, sample_rate=0.1, weight_dtype=weight, state_dtype=state)
    opt = pfc.configure_optimizer(name, lr=0.1)
    held = pfc.weight.nbytes + sum(v.nbytes for v in opt.rows.values())
    model = estimate_memory_bytes(
        c, 1, embedding_size=d, global_batch=8, sample_rate=0.1, weight_dtype=weight,
        state_dtype=state, optimizer=name, sub_centers=k,
    )  # fmt: skip
    assert model["persistent"] == held
    per_value = {"float32": 4, "bfloat16": 2, "float16": 2}
    per_state = (1 if name == "sgd" else 2) * per_value[state]
    assert held == c * k * d * (per_value[weight] + per_state) + (c * k * 4 if name != "sgd" else 0)


def test_memory_model_bf16_rows_and_momentum_fit_512k_identities_per_gib_of_state():
    model = estimate_memory_bytes(
        1_000_000, 1, sample_rate=0.01, weight_dtype="bfloat16", state_dtype="bfloat16"
    )
    assert model["persistent"] == 1_000_000 * 2048  # D·2 + D·2 bytes, no fp32 master copy
    fp32 = estimate_memory_bytes(1_000_000, 1, sample_rate=0.01, weight_dtype="bfloat16")
    assert fp32["persistent"] == 1_000_000 * 3072  # bf16 rows, fp32 momentum
    # transient at rate 0.01: S = 10,000 rows' fp32 copies, gradients, the [N, S] buffers and
    # the optimizer's chunk buffers: a few percent of the shard
    assert model["transient"] < 0.1 * model["persistent"]
    k3 = estimate_memory_bytes(
        1_000_000, 1, sample_rate=0.01, weight_dtype="bfloat16", state_dtype="bfloat16",
        sub_centers=3,
    )  # fmt: skip
    assert k3["persistent"] == 3 * model["persistent"]
    assert k3["transient"] > 2 * model["transient"]

"""ShardedCenterLoss in one process: formula, gradients, both update rules, state, errors."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from dist_train.center_loss import LEGACY_FORMAT, ShardedCenterLoss
from dist_train.sharded_state import full_rows


def _problem(seed=0, n=9, c=5, d=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    centers = torch.randn(c, d, generator=g, dtype=torch.float64)
    return x, labels, centers


def ref_center_loss(x, labels, centers, weight):
    total = 0.0
    for i in range(len(x)):
        diff = x[i] - centers[int(labels[i])]
        total = total + (diff * diff).sum()
    return weight * total / (2 * len(x))


def ref_alpha_update(x, labels, centers, alpha):
    new = centers.clone()
    for j in range(len(centers)):
        members = [i for i in range(len(x)) if int(labels[i]) == j]
        delta = sum((centers[j] - x[i] for i in members), torch.zeros_like(centers[j]))
        new[j] = centers[j] - alpha * delta / (1 + len(members))
    return new


def _module(c, d, centers=None, **kw):
    m = ShardedCenterLoss(c, d, dtype=torch.float64, **kw)
    if centers is not None:
        with torch.no_grad():
            m.centers_shard.copy_(centers)
    return m


def test_loss_and_gradients_match_loop_reference():
    x, labels, centers = _problem()
    m = _module(5, 3, centers, weight=0.3)
    xg = x.clone().requires_grad_(True)
    loss = m(xg, labels)
    loss.backward()
    xr, cr = x.clone().requires_grad_(True), centers.clone().requires_grad_(True)
    ref = ref_center_loss(xr, labels, cr, 0.3)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(xg.grad, xr.grad)
    torch.testing.assert_close(m.centers_shard.grad, cr.grad)


def test_gradcheck_float64():
    x, labels, centers = _problem(seed=1, n=6, c=4, d=3)
    m = _module(4, 3, weight=0.7)

    def fn(t, c):
        return functional_call(m, {"centers_shard": c}, (t, labels))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), centers.requires_grad_()))


def test_alpha_rule_matches_paper_and_uses_old_centres_for_the_loss():
    x, labels, centers = _problem(seed=2)
    labels[labels == 4] = 0  # class 4 absent: its centre must not move
    m = _module(5, 3, centers, update="alpha", alpha=0.5)
    assert not isinstance(m.centers_shard, torch.nn.Parameter)
    xg = x.clone().requires_grad_(True)
    loss = m(xg, labels)
    torch.testing.assert_close(loss, ref_center_loss(x, labels, centers, 1.0))
    want = ref_alpha_update(x, labels, centers, 0.5)
    torch.testing.assert_close(m.centers_shard, want)
    torch.testing.assert_close(m.centers_shard[4], centers[4], rtol=0, atol=0)
    loss.backward()  # backward after the in-place update still works
    xr = x.clone().requires_grad_(True)
    ref_center_loss(xr, labels, centers, 1.0).backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    m.eval()
    m(x, labels)
    torch.testing.assert_close(m.centers_shard, want)  # no update in eval mode


def test_gradient_rule_steps_with_its_own_optimizer():
    x, labels, centers = _problem(seed=3)
    m = _module(5, 3, centers)
    opt = m.configure_optimizer("sgd", lr=0.5)
    assert m.optimizer is opt and opt.param_groups[0]["lr"] == 0.5
    m(x, labels).backward()
    cr = centers.clone().requires_grad_(True)
    ref_center_loss(x, labels, cr, 1.0).backward()
    opt.step()
    torch.testing.assert_close(m.centers_shard.detach(), centers - 0.5 * cr.grad)


def _trained(opt_name, seed):
    """A module after two steps of ``opt_name``, its batch and its optimizer arguments."""
    x, labels, centers = _problem(seed=seed)
    kw = {"momentum": 0.9} if opt_name == "sgd" else {}
    a = _module(5, 3, centers)
    a.configure_optimizer(opt_name, lr=0.1, **kw)
    for _ in range(2):
        _step(a, x, labels)
    return a, x, labels, kw


def _step(m, x, labels):
    m.optimizer.zero_grad()
    m(x, labels).backward()
    m.optimizer.step()


def _load_and_continue(a, pieces, opt_name, kw, x, labels):
    """Loads ``pieces`` into a fresh module: it equals ``a`` now and after one more step."""
    b = _module(5, 3)
    b.load_shard_pieces(pieces)  # before configure_optimizer: applied when it is called
    b.configure_optimizer(opt_name, lr=0.1, **kw)
    torch.testing.assert_close(b.centers_shard, a.centers_shard, rtol=0, atol=0)
    for m in (a, b):
        _step(m, x, labels)
    torch.testing.assert_close(b.centers_shard, a.centers_shard, rtol=0, atol=0)
    return b


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_state_dict_round_trip_continues_identically(opt_name):
    a, x, labels, kw = _trained(opt_name, seed=4)
    state = a.shard_state()
    assert full_rows(state, "centers").shape == (5, 3)
    assert set(state["pieces"][0]["rows"]) == (
        {"momentum_buffer"} if opt_name == "sgd" else {"exp_avg", "exp_avg_sq"}
    )
    _load_and_continue(a, [state], opt_name, kw, x, labels)


def test_errors_name_the_problem():
    m = ShardedCenterLoss(4, 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\).*\[0, 7\]"):
        m(torch.randn(2, 3), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"local_embeddings must be \[B, 3\]"):
        m(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="update='gradient'"):
        ShardedCenterLoss(4, 3, update="alpha").configure_optimizer("sgd", lr=0.1)
    with pytest.raises(ValueError, match="update='bogus'"):
        ShardedCenterLoss(4, 3, update="bogus")
    state = ShardedCenterLoss(5, 3).shard_state()
    with pytest.raises(ValueError, match="key 'num_classes' is 5, expected 4"):
        m.load_shard_pieces([state])
    # the sharded state has its own methods: nn.Module's state_dict is the usual one
    assert set(m.state_dict(prefix="x.")) == {"x.centers_shard"}


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_legacy_gathered_state_loads_and_continues_identically(opt_name):
    """A state in the gathered layout (LEGACY_FORMAT), one identical copy per rank, loads."""
    a, x, labels, kw = _trained(opt_name, seed=5)
    opt = a.optimizer.state_dict()
    rows = {k: v.clone() for k, v in opt["state"][0].items() if k != "step"}
    scalars = {k: v.clone() for k, v in opt["state"][0].items() if k == "step"}
    legacy = {
        "format": LEGACY_FORMAT,
        "num_classes": 5,
        "embedding_size": 3,
        "update": "gradient",
        "centers": a.centers_shard.detach().clone(),
        "optimizer": {"param_groups": opt["param_groups"], "rows": rows, "scalars": scalars},
    }
    b = _load_and_continue(a, [legacy, legacy], opt_name, kw, x, labels)  # as two ranks wrote it
    # after the step taken from the loaded optimizer rows, the two modules still agree
    torch.testing.assert_close(b.centers_shard, a.centers_shard, rtol=0, atol=0)


def test_bfloat16_embeddings_give_float32_loss():
    m = ShardedCenterLoss(4, 3)
    loss = m(torch.randn(6, 3).bfloat16(), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---- half-precision centres and optimizer state ----

HALF_CASES = [
    (torch.bfloat16, torch.bfloat16, "sgd"),
    (torch.float16, torch.float16, "sgd"),
    (torch.float32, torch.bfloat16, "sgd"),
    (torch.bfloat16, torch.bfloat16, "adamw"),
    (torch.bfloat16, torch.float32, "adam"),
]


def _half_module(dtype, state_dtype, sr=False, c=40, d=6):
    m = ShardedCenterLoss(c, d, dtype=dtype, state_dtype=state_dtype, stochastic_rounding=sr)
    with torch.no_grad():
        m.centers_shard.copy_(torch.randn(c, d, generator=torch.Generator().manual_seed(3)))
    return m


@pytest.mark.parametrize("dtype,state_dtype,name", HALF_CASES)
def test_half_centres_follow_the_torch_rule_on_the_stored_values(dtype, state_dtype, name):
    from dist_train.center_loss import HalfRowsOptimizer

    m = _half_module(dtype, state_dtype)
    kw = {"momentum": 0.9, "weight_decay": 1e-3} if name == "sgd" else {"weight_decay": 1e-2}
    opt = m.configure_optimizer(name, lr=0.2, **kw)
    assert isinstance(opt, HalfRowsOptimizer)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-20}
    ref_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    for step in range(4):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
        labels = torch.arange(16) % 40
        # torch.optim's rule in fp32 on the stored values (no master copy), rounded to nearest
        p = m.centers_shard.detach().float().clone().requires_grad_(True)
        ref = ref_cls[name]([p], lr=0.2, **kw)
        if opt.state:
            ref.state[p] = {k: v.float().clone() for k, v in opt.state[m.centers_shard].items()}
        _step(m, x, labels)
        p.grad = m.centers_shard.grad.float()
        ref.step()
        torch.testing.assert_close(m.centers_shard.float(), p.detach().to(dtype).float(),
                                   rtol=ulp[dtype], atol=0)  # fmt: skip
        for key, value in opt.state[m.centers_shard].items():
            assert value.dtype == (state_dtype if key != "step" else torch.float32)
            if key != "step":
                want = ref.state[p][key].to(state_dtype).float()
                torch.testing.assert_close(value.float(), want, rtol=ulp[state_dtype], atol=1e-30)


def test_half_state_refusals_and_config_keys():
    from dist_train.config import load_config
    from dist_train.losses import build_loss

    with pytest.raises(ValueError, match="center loss state_dtype=float16 is refused for adam"):
        _half_module(torch.bfloat16, torch.float16).configure_optimizer("adam", lr=0.1)
    cfg = load_config(
        None,
        ["head.params={center_loss_weight: 0.1, center_loss_centers_dtype: bfloat16, "
         "center_loss_state_dtype: bfloat16}"],
    )  # fmt: skip
    loss = build_loss(cfg, 10, torch.device("cpu"))
    assert loss.center.centers_shard.dtype == torch.bfloat16
    assert loss.center.state_dtype == torch.bfloat16
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="head.params.center_loss_state_dtype"):
        load_config(None, ["head.params={center_loss_weight: 0.1, center_loss_state_dtype: x}"])


@pytest.mark.parametrize(
    "src,dst",
    [
        ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)),
        ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)),
        ((torch.float16, torch.float16), (torch.bfloat16, torch.float32)),
    ],
)
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_half_state_loads_into_any_other_dtype_and_continues(src, dst, name):
    import io

    if name == "adamw" and torch.float16 in src:
        src = (src[0], torch.bfloat16)
    kw = {"momentum": 0.9} if name == "sgd" else {}
    a = _half_module(*src, sr=True)
    a.configure_optimizer(name, lr=0.2, **kw)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(7))
    labels = torch.arange(16) % 40
    for _ in range(2):
        _step(a, x, labels)
    buf = io.BytesIO()
    torch.save(a.shard_state(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["pieces"][0]["centers"].dtype == src[0]
    b = _half_module(*dst)
    b.load_shard_pieces(state)
    b.configure_optimizer(name, lr=0.2, **kw)
    assert torch.equal(b.centers_shard, a.centers_shard.detach().to(dst[0]))
    for key, value in a.optimizer.state[a.centers_shard].items():
        got = b.optimizer.state[b.centers_shard][key]
        assert torch.equal(got, value.to(got.dtype)), key
        assert key == "step" or got.dtype == dst[1]
    for m in (a, b):
        _step(m, x, labels)
    torch.testing.assert_close(
        b.centers_shard.float(), a.centers_shard.float(), rtol=2e-2, atol=1e-2
    )


def test_alpha_rule_on_bf16_centres_is_unbiased():
    x, labels, _ = _problem(seed=2, n=64, c=4, d=3)
    means = {}
    for sr in (True, False):
        torch.manual_seed(0)
        m = ShardedCenterLoss(4, 3, update="alpha", alpha=1e-3, dtype="bfloat16",
                              stochastic_rounding=sr)  # fmt: skip
        with torch.no_grad():
            m.centers_shard.fill_(1.0)
        for _ in range(50):
            m(x.float(), labels)
        means[sr] = m.centers_shard.float()
    ref = ShardedCenterLoss(4, 3, update="alpha", alpha=1e-3, dtype=torch.float64)
    with torch.no_grad():
        ref.centers_shard.fill_(1.0)
    for _ in range(50):
        ref(x, labels)
    moved = (ref.centers_shard - 1.0).abs().mean().item()  # ~1e-2: under half a bf16 ulp/step
    err_sr = (means[True].double() - ref.centers_shard).abs().mean().item()
    err_nearest = (means[False].double() - ref.centers_shard).abs().mean().item()
    assert err_sr < 0.25 * moved < err_nearest

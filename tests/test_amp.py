"""Mixed precision in the trainer: fp16 with a GradScaler, its checkpointed state, overflow
skipping, and Partial FC's logits staying fp32 under autocast.

On CPU, torch 2.13 runs fp16 autocast (convolutions, linear layers) and ``GradScaler("cpu")``;
every test here runs on CPU without skipping.
"""

from __future__ import annotations

import math
import signal

import pytest
import torch

import heads
from dist_train import partial_fc as pfc_module
from dist_train.config import load_config
from dist_train.distributed import DistInfo
from dist_train.partial_fc import PartialFC
from tests.conftest import TinyConvNet, tiny_overrides


def _trainer(data, run, **extra):
    from dist_train.trainer import Trainer

    cfg = load_config(None, tiny_overrides(data, run, **extra))
    return Trainer(cfg, DistInfo())


def _record_losses(trainer, stop_at: int | None = None, scaler_states: list | None = None):
    """Runs ``fit()`` recording each step's loss (and, if given a list, the scaler's state
    after each step); optionally a preemption after step ``stop_at``."""
    seen: list[float] = []

    def recording(loss):
        seen.append(loss)
        if scaler_states is not None:
            scaler_states.append(trainer.scaler.state_dict())
        if stop_at is not None and trainer.step == stop_at:
            trainer.train_step.request_stop(signal.SIGTERM)

    trainer.fit(on_step=recording)
    return seen


def _scalars(run, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_fp16_uses_a_grad_scaler_and_trains(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, tmp_path / "fp16", **{"amp": "fp16", "max_steps": 10})
    assert trainer.scaler.is_enabled() and trainer.amp_dtype == torch.float16
    with torch.autocast("cpu", dtype=trainer.amp_dtype):
        out = trainer.backbone(torch.zeros(2, 3, 32, 32))
    assert out.dtype == torch.float16  # the backbone really runs in fp16 on this device
    before = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    states: list[dict] = []
    losses = _record_losses(trainer, scaler_states=states)
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    # The default initial scale (2^16) overflows this net's fp16 gradients: the scaler backs
    # off step by step until steps go through, and every skipped step is counted.
    scales = [s["scale"] for s in states]
    skipped = sum(b < a for a, b in zip([65536.0] + scales, scales))
    assert 1 <= skipped == trainer.train_step.skipped_total < 10
    assert scales[-1] < 65536.0
    assert any(not torch.equal(before[k], v) for k, v in trainer.backbone.state_dict().items())
    # bf16 needs no scaler
    assert not _trainer(tiny_data, tmp_path / "bf16", amp="bf16").scaler.is_enabled()


def test_overflow_is_skipped_lowers_the_scale_and_is_logged(tiny_data, tmp_path):
    run = tmp_path / "ovf"
    trainer = _trainer(tiny_data, run, **{"amp": "fp16", "max_steps": 2, "tensorboard": True})
    # A scale so large that the scaled gradient overflows in the fp16 backward of the backbone
    # (a real overflow: nothing is patched).
    state = trainer.scaler.state_dict()
    trainer.scaler.load_state_dict({**state, "scale": 2.0**60})
    before = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    weight_before = trainer.loss.partial_fc.weight.detach().clone()
    loss = trainer.train_step(iter(trainer.data.loader))
    assert math.isfinite(loss)  # the loss itself is fine; its scaled gradient is not
    # a skip while the scale is still >= 1 is the scaler searching its range: not counted
    # towards max_skipped_steps (it is in skipped_total)
    assert trainer.train_step.skipped_total == 1 and trainer.train_step.skipped_in_row == 0
    assert trainer.scaler.get_scale() == 2.0**59  # backed off by backoff_factor 0.5
    for k, v in trainer.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(trainer.loss.partial_fc.weight, weight_before)
    assert all(p.grad is None for p in trainer.backbone.parameters())  # nothing left over

    # Through fit(): the skipped step is counted in TensorBoard with the scale.
    trainer = _trainer(
        tiny_data, tmp_path / "fit", **{"amp": "fp16", "max_steps": 2, "tensorboard": True}
    )
    trainer.scaler.load_state_dict({**state, "scale": 2.0**60})
    trainer.fit()
    skipped = _scalars(tmp_path / "fit", "train/skipped_steps")
    scale = _scalars(tmp_path / "fit", "train/loss_scale")
    assert skipped[1] == 1.0 and scale[1] == 2.0**59
    assert skipped[2] >= 1.0
    assert "non-finite loss or gradient, step skipped" in (tmp_path / "fit/train.log").read_text()


def test_scaler_state_is_checkpointed_and_restored(tiny_data, tmp_path):
    extra = {"amp": "fp16", "num_epochs": 1, "optim.name": "adamw", "optim.lr": 1e-3}
    # grows every 2 good steps, so the scale and its growth tracker change within the test
    custom = {
        "scale": 256.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2,
        "_growth_tracker": 0,
    }

    full_trainer = _trainer(tiny_data, tmp_path / "full", **extra)
    full_trainer.scaler.load_state_dict(custom)
    full_states: list[dict] = []
    full = _record_losses(full_trainer, scaler_states=full_states)
    assert len(full) == 12
    assert len({(s["scale"], s["_growth_tracker"]) for s in full_states}) > 2

    first = _trainer(tiny_data, tmp_path / "cut", **extra)
    first.scaler.load_state_dict(custom)
    _record_losses(first, stop_at=4)
    assert first.step == 5  # every rank agrees to stop at the next step's all-reduce
    saved = torch.load(tmp_path / "cut/checkpoints/step_00000005.pt", weights_only=False)
    assert saved["scaler"] == full_states[4] != custom

    resumed = _trainer(tiny_data, tmp_path / "cut", **extra, **{"checkpoint.resume": "auto"})
    assert resumed.scaler.state_dict() != saved["scaler"]  # a fresh scaler...
    resumed.checkpointer.resume()
    assert resumed.scaler.state_dict() == saved["scaler"]  # ...takes the checkpoint's state
    rest_states: list[dict] = []
    rest = _record_losses(resumed, scaler_states=rest_states)
    assert rest_states == full_states[5:]
    assert rest == pytest.approx(full[5:], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_partial_fc_logits_are_fp32_under_autocast(monkeypatch, amp, weight_dtype):
    seen = []
    original = pfc_module.kernels.CosineCrossEntropy

    class Recording(original):
        @staticmethod
        def apply(x_hat, w, *args):
            seen.append(torch.promote_types(x_hat.dtype, w.dtype))
            return original.apply(x_hat, w, *args)

    monkeypatch.setattr(pfc_module.kernels, "CosineCrossEntropy", Recording)
    torch.manual_seed(0)
    net = TinyConvNet(16)
    pfc = PartialFC(
        heads.get_head("arcface", s=16.0, m=0.2), 16, 11, sample_rate=0.5, weight_dtype=weight_dtype
    )
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 11, (6,))
    with torch.autocast("cpu", dtype=amp):
        embeddings = net(x)
        assert embeddings.dtype == amp  # low precision reaches the classifier...
        loss = pfc(embeddings, y)
    assert seen == [torch.float32]  # ...but its cosines, logits and softmax are fp32
    assert loss.dtype == torch.float32
    loss.backward()
    assert pfc.sampled_weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


_COMBINED = {
    "head.name": "amsoftmax_proto",  # Partial FC + a metric head whose w, b the backbone's
    "head.params": "{s: 30.0, m: 0.1, m_per_class: 2}",  # optimizer trains
    "data.sampler": "m_per_class",
    "data.m_per_class": 2,
}


def _metric_head_overflow_step(trainer, poison: bool) -> dict:
    """One step with (if ``poison``) an infinite gradient on the metric head's scale only."""
    if trainer.scaler.is_enabled():
        state = trainer.scaler.state_dict()
        trainer.scaler.load_state_dict({**state, "scale": 1.0})  # no overflow of its own
    w = trainer.loss.metric.head.metric.w
    handle = w.register_hook(lambda g: g * float("inf")) if poison else None
    before = {
        "backbone": {k: v.clone() for k, v in trainer.backbone.state_dict().items()},
        "classifier": trainer.loss.partial_fc.weight.detach().clone(),
        "w": w.detach().clone(),
    }
    trainer.train_step(iter(trainer.data.loader))
    if handle is not None:
        handle.remove()
    changed = {
        "backbone": any(
            not torch.equal(v, before["backbone"][k])
            for k, v in trainer.backbone.state_dict().items()
        ),
        "classifier": not torch.equal(trainer.loss.partial_fc.weight, before["classifier"]),
        "w": not torch.equal(w.detach(), before["w"]),
    }
    return {
        "changed": changed,
        "skipped": trainer.train_step.skipped_total,
        "w_finite": bool(torch.isfinite(w).all()),
        "backbone": {k: v.clone() for k, v in trainer.backbone.state_dict().items()},
    }


@pytest.mark.parametrize("amp", ["fp16", "none"])
def test_non_finite_metric_head_gradient_skips_every_optimizer(tiny_data, tmp_path, amp):
    # The skip decision covers every optimizer's gradients and, under fp16, each one's
    # GradScaler inf check: a metric-head parameter (trained by the backbone's optimizer, not
    # part of the backbone's gradient norm) with an infinite gradient skips the whole step.
    trainer = _trainer(tiny_data, tmp_path / amp, **{**_COMBINED, "amp": amp})
    clean = _metric_head_overflow_step(trainer, poison=False)
    assert clean["skipped"] == 0 and all(clean["changed"].values()), clean["changed"]
    res = _metric_head_overflow_step(trainer, poison=True)
    assert res["skipped"] == 1
    assert not any(res["changed"].values()), res["changed"]
    assert res["w_finite"]


def _overflow_on_rank_one(rank: int, world: int, data: str, run: str) -> dict:
    from pathlib import Path

    from dist_train.trainer import Trainer

    cfg = load_config(None, tiny_overrides(Path(data), Path(run), **{**_COMBINED, "amp": "fp16"}))
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    return _metric_head_overflow_step(Trainer(cfg, info), poison=rank == 1)


@pytest.mark.slow
def test_fp16_overflow_of_a_metric_head_on_one_rank_skips_on_every_rank(tiny_data, tmp_path):
    from tests.dist_utils import run_distributed

    ranks = run_distributed(_overflow_on_rank_one, 2, str(tiny_data), str(tmp_path / "run"))
    for res in ranks:
        assert res["skipped"] == 1 and not any(res["changed"].values()), res["changed"]
    for k, v in ranks[0]["backbone"].items():
        assert torch.equal(v, ranks[1]["backbone"][k]), k  # the replicas stay identical

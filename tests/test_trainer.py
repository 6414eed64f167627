"""The trainer: gradient convention under DDP, accumulation, exact resume, skipping, outputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_train.config import load_config
from dist_train.distributed import DistInfo
from tests.conftest import tiny_overrides
from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]


def _trainer(data, run, **extra):
    from dist_train.trainer import Trainer

    cfg = load_config(None, tiny_overrides(data, run, **extra))
    return Trainer(cfg, DistInfo())


def _losses(trainer):
    """Runs fit(), recording every step's loss."""
    seen = []
    trainer.fit(on_step=seen.append)
    return seen


# ------------------------------------------------------------------------------------------
# DDP gradient convention: backbone gradients equal the single-process gradient


def _ddp_grads(rank, world, global_x, global_y, state):
    import heads
    from dist_train.model_setup import allreduce_sum_hook, wrap_ddp
    from dist_train.partial_fc import PartialFC
    from tests.conftest import TinyConvNet

    torch.manual_seed(0)
    net = TinyConvNet(16)
    net.load_state_dict(state)
    pfc = PartialFC(heads.get_head("arcface", s=16.0, m=0.2), 16, 11)
    per = global_x.shape[0] // world
    x, y = global_x[rank * per : (rank + 1) * per], global_y[rank * per : (rank + 1) * per]
    if world > 1:
        model = wrap_ddp(net, torch.device("cpu"))
        model.register_comm_hook(None, allreduce_sum_hook)
    else:
        model = net
    loss = pfc(model(x), y)
    loss.backward()
    return float(loss), {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.slow
def test_ddp_sum_hook_gives_single_process_gradients():
    from tests.conftest import TinyConvNet

    torch.manual_seed(1)
    state = TinyConvNet(16).state_dict()
    x = torch.randn(12, 3, 16, 16)
    y = torch.randint(0, 11, (12,))
    ref_loss, ref_grads = run_distributed(_ddp_grads, 1, x, y, state)[0]
    for loss, grads in run_distributed(_ddp_grads, 2, x, y, state):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Single-process behaviour


def test_gradient_accumulation_equals_big_batch(tiny_data, tmp_path):
    big = _trainer(tiny_data, tmp_path / "a", **{"data.batch_size": 8, "max_steps": 2})
    small = _trainer(
        tiny_data,
        tmp_path / "b",
        **{"data.batch_size": 4, "grad_accum_steps": 2, "max_steps": 2},
    )
    la, lb = _losses(big), _losses(small)
    assert la == pytest.approx(lb, rel=1e-5)
    for (ka, pa), (_, pb) in zip(
        big.backbone.named_parameters(), small.backbone.named_parameters()
    ):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=ka)
    torch.testing.assert_close(big.loss.partial_fc.weight, small.loss.partial_fc.weight)


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tiny_data, tmp_path):
    extra = {
        "num_epochs": 2,
        "scheduler.name": "poly",
        "optim.name": "adamw",
        "optim.lr": 1e-3,
        "partial_fc.sample_rate": 0.5,
        "data.random_resized_crop": True,
    }
    full = _losses(_trainer(tiny_data, tmp_path / "full", **extra))
    assert len(full) == 24  # 96 images / batch 8, 2 epochs

    first = _trainer(tiny_data, tmp_path / "cut", **extra)

    def stop_at_5(loss):
        if first.step == 5:
            first.train_step.request_stop(signal.SIGTERM)  # as a preemption would

    first.fit(on_step=stop_at_5)
    # every rank agrees to stop at the all-reduce of the following step
    assert first.step == 6
    resumed = _trainer(tiny_data, tmp_path / "cut", **extra, **{"checkpoint.resume": "auto"})
    rest = _losses(resumed)
    assert len(rest) == 18
    assert rest == pytest.approx(full[6:], rel=1e-6, abs=1e-6)


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, tmp_path / "nan", **{"max_skipped_steps": 3})
    forward = trainer.loss.forward
    calls = {"n": 0}

    def sometimes_nan(emb, labels, **kw):
        calls["n"] += 1
        loss = forward(emb, labels, **kw)
        return loss * float("nan") if calls["n"] == 2 else loss

    trainer.loss.forward = sometimes_nan
    before = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    trainer.train_step(iter(trainer.data.loader))
    after_one = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    assert any(not torch.equal(before[k], after_one[k]) for k in before)
    out = trainer.train_step(iter(trainer.data.loader))  # NaN: skipped, weights unchanged
    assert math.isnan(out)
    assert trainer.train_step.skipped_total == 1
    for k, v in trainer.backbone.state_dict().items():
        assert torch.equal(v, after_one[k])

    trainer.loss.forward = lambda emb, labels, **kw: forward(emb, labels, **kw) * float("inf")
    with pytest.raises(RuntimeError, match="3 consecutive non-finite"):
        for _ in range(5):
            trainer.train_step(iter(trainer.data.loader))


def test_outputs_of_a_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    trainer = _trainer(
        tiny_data,
        run,
        **{
            "max_steps": 4,
            "tensorboard": True,
            "checkpoint.every_steps": 2,
            "eval.targets": f"[{tiny_data / 'val.bin'}]",
            "eval.at_start": True,
        },
    )
    metrics = trainer.fit()
    assert set(metrics) == {"val"} and 0.0 <= metrics["val"]["accuracy"] <= 1.0
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    assert (run / "model.pt").is_file() and json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "metrics_initial.json").read_text())["val"]["accuracy"] >= 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step_00000004.pt" in names and "step_00000004.shard000-of-001.pt" in names
    state = torch.load(run / "checkpoints" / "step_00000004.pt", weights_only=False)
    assert state["config"]["backbone"]["name"] == "_test_tinyconv"
    assert {"backbone", "optimizer", "scaler", "sampler", "rng", "step", "epoch"} <= set(state)
    weights = torch.load(run / "model.pt")
    assert set(weights) == set(trainer.backbone.state_dict())
    log = (run / "train.log").read_text()
    assert "samples/s" in log and "eta" in log


def test_bf16_autocast_trains(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, tmp_path / "bf16", **{"amp": "bf16", "max_steps": 3})
    losses = _losses(trainer)
    assert all(math.isfinite(v) for v in losses)


def test_frozen_stages_do_not_change(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, tmp_path / "frz", **{"backbone.freeze_stages": 1, "max_steps": 2})
    stem = {k: v.clone() for k, v in trainer.backbone.stem.state_dict().items()}
    trainer.fit()
    for k, v in trainer.backbone.stem.state_dict().items():
        assert torch.equal(v, stem[k])


# ------------------------------------------------------------------------------------------
# The real launcher: 2 processes under torchrun, then resumed on 1 process


@pytest.mark.slow
def test_torchrun_two_processes_then_resume_on_one(tiny_data, tmp_path):
    run = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = tiny_overrides(
        tiny_data,
        run,
        **{
            "max_steps": 6,
            "checkpoint.every_steps": 3,
            "data.num_workers": 1,
            "tensorboard": True,
            "eval.targets": f"[{tiny_data / 'val.bin'}]",
            "partial_fc.sample_rate": 0.5,
            "backbone.name": "mobilefacenet",
            "backbone.params": "{input_size: 32, width_mult: 0.5}",
        },
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "launch" / "train.py"),
        "--config",
        str(REPO / "launch/configs/demo.yaml"),
    ]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "checkpoints" / "step_00000006.shard001-of-002.pt").is_file()
    assert (run / "model.pt").is_file()
    # continue on one process from the 2-process checkpoint; the run is finished, so the
    # continuation goes to its own run directory
    one = tmp_path / "one"
    sets1 = [s for s in sets if not s.startswith(("max_steps", "output_dir"))] + [
        f"output_dir={one}",
        "max_steps=8",
        f"checkpoint.resume={run / 'checkpoints' / 'step_00000006.pt'}",
    ]
    cmd1 = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--config",
        str(REPO / "launch/configs/demo.yaml"),
    ]
    for s in sets1:
        cmd1 += ["--set", s]
    proc = subprocess.run(cmd1, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "written by 2 processes" in proc.stdout
    assert (one / "checkpoints" / "step_00000008.shard000-of-001.pt").is_file()

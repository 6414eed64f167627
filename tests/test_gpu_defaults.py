"""GPU-path defaults, checked on CPU through the decisions they are made of.

What "GPUs requested" means and the fast failure without CUDA, the backend flags (TF32,
cudnn.benchmark), the Partial FC optimizer's chunk size per device (chunking never changes the
result), DDP with gradients as bucket views, weight files with CPU tensors, the CUDA RNG state
of the rank's own device (old all-devices checkpoints still load), the device line logged at
start, and the training input in the model's memory format (no DDP stride warning in a real
2-process torchrun run). The CUDA-only lines themselves run in ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_train.checkpointer import own_cuda_rng_state, rng_state, set_rng_state
from dist_train.config import ConfigError, load_config
from dist_train.device_setup import (
    DeviceUnavailableError,
    apply_backend_flags,
    backend_flags,
    describe_device,
    gpu_request,
    resolve_device_type,
)
from dist_train.losses import build_head
from dist_train.model_setup import cpu_state_dict, wrap_ddp
from dist_train.partial_fc import STEP_CHUNK_ROWS, PartialFC, step_chunk_rows

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


# ------------------------------------------------------------------------------------------
# GPUs requested, and the failure without CUDA


@pytest.mark.parametrize(
    "device,env,expected",
    [
        ("cuda", {}, "device: cuda in the config"),
        ("cpu", {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "0"}, None),
        ("auto", {}, None),
        ("auto", {"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1"),
        ("auto", {"CUDA_VISIBLE_DEVICES": ""}, None),
        ("auto", {"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ("auto", {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
        ("auto", {"SLURM_JOB_GPUS": "2"}, "SLURM_JOB_GPUS=2"),
        ("auto", {"SLURM_STEP_GPUS": "0,1"}, "SLURM_STEP_GPUS=0,1"),
        ("auto", {"SLURM_GPUS_ON_NODE": "0"}, None),
        ("auto", {"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
        ("auto", {"SLURM_NTASKS": "2", "LOCAL_RANK": "1"}, None),
    ],
)
def test_gpu_request_names_what_asked_for_gpus(device, env, expected):
    assert gpu_request(device, env) == expected


def test_resolve_device_type_decides_and_fails_fast_when_requested_gpus_are_missing():
    assert resolve_device_type("auto", True, {}) == "cuda"
    assert resolve_device_type("cuda", True, {}) == "cuda"
    assert resolve_device_type("cpu", True, {"CUDA_VISIBLE_DEVICES": "0"}) == "cpu"
    assert resolve_device_type("auto", False, {}) == "cpu"
    with pytest.raises(DeviceUnavailableError, match=r"device: cuda in the config.*device=cpu"):
        resolve_device_type("cuda", False, {})
    with pytest.raises(DeviceUnavailableError, match=r"\(CUDA_VISIBLE_DEVICES=3\)"):
        resolve_device_type("auto", False, {"CUDA_VISIBLE_DEVICES": "3"})
    with pytest.raises(ConfigError, match="device must be one of"):
        resolve_device_type("gpu", True, {})


def test_config_device_and_tf32_fields():
    cfg = load_config(None, [])
    assert cfg.device == "auto" and cfg.tf32 is True
    cfg = load_config(None, ["device=cpu", "tf32=false"])
    assert cfg.device == "cpu" and cfg.tf32 is False
    with pytest.raises(ConfigError, match="device"):
        load_config(None, ["device=gpu"])


@no_cuda
def test_init_distributed_fails_before_any_process_group(monkeypatch):
    from dist_train.distributed import init_distributed

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(DeviceUnavailableError, match="CUDA_VISIBLE_DEVICES=0"):
        init_distributed()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(DeviceUnavailableError, match="device: cuda"):
        init_distributed(device="cuda")
    assert not dist.is_initialized()
    assert init_distributed(device="cpu").device == torch.device("cpu")


@no_cuda
@pytest.mark.slow
def test_launch_train_with_device_cuda_and_no_cuda_exits_at_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch/train.py"), "--config",
         str(ROOT / "launch/configs/demo.yaml"), "--set", "device=cuda",
         "--set", f"output_dir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "GPUs were requested (device: cuda in the config)" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was built or written


# ------------------------------------------------------------------------------------------
# Backend flags


def test_backend_flags_per_device():
    assert backend_flags("cpu", tf32=True, deterministic=False) == {}
    assert backend_flags("cuda", tf32=True, deterministic=False) == {
        "matmul_fp32_precision": "tf32",
        "conv_fp32_precision": "tf32",
        "cudnn_benchmark": True,
        "cudnn_deterministic": False,
    }
    strict = backend_flags("cuda", tf32=False, deterministic=True)
    assert strict["matmul_fp32_precision"] == strict["conv_fp32_precision"] == "ieee"
    assert strict["cudnn_benchmark"] is False and strict["cudnn_deterministic"] is True


def _read_flags() -> dict[str, object]:
    matmul = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    return {
        "matmul_fp32_precision": getattr(matmul, "fp32_precision", None)
        or ("tf32" if matmul.allow_tf32 else "ieee"),
        "conv_fp32_precision": getattr(conv, "fp32_precision", None)
        or ("tf32" if torch.backends.cudnn.allow_tf32 else "ieee"),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }


@pytest.mark.parametrize("tf32,deterministic", [(True, False), (False, True)])
def test_apply_backend_flags_sets_the_process_flags(tf32, deterministic):
    before = _read_flags()
    try:
        flags = backend_flags("cuda", tf32=tf32, deterministic=deterministic)
        apply_backend_flags(flags)
        assert _read_flags() == flags
    finally:
        apply_backend_flags(before)
    assert _read_flags() == before


# ------------------------------------------------------------------------------------------
# Partial FC optimizer chunks


def test_step_chunk_rows_per_device():
    assert step_chunk_rows(torch.device("cpu"), 512) == 128  # 256 KiB: cache-sized
    assert step_chunk_rows(torch.device("cpu"), 512, 8) == 64
    assert step_chunk_rows(torch.device("cpu"), 65536) == 16  # a floor
    assert step_chunk_rows(torch.device("cuda", 0), 512, 4) == 131072
    assert step_chunk_rows(torch.device("cuda", 0), 512, 8) == 65536
    assert step_chunk_rows(torch.device("cuda", 0), 65536, 4) == STEP_CHUNK_ROWS  # a floor


def _train_pfc(chunk_rows, *, c, rate, update, dtype, opt, accum):
    head = build_head("arcface", {}, c)
    pfc = PartialFC(
        head, 8, c, sample_rate=rate, update=update, weight_dtype=dtype, stochastic_rounding=False
    )
    optimizer = pfc.configure_optimizer(**opt)
    assert optimizer.chunk_rows == step_chunk_rows(torch.device("cpu"), 8)  # the CPU default
    if chunk_rows is not None:
        optimizer.chunk_rows = chunk_rows
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for _ in range(accum):
            x = torch.randn(6, 8, generator=gen)
            y = torch.randint(0, c, (6,), generator=gen)
            pfc(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return pfc.weight.clone(), {k: v.clone() for k, v in optimizer.rows.items()}


@pytest.mark.parametrize(
    "update,rate,accum", [("sparse", 0.3, 1), ("sparse", 0.3, 2), ("sparse", 1.0, 1),
                          ("dense", 0.3, 1), ("dense", 1.0, 1)]
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "opt",
    [
        dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
        dict(name="adamw", lr=0.01, weight_decay=0.05),
    ],
)
def test_chunk_size_never_changes_the_update(update, rate, accum, dtype, opt):
    # 37 rows: chunks of 4 and 5 leave ragged last chunks, 37 is the whole shard at once
    ref_w, ref_rows = _train_pfc(37, c=37, rate=rate, update=update, dtype=dtype, opt=opt,
                                 accum=accum)  # fmt: skip
    for chunk in (4, 5, None):
        w, rows = _train_pfc(chunk, c=37, rate=rate, update=update, dtype=dtype, opt=opt,
                             accum=accum)  # fmt: skip
        assert torch.equal(w, ref_w), chunk
        for key in ref_rows:
            assert torch.equal(rows[key], ref_rows[key]), (chunk, key)


# ------------------------------------------------------------------------------------------
# DDP, weight files, RNG state, the device line


def _one_process_group(tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=0, world_size=1)


def test_wrap_ddp_keeps_gradients_as_bucket_views_and_logs_the_backend():
    with tempfile.TemporaryDirectory() as tmp:
        _one_process_group(tmp)
        try:
            model = wrap_ddp(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), torch.device("cpu"))
            assert model.gradient_as_bucket_view is True
            model(torch.randn(5, 4)).sum().backward()
            assert all(p.grad is not None for p in model.parameters())
            assert "backend gloo" in describe_device(torch.device("cpu"), 1)
        finally:
            dist.destroy_process_group()


def test_describe_device_on_cpu():
    line = describe_device(torch.device("cpu"), 2)
    assert line.startswith("device cpu, backend none, world size 2, torch ")
    assert ("CUDA none" in line) != torch.cuda.is_available()


def test_cpu_state_dict_is_detached_cpu_tensors_of_the_same_values():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    sd = cpu_state_dict(model)
    assert sd.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert sd[key].device.type == "cpu" and not sd[key].requires_grad
        assert torch.equal(sd[key], value)


def test_cuda_rng_state_of_the_own_device_and_old_all_device_lists():
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    assert own_cuda_rng_state(None, 3) is None
    assert own_cuda_rng_state(states[1], 3) is states[1]
    # older checkpoints: every visible device's state; the rank's own is its torchrun device
    assert own_cuda_rng_state(states, 2) is states[2]
    assert own_cuda_rng_state(states[:1], 5) is states[0]  # srun, one GPU per task
    assert own_cuda_rng_state([], 0) is None


def test_set_rng_state_loads_an_old_checkpoint_entry_with_every_devices_state():
    state = rng_state()
    if not torch.cuda.is_available():
        assert state["cuda"] is None
    old = dict(state, cuda=[torch.zeros(16, dtype=torch.uint8)] * 8)  # as before: all devices
    x = torch.rand(3)
    set_rng_state(old, local_rank=5)
    assert torch.equal(torch.rand(3), x)


# ------------------------------------------------------------------------------------------
# Memory format: a real 2-process run without DDP's stride warning


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_two_process_run_has_no_grad_stride_warning(tiny_data, tmp_path, channels_last):
    from dist_train.distributed import free_port

    sets = {
        "output_dir": tmp_path / "run",
        "max_steps": 3,
        "data.root": tiny_data,
        "data.image_size": 32,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "backbone.params": "{width_mult: 0.25, input_size: 32}",
        "backbone.channels_last": str(channels_last).lower(),
        "eval.targets": "[]",
        "eval.at_start": "false",
        "eval.every_epoch": "false",
        "tensorboard": "false",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "launch/train.py"),
           "--config", str(ROOT / "launch/configs/demo.yaml")]  # fmt: skip
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Grad strides do not match" not in out
    assert "device cpu, backend gloo, world size 2" in out
    weights = torch.load(tmp_path / "run" / "model.pt")
    assert {v.device.type for v in weights.values()} == {"cpu"}

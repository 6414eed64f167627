"""A failing rank ends the job promptly with one clean message (:mod:`dist_train.failures`).

Unit tests of the report (which errors are one line, exit 2; which keep their traceback, exit 1;
errors wrapped by a DataLoader worker; the store claim that prints a message once), and real
``torchrun`` jobs of 2 gloo processes: a corrupt record read by one rank ends the whole job
within seconds with one line naming the record's file, key and offset, and a config error
prints one line, no traceback.

What torchrun itself prints is pinned here too: after a worker fails it sends SIGTERM to the
others, then prints its own ``ChildFailedError`` report (a traceback of torchrun's frames and a
table with each rank's exit code) and exits with status 1.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core.errors import ConfigError
from dist_train import failures
from dist_train.config import load_config
from dist_train.data.errors import DataConfigError, DataError
from dist_train.data.recordio import RecordIOError, read_index
from eval.targets import TargetError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "launch" / "configs" / "demo.yaml"


@pytest.fixture
def plain_logging():
    """No dist_train console handler on the root logger (another test may have left one), so
    reports go to stderr where capsys sees them."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_dist_train", False)]
    for h in ours:
        root.removeHandler(h)
    yield
    for h in ours:
        root.addHandler(h)


# ------------------------------------------------------------------------------------------
# the report


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (ConfigError("optim.lr must be > 0, got 0"), "config error: optim.lr must be > 0, got 0"),
        (DataConfigError("data.num_classes=5 but x has 7"), "config error: data.num_classes=5"),
        (DataError("a/train.rec key 3 at byte offset 9: bad"), "a/train.rec key 3 at byte"),
        (RecordIOError("a/train.rec", "bad magic", key=4, offset=88), "a/train.rec key 4 at"),
        (TargetError("val.bin: not a pickle"), "val.bin: not a pickle"),
        (FileNotFoundError(2, "No such file or directory", "x.bin"), "x.bin: No such file or"),
    ],
)
def test_user_errors_are_one_line(exc, line):
    message = failures.user_error_message(exc)
    assert message is not None and message.startswith(line) and "\n" not in message


def test_other_errors_are_not_user_errors():
    for exc in (RuntimeError("CUDA out of memory"), ValueError("x"), KeyError("k")):
        assert failures.user_error_message(exc) is None


class _Damaged(torch.utils.data.Dataset):
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        RecordIOError("/d/train.rec", "bad magic 0x0", key=7, offset=1234),  # -> RuntimeError
        DataError("/d/train.rec key 7 at byte offset 1234: 3-byte payload is not an image"),
    ],
    ids=["RecordIOError", "DataError"],
)
def test_an_error_raised_in_a_dataloader_worker_is_unwrapped(exc):
    batches = iter(torch.utils.data.DataLoader(_Damaged(exc), num_workers=1))
    try:
        with pytest.raises(Exception) as info:
            next(batches)
    finally:
        batches._shutdown_workers()  # now, not at a later garbage collection
    assert "Original Traceback" in str(info.value)  # torch's wrapping, read back below
    assert failures.user_error_message(info.value) == str(exc)


def test_run_guarded_exit_codes_and_reports(capsys, plain_logging):
    def config_error():
        raise ConfigError("data.batch_size must be >= 1, got 0")

    def bug():
        raise RuntimeError("something unexpected")

    assert failures.run_guarded(lambda: None) == 0
    assert capsys.readouterr().err == ""

    assert failures.run_guarded(config_error) == 2
    err = capsys.readouterr().err
    assert err == "rank 0: config error: data.batch_size must be >= 1, got 0\n"

    assert failures.run_guarded(bug) == 1
    err = capsys.readouterr().err
    assert err.startswith("rank 0: failed: RuntimeError: something unexpected\n")
    assert "Traceback (most recent call last)" in err and "in bug" in err


def test_a_claim_in_the_store_is_won_once_per_run():
    from dist_train.distributed import free_port

    store = torch.distributed.TCPStore(
        "127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=5)
    )
    started = time.time()
    assert failures._claim(store, "k", started)
    assert not failures._claim(store, "k", started)  # a second rank with the same message
    # a claim left by an earlier round of a restarted job (which shared the store) is stale
    assert failures._claim(store, "k", time.time() + 10)
    assert failures._claim(None, "k", started)  # without a store every rank reports


def test_a_rank_stays_quiet_when_the_error_was_reported_by_another_rank(capsys, plain_logging):
    """A 1-rank gloo group whose store already holds another rank's marks: an error that
    follows from that rank's failure, and a message it already printed, print nothing; the
    group is torn down (abort) in both cases."""
    import torch.distributed as dist

    from dist_train.distributed import free_port

    def bug():
        raise RuntimeError("Connection closed by peer")

    def same_config_error():
        raise DataConfigError("data.num_classes=5 but the data holds 12 identities")

    store = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=10))
    for work, code, key in (
        (bug, 1, failures._FAILED_KEY),
        (
            same_config_error,
            2,
            failures._message_key(
                "config error: data.num_classes=5 but the data holds 12 identities"
            ),
        ),
    ):
        dist.init_process_group("gloo", store=dist.PrefixStore("g", store), rank=0, world_size=1)
        # the other rank's claim, made while this run goes on (after run_guarded's start)
        dist.distributed_c10d._get_default_store().set(key, f"{time.time() + 60:.6f}")
        assert failures.run_guarded(work) == code
        assert not dist.is_initialized()
        assert capsys.readouterr().err == ""
        # the same error without the other rank's mark is reported
        dist.init_process_group("gloo", store=dist.PrefixStore("h", store), rank=0, world_size=1)
        assert failures.run_guarded(work) == code
        assert capsys.readouterr().err.startswith("rank 0: ")
        store = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=10))


def test_the_collective_timeout_is_a_validated_config_value(monkeypatch):
    assert load_config(None).dist_timeout_s == 600
    with pytest.raises(ConfigError, match="dist_timeout_s must be > 0, got 0"):
        load_config(None, ["dist_timeout_s=0"])

    import launch.train as train

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise ConfigError("stop here")

    monkeypatch.setattr(train, "init_distributed", fake_init)
    assert train.main(["--config", str(DEMO), "--set", "dist_timeout_s=42"]) == 2
    assert seen["timeout_s"] == 42.0 and seen["device"] == "auto"


# ------------------------------------------------------------------------------------------
# real torchrun jobs

_SETS = {
    "data.batch_size": 8,
    "data.num_workers": 1,  # the error comes through a DataLoader worker, as on a cluster
    "data.image_size": 32,
    "data.sampler": "shuffle",
    "seed": 0,
    "backbone.name": "mobilefacenet",
    "backbone.params": "{input_size: 32, width_mult: 0.5}",
    "backbone.embedding_size": 16,
    "head.params": "{s: 16.0, m: 0.2}",
    "eval.targets": "[]",
    "num_epochs": 1,
    "log_every_steps": 1,
    "tensorboard": False,
    "checkpoint.at_epoch_end": False,
}


def _pack_with_a_corrupt_record(out: Path, *, bad_index: int) -> tuple[int, int]:
    """12 identities x 8 JPEGs of 32x32 in the InsightFace layout; image ``bad_index`` holds
    bytes that are no image. Returns the damaged record's (key, byte offset)."""
    from dist_train.data.packing import InsightFacePackWriter

    rng = np.random.default_rng(0)
    writer = InsightFacePackWriter(out, 96, 12)
    for i in range(96):
        jpeg = cv2.imencode(".jpg", rng.integers(0, 255, (32, 32, 3), np.uint8))[1].tobytes()
        writer.add(i // 8, b"\xff\xd8garbage" * 8 if i == bad_index else jpeg)
    writer.close(32, 32)
    key = bad_index + 1  # record 0 is the header; images follow in order
    return key, read_index(out / "train.idx")[1][key]


def _first_sample_of(rank: int, world_size: int) -> int:
    """The dataset index ``rank`` reads first in epoch 0 with the settings of ``_SETS``."""
    from dist_train.data.samplers import build_sampler

    sampler = build_sampler("shuffle", np.repeat(np.arange(12), 8), 8, rank, world_size, 0)
    sampler.set_epoch(0)
    return next(iter(sampler))


def _torchrun(data: Path, run: Path, log_file: Path, **extra) -> subprocess.Popen:
    sets = {**_SETS, "output_dir": run, "data.root": data, **extra}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--monitor-interval=0.1",
        str(REPO / "launch" / "train.py"),
        "--config",
        str(DEMO),
    ]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = open(log_file, "w")  # a file, not a pipe: nobody reads while the job runs
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def _wait(proc: subprocess.Popen, log_file: Path, timeout: float = 60) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"job still running after {timeout} s:\n" + log_file.read_text()[-4000:])
    return log_file.read_text()


def _assert_no_worker_traceback(text: str) -> None:
    """The only traceback is torchrun's own report (ChildFailedError), none from a rank."""
    assert text.count("Traceback (most recent call last)") == 1, text[-4000:]
    assert "errors.ChildFailedError" in text
    assert not re.search(r'File "[^"]*(dist_train|launch/train\.py)', text), text[-4000:]


@pytest.mark.slow
def test_a_corrupt_record_on_one_rank_ends_the_job_with_one_message(tmp_path):
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "torchrun.out"
    key, offset = _pack_with_a_corrupt_record(data, bad_index=_first_sample_of(1, 2))
    start = time.monotonic()
    proc = _torchrun(data, run, out)
    where = f"{data / 'train.rec'} key {key} at byte offset {offset}"
    seen = None
    while proc.poll() is None and time.monotonic() - start < 60:
        if seen is None and where in out.read_text():
            seen = time.monotonic()
        time.sleep(0.05)
    text = _wait(proc, out, timeout=max(1.0, 60 - (time.monotonic() - start)))
    assert seen is not None or where in text, text[-4000:]
    ended_after_error = time.monotonic() - (seen or time.monotonic())

    assert proc.returncode != 0
    lines = [line for line in text.splitlines() if where in line]
    assert len(lines) == 1, text[-4000:]
    assert re.fullmatch(
        rf"\S+ \[rank1\] ERROR {re.escape(where)}: \d+-byte payload is not a decodable image",
        lines[0],
    )
    _assert_no_worker_traceback(text)
    # torchrun's table: rank 1 exited with status 2 and is the root cause
    root_cause = text.split("Root Cause (first observed failure)")[-1]
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: 2 ", root_cause), text[-2000:]
    # the other rank was stopped within seconds, not at the collective timeout
    assert ended_after_error < 15, ended_after_error


@pytest.mark.slow
def test_a_config_error_under_torchrun_is_one_line(tmp_path):
    out = tmp_path / "torchrun.out"
    proc = _torchrun(tmp_path / "data", tmp_path / "run", out, **{"data.batch_size": 0})
    text = _wait(proc, out)
    assert proc.returncode == 1  # torchrun's status when a worker failed
    lines = [line for line in text.splitlines() if "data.batch_size" in line]
    assert lines == ["rank 0: config error: data.batch_size must be >= 1, got 0"], text[-4000:]
    _assert_no_worker_traceback(text)
    assert re.search(r"exitcode\s+: 2 ", text), text[-2000:]


@pytest.mark.slow
def test_a_single_process_user_error_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    res = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(DEMO)]
        + ["--set", f"data.root={missing}", "--set", f"output_dir={tmp_path / 'run'}"]
        + ["--set", "eval.targets=[]", "--set", "eval.at_start=false"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    text = res.stdout + res.stderr
    lines = [line for line in text.splitlines() if str(missing) in line]
    assert len(lines) == 1 and "does not exist" in lines[0], text
    assert "Traceback" not in text

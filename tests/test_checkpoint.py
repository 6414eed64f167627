import os

import pytest
import torch

from dist_train import checkpoint as ckpt


def test_atomic_save_rotate_and_find(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.atomic_save({"step": step}, ckpt.checkpoint_path(tmp_path, step))
    ckpt.rotate(tmp_path, keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000030.pt", "step_00000040.pt"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    path, state = ckpt.find_resume(tmp_path, "auto")
    assert state["step"] == 40 and path.name == "step_00000040.pt"


def test_auto_resume_skips_corrupt_newest(tmp_path, caplog):
    ckpt.atomic_save({"step": 5}, ckpt.checkpoint_path(tmp_path, 5))
    bad = ckpt.checkpoint_path(tmp_path, 9)
    bad.write_bytes(b"this is not a checkpoint")
    path, state = ckpt.find_resume(tmp_path, "auto")
    assert state["step"] == 5
    assert "step_00000009.pt" in caplog.text


def test_explicit_resume_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ckpt.find_resume(tmp_path, str(tmp_path / "nope.pt"))
    not_train = tmp_path / "w.pt"
    torch.save({"weight": torch.zeros(1)}, not_train)
    with pytest.raises(RuntimeError, match="w.pt"):
        ckpt.find_resume(tmp_path, str(not_train))
    assert ckpt.find_resume(tmp_path, "") is None
    assert ckpt.find_resume(tmp_path, "auto") is None


def test_failed_save_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.atomic_save({"step": 1}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        ckpt.atomic_save({"step": 2}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]

"""Checkpoint files (atomic writes, rotation, finding the newest) and the start of a run in its
directory (continue the same run, start fresh, move an old run aside, or stop)."""

import os

import pytest
import torch

from dist_train import checkpoint as ckpt
from dist_train.checkpointer import claim_run_dir, config_changes, decide_run_start, is_restart
from dist_train.config import ConfigError, TrainConfig, save_config
from dist_train.distributed import DistInfo


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


# --- pruning keeps what was just written --------------------------------------------------------
def _steps(run):
    return [ckpt.step_of(p) for p in ckpt.list_checkpoints(run)]


def test_rotate_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.atomic_save({"step": step}, ckpt.checkpoint_path(tmp_path, step))
        ckpt.atomic_save({}, ckpt.shard_path(ckpt.checkpoint_path(tmp_path, step), 0, 1))
    # a run resumed from step 10 writes step 15: it is older than the others, and it stays
    written = ckpt.checkpoint_path(tmp_path, 15)
    ckpt.atomic_save({"step": 15}, written)
    ckpt.rotate(tmp_path, keep_last=2, written=written)
    assert _steps(tmp_path) == [10, 15]  # the abandoned later steps are gone
    shards = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.shard*"))
    assert shards == ["step_00000010.shard000-of-001.pt"]
    ckpt.rotate(tmp_path, keep_last=1, written=written)
    assert _steps(tmp_path) == [15]
    ckpt.rotate(tmp_path, keep_last=5, written=written)
    assert _steps(tmp_path) == [15]


# --- the start of a run in its directory --------------------------------------------------------
def _cfg(run, **checkpoint):
    cfg = TrainConfig(output_dir=str(run))
    for k, v in checkpoint.items():
        setattr(cfg.checkpoint, k, v)
    return cfg


def _old_run(run, finished=False, **changes):
    """A run directory as a run leaves it: config.yaml, log, a checkpoint (and model.pt)."""
    cfg = _cfg(run)
    for k, v in changes.items():
        setattr(cfg, k, v)
    save_config(cfg, run / "config.yaml")
    (run / "train.log").write_text("old log\n")
    ckpt.atomic_save({"step": 4}, ckpt.checkpoint_path(run, 4))
    if finished:
        (run / "model.pt").write_bytes(b"old weights")
        (run / "metrics.json").write_text("{}")


def test_a_free_directory_starts_fresh_in_every_mode(tmp_path):
    for mode in ("auto", "", "never", str(tmp_path / "x.pt")):
        assert decide_run_start(_cfg(tmp_path / "new", resume=mode)).resume == mode
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run's file")
    assert decide_run_start(_cfg(tmp_path / "other", resume="")).resume == ""
    assert not (tmp_path / "new").exists()  # deciding writes nothing


def test_the_same_run_continues_with_auto_and_restart_keys_may_change(tmp_path):
    _old_run(tmp_path)
    assert decide_run_start(_cfg(tmp_path)).resume == "auto"
    cfg = _cfg(tmp_path, every_steps=7)
    cfg.max_steps = 99
    cfg.grad_accum_steps = 2  # e.g. half the GPUs, the same global batch
    start = decide_run_start(cfg)
    assert start.resume == "auto"
    assert "max_steps: 0 -> 99" in start.note and "checkpoint.every_steps: 0 -> 7" in start.note
    cfg.partial_fc.state_dtype = "bfloat16"  # a checkpoint loads into any storage dtype
    cfg.partial_fc.weight_dtype = "float16"
    start = decide_run_start(cfg)
    assert (
        start.resume == "auto" and "partial_fc.state_dtype: 'float32' -> 'bfloat16'" in start.note
    )


def test_another_run_stops_naming_the_directory_and_the_ways_out(tmp_path):
    _old_run(tmp_path, seed=1)
    for mode in ("auto", "", str(ckpt.checkpoint_path(tmp_path, 4))):
        with pytest.raises(ConfigError) as err:
            decide_run_start(_cfg(tmp_path, resume=mode))
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path} holds another run (config differs at seed: 1 -> 0)")
        assert "new output_dir" in msg and "checkpoint.resume=never" in msg
        assert "\n" not in msg
    assert (tmp_path / "train.log").read_text() == "old log\n"


def test_a_finished_run_is_never_continued(tmp_path):
    _old_run(tmp_path, finished=True)
    with pytest.raises(ConfigError, match=r"holds a finished run \(model\.pt\); .*resume=never"):
        decide_run_start(_cfg(tmp_path))
    with pytest.raises(ConfigError, match="finished run"):
        decide_run_start(_cfg(tmp_path), restarted=True)


def test_files_without_a_config_are_another_run(tmp_path):
    ckpt.atomic_save({"step": 4}, ckpt.checkpoint_path(tmp_path, 4))
    with pytest.raises(ConfigError, match="without its config.yaml"):
        decide_run_start(_cfg(tmp_path))
    (tmp_path / "config.yaml").write_text("no_such_key: 1\n")
    with pytest.raises(ConfigError, match="config does not load here"):
        decide_run_start(_cfg(tmp_path))


def test_empty_resume_needs_a_directory_without_a_run(tmp_path):
    _old_run(tmp_path)
    with pytest.raises(ConfigError, match="checkpoint.resume=auto continues the run"):
        decide_run_start(_cfg(tmp_path, resume=""))


def test_never_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    _old_run(tmp_path, finished=True, seed=3)
    (tmp_path / "notes.txt").write_text("mine")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    start = decide_run_start(_cfg(tmp_path, resume="never"))
    assert start.resume == "never"
    (moved,) = tmp_path.glob("previous-*")
    assert str(moved) in start.note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", moved.name]
    for rel, data in before.items():
        where = tmp_path / rel if rel.name == "notes.txt" else moved / rel
        assert where.read_bytes() == data
    assert ckpt.find_resume(tmp_path, "auto") is None
    # a second never: the new run moves into its own folder, the first stays
    _old_run(tmp_path)
    decide_run_start(_cfg(tmp_path, resume="never"))
    assert len(list(tmp_path.glob("previous-*"))) == 2 and (moved / "model.pt").is_file()


def test_never_on_a_restart_continues_the_run_it_started(tmp_path):
    _old_run(tmp_path)
    start = decide_run_start(_cfg(tmp_path, resume="never"), restarted=True)
    assert start.resume == "auto" and not list(tmp_path.glob("previous-*"))
    # ...but a restart never continues another run: that one is still moved aside
    _old_run(tmp_path, seed=5)
    assert decide_run_start(_cfg(tmp_path, resume="never"), restarted=True).resume == "never"
    assert len(list(tmp_path.glob("previous-*"))) == 1


def test_restart_detection_and_config_changes():
    assert not is_restart({})
    assert not is_restart({"TORCHELASTIC_RESTART_COUNT": "0", "SLURM_RESTART_COUNT": ""})
    assert is_restart({"TORCHELASTIC_RESTART_COUNT": "1"})
    assert is_restart({"SLURM_RESTART_COUNT": "2"})
    old = {"a": 1, "s": {"b": 2, "c": [1]}}
    assert config_changes(old, {"a": 1, "s": {"b": 3, "c": [1], "d": 0}}) == [
        ("s.b", 2, 3),
        ("s.d", None, 0),
    ]


def test_claim_run_dir_raises_a_config_error_at_world_size_one(tmp_path):
    _old_run(tmp_path, finished=True)
    with pytest.raises(ConfigError, match="finished run"):
        claim_run_dir(_cfg(tmp_path), DistInfo())
    assert claim_run_dir(_cfg(tmp_path / "free"), DistInfo()).resume == "auto"

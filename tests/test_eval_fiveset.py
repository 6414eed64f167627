"""The five-set verification report (issue 14, point 4): one table over LFW / CFP-FP /
AgeDB-30 / CALFW / CPLFW (+ CFP-FF, VGG2-FP) with the papers' mean row, in the command line,
``report.json``, TensorBoard and training's evaluation."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from eval import report
from eval.cli import main
from eval.targets import STANDARD_SETS, TargetError, known_bins, load_bin, save_bin
from tests.conftest import tiny_overrides
from tests.eval_helpers import TINY, TinyNet, tiny_backbone, write_targets  # noqa: F401


def _checkpoint(tmp_path) -> str:
    path = tmp_path / "step_00000001.pt"
    config = {"backbone": {"name": TINY, "embedding_size": 16}}
    torch.save({"backbone": TinyNet(16).state_dict(), "config": config, "step": 1}, path)
    return str(path)


def _bin_dir(directory, names) -> str:
    """A directory of small ``<name>.bin`` sets, each from its own seed (so their metrics
    differ), plus ``other.bin`` that no known-set search picks."""
    os.makedirs(directory, exist_ok=True)
    for seed, name in enumerate([*names, "other"]):
        bin_path, *_ = write_targets(os.path.join(directory, f"src_{name}"), seed=seed)
        shutil.move(bin_path, os.path.join(directory, f"{name}.bin"))
        shutil.rmtree(os.path.join(directory, f"src_{name}"))
    return str(directory)


@pytest.mark.usefixtures("tiny_backbone")
def test_bin_dir_table_has_one_row_per_set_and_the_mean_of_the_standard_ones(tmp_path, capsys):
    # four of the standard five (cplfw missing) and cfp_ff, which the mean must leave out
    sets = ["calfw", "lfw", "cfp_ff", "agedb_30", "cfp_fp"]
    directory = _bin_dir(tmp_path / "bins", sets)
    out = tmp_path / "out"
    results = main(
        ["--weights", _checkpoint(tmp_path), "--bin-dir", directory, "--out", str(out),
         "--no-plots", "--folds", "4"]
    )  # fmt: skip
    assert list(results) == ["lfw", "cfp_fp", "agedb_30", "calfw", "cfp_ff"]  # papers' order
    table = capsys.readouterr().out
    lines = table.splitlines()
    names = [ln.split()[0] for ln in lines[2:7]]
    assert names == ["lfw", "cfp_fp", "agedb_30", "calfw", "cfp_ff"]
    assert set(lines[7]) <= {"-", " "}  # a rule before the mean row
    assert lines[8].startswith("mean (4 of 5)")
    averaged = ["lfw", "cfp_fp", "agedb_30", "calfw"]
    want = float(np.mean([results[n].metrics["accuracy"] for n in averaged]))
    assert f"{want:.4f}" in lines[8] and "±" not in lines[8]
    with_ff = float(np.mean([results[n].metrics["accuracy"] for n in [*averaged, "cfp_ff"]]))
    assert abs(with_ff - want) > 1e-6  # the seeds make cfp_ff's accuracy matter
    assert "mean (4 of 5): average over lfw, cfp_fp, agedb_30, calfw; not evaluated: cplfw" in (
        table
    )
    auc = float(np.mean([results[n].metrics["auc"] for n in averaged]))
    assert f"{auc:.4f}" in lines[8]
    doc = json.loads((out / "report.json").read_text())
    assert doc["mean"]["sets"] == averaged and doc["mean"]["missing"] == ["cplfw"]
    assert doc["mean"]["metrics"]["accuracy"] == pytest.approx(want, abs=1e-12)
    assert doc["mean"]["metrics"]["num_sets"] == 4
    assert set(doc["targets"]) == {*averaged, "cfp_ff"}


@pytest.mark.usefixtures("tiny_backbone")
def test_all_five_and_extra_targets(tmp_path, capsys):
    directory = _bin_dir(tmp_path / "bins", list(STANDARD_SETS))
    extra, *_ = write_targets(str(tmp_path / "extra"), seed=9)
    results = main(
        ["--weights", _checkpoint(tmp_path), "--bin-dir", directory, "--targets", extra,
         "--json", str(tmp_path / "r.json"), "--folds", "4"]
    )  # fmt: skip
    assert list(results) == [*STANDARD_SETS, "val"]
    table = capsys.readouterr().out
    mean_row = next(ln for ln in table.splitlines() if ln.startswith("mean"))
    assert mean_row.startswith("mean ") and "of 5" not in mean_row
    assert "mean: average over lfw, cfp_fp, agedb_30, calfw, cplfw (the standard five)" in table
    doc = json.loads((tmp_path / "r.json").read_text())
    want = np.mean([results[n].metrics["accuracy"] for n in STANDARD_SETS])
    assert doc["mean"]["missing"] == [] and doc["mean"]["metrics"]["accuracy"] == pytest.approx(
        want
    )


def test_standard_mean_rules():
    m = {"accuracy": 0.9, "accuracy_std": 0.01, "auc": 0.95, "tar@far=1e-4": float("nan")}
    assert report.standard_mean({"lfw": m, "val": m}) is None  # one standard set: no mean
    assert report.standard_mean({"val": m}) is None
    two = report.standard_mean({"lfw": m, "cplfw": {**m, "accuracy": 0.7, "auc": 0.85}})
    assert two["sets"] == ["lfw", "cplfw"] and two["label"] == "mean (2 of 5)"
    assert two["missing"] == ["cfp_fp", "agedb_30", "calfw"]
    assert two["metrics"]["accuracy"] == pytest.approx(0.8)
    assert two["metrics"]["auc"] == pytest.approx(0.9)
    assert np.isnan(two["metrics"]["tar@far=1e-4"])  # NaN on a set: NaN (n/a) in the mean
    assert "eer" not in two["metrics"]  # not measured on the sets: not averaged
    table = report.format_table({"lfw": m, "val": m})
    assert "mean" not in table


def test_mean_goes_to_tensorboard(tmp_path):
    from eval.runner import evaluate_targets_full

    directory = _bin_dir(tmp_path / "bins", ["lfw", "agedb_30"])
    full = evaluate_targets_full(TinyNet(16), known_bins(directory), n_folds=4)

    class Recorder:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

    rec = Recorder()
    report.log_tensorboard(rec, full, step=3, images=False)
    want = (full["lfw"].metrics["accuracy"] + full["agedb_30"].metrics["accuracy"]) / 2
    assert rec.scalars["eval/mean/accuracy"] == (pytest.approx(want), 3)


def test_bin_dir_errors_name_the_directory(tmp_path):
    with pytest.raises(TargetError, match="nowhere: verification set directory does not exist"):
        known_bins(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "lfw.txt").write_text("x")
    with pytest.raises(TargetError, match=r"empty: holds none of lfw\.bin, cfp_fp\.bin"):
        known_bins(str(tmp_path / "empty"))


def test_training_evaluation_logs_and_keeps_the_mean(tiny_data, tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_train.config import load_config
    from dist_train.distributed import DistInfo
    from dist_train.trainer import Trainer

    # three of the five: the validation pairs, and two subsets of them (different metrics)
    bins, issame = load_bin(str(tiny_data / "val.bin"))
    sets = tmp_path / "sets"
    sets.mkdir()
    paths = []
    for name, keep in [("lfw", slice(None)), ("calfw", slice(0, 30)), ("cplfw", slice(6, 40))]:
        idx = np.arange(len(issame))[keep]
        path = sets / f"{name}.bin"
        save_bin(str(path), [bins[j] for i in idx for j in (2 * i, 2 * i + 1)], issame[idx])
        paths.append(str(path))
    run = tmp_path / "run"
    extra = {
        "max_steps": 2,
        "tensorboard": True,
        "eval.targets": f"[{','.join(paths)}]",
        "eval.best_metric": "mean/accuracy",
    }
    trainer = Trainer(load_config(None, tiny_overrides(tiny_data, run, **extra)), DistInfo())
    with caplog.at_level(logging.INFO, logger="dist_train.train_eval"):
        metrics = trainer.fit()
    want = np.mean([metrics[n]["accuracy"] for n in ("lfw", "calfw", "cplfw")])
    assert metrics["mean"]["accuracy"] == pytest.approx(want)
    assert json.loads((run / "metrics.json").read_text())["mean"]["num_sets"] == 3
    assert json.loads((run / "best_model.json").read_text())["best_metric"] == "mean/accuracy"
    line = next(r.getMessage() for r in caplog.records if "mean (3 of 5)" in r.getMessage())
    assert "average over lfw, calfw, cplfw; not evaluated: cfp_fp, agedb_30" in line
    assert f"accuracy {want:.4f}" in line
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("eval/mean/accuracy")[-1].value == pytest.approx(want, abs=1e-6)

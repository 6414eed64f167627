"""End-to-end tests of the evaluation CLI, the report and the plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from eval import plots, report
from eval.cli import main
from eval.runner import evaluate_targets_full
from tests.eval_helpers import TINY, TinyNet, tiny_backbone, write_targets  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkpoint(tmp_path) -> str:
    net = TinyNet(16)
    path = tmp_path / "step_00000005.pt"
    torch.save(
        {
            "backbone": net.state_dict(),
            "config": {"backbone": {"name": TINY, "embedding_size": 16}},
            "step": 5,
        },
        path,
    )
    return str(path)


@pytest.mark.usefixtures("tiny_backbone")
def test_cli_on_checkpoint_writes_table_json_plots_and_scores(tmp_path, capsys):
    bin_path, csv_path, test_path, issame = write_targets(str(tmp_path / "data"))
    out = tmp_path / "out"
    results = main(
        [
            "--weights", _checkpoint(tmp_path),
            "--targets", f"{bin_path},{csv_path}",
            "--test-list", test_path,
            "--out", str(out),
            "--batch-size", "5",
            "--folds", "6",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "val_pairs" in printed and "accuracy" in printed and "± " in printed
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["targets"]) == {"val", "val_pairs", "test"}
    val = doc["targets"]["val"]
    assert val["metrics"]["accuracy"] == results["val"].metrics["accuracy"]
    assert len(val["folds"]["thresholds"]) == 6 and doc["meta"]["folds"] == 6
    assert val["tar_at_far"][2]["tar"] is None  # NaN -> null: 12 impostors < 1/1e-3
    assert val["tar_at_far"][0]["num_impostors"] == int((~issame).sum())
    for kind in ("roc", "pr", "scores", "angles"):
        img = cv2.imread(str(out / f"val_{kind}.png"))
        assert img is not None and img.shape == (480, 640, 3)
    lines = (out / "test_scores.csv").read_text().splitlines()
    assert lines[0] == "score,path1,path2" and len(lines) == len(issame) + 1
    assert float(lines[1].split(",")[0]) == pytest.approx(results["val"].scores[0], abs=1e-6)


@pytest.mark.usefixtures("tiny_backbone")
def test_cli_argument_errors(tmp_path):
    bin_path, _, test_path, _ = write_targets(str(tmp_path), num_ids=3)
    ckpt = _checkpoint(tmp_path)
    with pytest.raises(SystemExit, match="--targets"):
        main(["--weights", ckpt])
    with pytest.raises(SystemExit, match="--out"):
        main(["--weights", ckpt, "--test-list", test_path])
    with pytest.raises(ValueError, match="val.bin.*unlabelled"):
        main(["--weights", ckpt, "--test-list", bin_path, "--out", str(tmp_path / "o")])


def _onnx_model(tmp_path) -> str:
    path = str(tmp_path / "tiny.onnx")
    torch.onnx.export(
        TinyNet(16),
        (torch.randn(2, 3, 32, 32),),
        path,
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
        dynamo=False,
    )
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy ONNX exporter
def test_launch_eval_script_with_onnx_model(tmp_path):
    bin_path, csv_path, _, _ = write_targets(str(tmp_path / "data"))
    model = _onnx_model(tmp_path)
    json_path = tmp_path / "r.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "eval.py"), "--weights", model,
         "--targets", f"{bin_path},{csv_path}", "--json", str(json_path), "--no-flip"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(json_path.read_text())
    # The ONNX model is TinyNet's exact graph: same numbers as in-process evaluation.
    ref = evaluate_targets_full(TinyNet(16), [bin_path], flip=False)["val"].metrics
    assert doc["targets"]["val"]["metrics"]["accuracy"] == pytest.approx(ref["accuracy"])
    assert doc["targets"]["val"]["metrics"]["eer"] == pytest.approx(ref["eer"], abs=1e-6)
    assert doc["meta"]["flip"] is False


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy ONNX exporter
def test_launch_eval_under_torchrun_two_processes(tmp_path):
    bin_path, _, test_path, _ = write_targets(str(tmp_path / "data"))
    model = _onnx_model(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port", str(_free_port()), os.path.join(ROOT, "launch", "eval.py"),
         "--weights", model, "--targets", bin_path, "--test-list", test_path,
         "--out", str(out), "--no-plots"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    doc = json.loads((out / "report.json").read_text())
    ref = evaluate_targets_full(TinyNet(16), [bin_path])["val"].metrics
    assert doc["targets"]["val"]["metrics"]["accuracy"] == pytest.approx(ref["accuracy"])
    assert doc["meta"]["world_size"] == 2
    assert not list(out.glob("*.png"))


def _free_port() -> int:
    from dist_train.distributed import free_port

    return free_port()


def test_report_table_json_and_tensorboard(tmp_path):
    bin_path, _, _, _ = write_targets(str(tmp_path))
    results = evaluate_targets_full(TinyNet(16), [bin_path])
    table = report.format_table({n: r.metrics for n, r in results.items()})
    header, rule, row = table.splitlines()[:3]
    assert header.startswith("target") and "TAR@1e-4" in header and row.startswith("val ")
    assert "n/a" in row and "needs at least 1000 impostor pairs" in table

    class Recorder:
        def __init__(self):
            self.scalars, self.images = {}, {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

        def add_image(self, tag, image, step, dataformats):
            assert dataformats == "HWC"
            self.images[tag] = image

    rec = Recorder()
    report.log_tensorboard(rec, results, step=7, prefix="verify")
    assert rec.scalars["verify/val/accuracy"] == (results["val"].metrics["accuracy"], 7)
    assert "verify/val/tar@far=1e-4" not in rec.scalars  # NaN is not logged
    assert set(rec.images) == {f"verify/val/{k}" for k in ("roc", "pr", "scores", "angles")}
    assert all(im.dtype == np.uint8 and im.shape[2] == 3 for im in rec.images.values())


def test_plots_draw_data_where_expected():
    # A diagonal ROC on a linear axis: the curve pixels follow the diagonal of the plot box.
    img = plots.render(
        [plots.Series(np.array([0.0, 1.0]), np.array([0.0, 1.0]), "d")],
        xlim=(0, 1),
        ylim=(0, 1),
        size=(400, 300),
        legend="upper left",
    )
    blue = np.all(img == np.array(plots.PALETTE[0], np.uint8), axis=2)
    ys, xs = np.nonzero(blue[:, 130:380])  # skip the legend swatch (x < 110)
    assert ys.size > 100
    slope = np.polyfit(xs, ys, 1)[0]
    assert slope == pytest.approx(-(300 - 36 - 52) / (400 - 72 - 18), rel=0.1)
    # Log axis: decade ticks are evenly spaced and the figure has the requested size.
    roc = plots.roc_figure(np.array([0, 1e-3, 1e-2, 1.0]), np.array([0, 0.5, 0.8, 1.0]))
    assert roc.shape == (480, 640, 3)
    assert plots.decade(1e-3) == "1e-3" and plots.decade(1.0) == "1"
    np.testing.assert_allclose(plots.nice_ticks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1])


def test_log_tensorboard_with_a_real_summary_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    bin_path, _, _, _ = write_targets(str(tmp_path / "data"), num_ids=6)
    results = evaluate_targets_full(TinyNet(16), [bin_path], n_folds=3)
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        report.log_tensorboard(writer, results, step=3)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 20_000  # four PNG images inside


def test_roc_figure_of_a_perfect_separation():
    fpr = np.array([0.0, 0.0, 0.5, 1.0])
    tpr = np.array([0.0, 1.0, 1.0, 1.0])
    img = plots.roc_figure(fpr, tpr)
    assert img.shape == (480, 640, 3) and (img < 255).any()


@pytest.mark.usefixtures("tiny_backbone")
def test_cli_prepares_images_as_the_checkpoint_was_trained(tmp_path):
    from eval.targets import load_target

    bin_path, csv_path, _, _ = write_targets(str(tmp_path / "data"))
    net = TinyNet(16)
    ckpt = tmp_path / "step_00000005.pt"
    config = {
        "backbone": {"name": TINY, "embedding_size": 16},
        "data": {"image_size": 20, "center_crop": 24, "mean": 0.5, "std": 0.5},
    }
    torch.save({"backbone": net.state_dict(), "config": config, "step": 5}, ckpt)
    out = tmp_path / "out"
    got = main(["--weights", str(ckpt), "--targets", csv_path, "--out", str(out), "--no-plots"])
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert (meta["image_size"], meta["center_crop"]) == (20, 24)
    want = evaluate_targets_full(net, [load_target(csv_path)], image_size=20, center_crop=24)
    plain = evaluate_targets_full(net, [load_target(csv_path)])
    name = next(iter(got))
    np.testing.assert_allclose(got[name].scores, want[name].scores, atol=1e-6)
    assert not np.allclose(got[name].scores, plain[name].scores, atol=1e-6)  # it mattered
    # explicit flags win over the checkpoint's config
    main(["--weights", str(ckpt), "--targets", csv_path, "--out", str(out), "--no-plots",
          "--image-size", "32", "--center-crop", "0"])  # fmt: skip
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert (meta["image_size"], meta["center_crop"]) == (32, 0)

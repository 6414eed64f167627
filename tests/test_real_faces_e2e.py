"""Real faces end to end, through the command lines as a user runs them (issue 13, point 5).

Photos of 13 people (``../shared/realfaces/photos``) are aligned with the YuNet detector, their
520 labelled pairs become an InsightFace ``.bin``, and the released MobileFaceNet scores them,
as ONNX and imported into the registered ``mobilefacenet``; then the imported model is
fine-tuned on other real identities (ORL and the face crops, aligned the same way) with the
fine-tuning recipe and scored again. The figures are printed (``-s``) for the notes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("REALFACES", ROOT.parent / "shared" / "realfaces"))
YUNET = REAL / "models" / "face_detection_yunet.onnx"
MFN = REAL / "models" / "mobilefacenet_512.onnx"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MFN.is_file(), reason=f"real face data not found at {REAL}"),
]


def _run(*args: str, timeout: int = 600) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    took = time.perf_counter() - start
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout, took


def _accuracy(out_dir: Path, name: str = "photos") -> float:
    report = json.loads((out_dir / "report.json").read_text())
    return float(report["targets"][name]["metrics"]["accuracy"])


@pytest.fixture(scope="module")
def photos_bin(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """Aligned photos -> photos.bin; returns its path and the time of each step."""
    work = tmp_path_factory.mktemp("real")
    aligned = work / "photos_aligned"
    _, t_align = _run(
        "launch/align.py", str(REAL / "photos"), "--out", str(aligned), "--detector", str(YUNET)
    )
    report = json.loads((aligned / "align_report.json").read_text())
    counts = report["counts"]
    assert counts["found"] >= 0.95 * counts["images"], counts
    bin_path = work / "photos.bin"
    _, t_bin = _run(
        "launch/rec.py", "make-bin", "--pairs", str(REAL / "photos" / "pairs.csv"),
        "--images", str(aligned), "--out", str(bin_path),
    )  # fmt: skip
    return bin_path, {"align": t_align, "make_bin": t_bin, **counts}


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weights") / "mobilefacenet_512.safetensors"
    _run(
        "launch/import_weights.py", "--source", str(MFN), "--network", "mobilefacenet",
        "--embedding-size", "512", "--out", str(out),
    )  # fmt: skip
    return out


def test_aligned_photos_onnx_and_imported_model_score_the_real_pairs(
    photos_bin, imported, tmp_path
):
    bin_path, info = photos_bin
    _, t_onnx = _run(
        "launch/eval.py", "--weights", str(MFN), "--targets", str(bin_path),
        "--out", str(tmp_path / "onnx"), "--no-plots",
    )  # fmt: skip
    _, t_imp = _run(
        "launch/eval.py", "--weights", str(imported), "--network", "mobilefacenet",
        "--embedding-size", "512", "--targets", str(bin_path),
        "--out", str(tmp_path / "imported"), "--no-plots",
    )  # fmt: skip
    acc_onnx, acc_imp = _accuracy(tmp_path / "onnx"), _accuracy(tmp_path / "imported")
    print(
        f"\nreal photos: faces found {info['found']}/{info['images']}; 520 pairs: "
        f"ONNX accuracy {acc_onnx:.4f}, imported {acc_imp:.4f}; align {info['align']:.1f} s, "
        f"make-bin {info['make_bin']:.1f} s, eval {t_onnx:.1f} s / {t_imp:.1f} s"
    )
    assert acc_onnx >= 0.95
    assert abs(acc_imp - acc_onnx) <= 0.002


def test_fine_tuning_on_other_real_identities_keeps_the_photo_accuracy(
    photos_bin, imported, tmp_path
):
    bin_path, _ = photos_bin
    # new identities: ORL (40 people) and the crops (8 people), aligned into one folder tree
    train = tmp_path / "finetune"
    for name in ("orl", "crops"):
        _run(
            "launch/align.py", str(REAL / name), "--out", str(train / name),
            "--detector", str(YUNET), "--on-miss", "center",
        )  # fmt: skip
    ids = train / "ids"
    ids.mkdir()
    for group in ("orl", "crops"):
        for person in sorted((train / group).iterdir()):
            if person.is_dir():
                person.rename(ids / f"{group}_{person.name}")
    run_dir = tmp_path / "run"
    _, t_train = _run(
        "launch/train.py", "--config",
        "launch/configs/recipes/finetune_pretrained_mobilefacenet.yaml",
        "--set", f"output_dir={run_dir}", "--set", f"data.root={ids}",
        "--set", f"backbone.init_weights={imported}", "--set", f"eval.targets=[{bin_path}]",
        "--set", "num_epochs=0", "--set", "max_steps=12", "--set", "data.batch_size=32",
        "--set", "data.num_workers=0", "--set", "tensorboard=false",
        timeout=900,
    )  # fmt: skip
    before = json.loads((run_dir / "metrics_initial.json").read_text())["photos"]["accuracy"]
    after = json.loads((run_dir / "metrics.json").read_text())["photos"]["accuracy"]
    print(
        f"\nfine-tune (48 new identities, 12 steps of 32): photo-pair accuracy "
        f"{before:.4f} -> {after:.4f} in {t_train:.0f} s"
    )
    assert after >= 0.95

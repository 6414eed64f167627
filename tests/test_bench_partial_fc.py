"""benchmarks/partial_fc.py --ratios-only runs end to end at a toy size (issue 16's two ratios).

Only that the benchmark runs and reports what docs/bench_partial_fc.md quotes (both matmul
baselines, the compiled and the torch-path optimizer step); its figures are not judged here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.partial_fc import native

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("dtypes", ["float32/float32", "bfloat16/bfloat16"])
def test_the_ratio_benchmark_reports_both_ratios(dtypes, tmp_path):
    out = tmp_path / "bench.md"
    cmd = [
        sys.executable, "benchmarks/partial_fc.py", "--ratios-only", "--classes", "3000",
        "--rates", "0.5", "--repeats", "1", "--batch", "16", "--dim", "32", "--dtypes", dtypes,
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert f"weights/state {dtypes}" in text
    path = "compiled kernel" if native.library() is not None else "torch path (no C compiler)"
    assert f"optimizer step through the {path}" in text
    header = next(line for line in text.splitlines() if line.startswith("| clock"))
    assert "fwd+bwd / matmuls" in header and "matmuls into kept outputs" in header
    assert "step / stream" in header and "torch-path step / stream" in header
    rows = [line for line in text.splitlines() if line.startswith(("| cpu", "| wall"))]
    assert len(rows) == 2 and all(row.count("×") == 4 for row in rows)

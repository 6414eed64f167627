"""``benchmarks/gpu_check.py --cpu-smoke`` runs every section (tiny sizes, CPU, gloo), so the
prepared GPU check cannot rot between GPU sessions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "1. Trainer throughput and MFU",
    "2. Host synchronisations per step",
    "3. fp16 + GradScaler across a resume",
    "4. Partial FC alone",
    "5. Memory format and cudnn.benchmark",
    "6. Loader throughput",
    "7. Failing-rank exit",
)


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "bench_gpu.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--cpu-smoke", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    page = out.read_text()
    assert "No GPU was available to this run" in page
    for title in SECTIONS:
        assert f"## {title}" in page
    assert "FAILED" not in page
    # the fp16 run resumed from its checkpoint and continued exactly as without a stop
    resume = page.split("## 3.")[1].split("## 4.")[0]
    assert "| yes |" in resume
    # a rank that hits a corrupt record ends the job non-zero within the section's limit
    failing = page.split("## 7.")[1]
    assert "| yes |" in failing, failing

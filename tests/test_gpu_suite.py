"""The one-call GPU suite cannot rot: its CPU dry run (every part at tiny
shapes, the same scripts and code paths) runs in the default suite."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_cpu_dry_run(tmp_path):
  p = subprocess.run([sys.executable, "benchmarks/gpu_suite.py",
                      "--cpu-dry-run", "--out-dir", str(tmp_path)],
                     cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  summary = json.loads((tmp_path / "gpu_suite_cpu_dry_run.json").read_text())
  assert set(summary["parts"]) == {"pgd_at_bf16", "distill", "program",
                                   "autoattack"}
  assert all(r["returncode"] == 0 for r in summary["parts"].values())
  program = json.loads((tmp_path / "program.json").read_text())
  (row,) = program["runs"].values()
  # The compiled bf16 PGD-AT step does what the method needs: at this tiny
  # width its other work (augmentation, loss, optimizer) is ~4% of the
  # passes, and one attack step more or less would move it by ~9%.
  assert row["conv_loops"] == 0 and 0 <= row["excess"] < 0.065, row
  assert row["step_s"] > 0

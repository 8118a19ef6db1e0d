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
  # The compiled bf16 PGD-AT step does what the method needs, no more.
  assert row["conv_loops"] == 0 and abs(row["excess"]) < 0.05, row
  assert row["step_s"] > 0

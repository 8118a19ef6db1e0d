"""Every GPU row of benchmarks/RESULTS.md in one command (one H100: < 8 min).

  python benchmarks/gpu_suite.py                 # on the GPU machine
  python benchmarks/gpu_suite.py --cpu-dry-run   # tiny shapes on the CPU (CI)

Runs, each as its own process with its own time budget (a part that fails or
runs out of time is reported and the others still run):

  pgd_at_f32 / pgd_at_bf16   PGD-10 AT step, PreAct ResNet-18, batch 128,
                             tsjax vs eager PyTorch (NCHW and channels_last;
                             torch autocast for bf16)   benchmarks/adv_train_step.py
  distill                    PeerAiD and AdvFunMatch steps, ResNet-18,
                             tsjax vs PyTorch            benchmarks/distill_step.py
  program                    paper steps compiled for the device: FLOPs vs
                             analytic, peak memory, compile seconds and the
                             measured step time / TFLOP/s, ResNet-18 and
                             WRN-34-10 (PGD-AT, PeerAiD, AdvFunMatch), f32
                             and bf16                    benchmarks/program_analysis.py
  autoattack                 AutoAttack on 1000 CIFAR-shaped points of a
                             ResNet-18 vs torchattacks (the official
                             ensemble as reference is not wired into
                             benchmarks/autoattack.py yet)
                                                         benchmarks/autoattack.py
  ts_protocol                the teacher-student study protocol vs PyTorch
                                                         benchmarks/ts_protocol.py

Nothing is installed: JAX (with CUDA) and PyTorch must be there. Results:
each part's own JSON (``benchmarks/results/*_gpu.json``) and a summary in
``benchmarks/results/gpu_suite_<backend>.json`` (return code, seconds and the
output tail of each part); ``--cpu-dry-run`` writes everything under
``--out-dir`` (a temporary directory by default) and leaves the repository
as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def parts(dry: bool, out: pathlib.Path | None) -> list[tuple[str, list, int]]:
  """``(name, argv, timeout seconds)`` of every part."""
  py = [sys.executable]
  o = (lambda name: ["--out", str(out / f"{name}.json")]) if out else (
      lambda name: [])
  if dry:
    return [
        ("pgd_at_bf16", py + [str(BENCH / "adv_train_step.py"), "--quick",
                              "--bf16", "--repeats", "1", "--warmup", "0",
                              "--batch", "16", "--torch-layouts",
                              "channels_last"] + o("pgd_at_bf16"), 240),
        ("distill", py + [str(BENCH / "distill_step.py"), "--quick",
                          "--repeats", "1", "--warmup", "0", "--batch", "16",
                          "--skip-check", "--torch-layouts", "nchw"]
         + o("distill"), 240),
        ("program", py + [str(BENCH / "program_analysis.py"), "--quick",
                          "--methods", "pgd_at", "--models", "small_cnn",
                          "--dtypes", "bfloat16", "--time-steps", "1"]
         + o("program"), 240),
        ("autoattack", py + [str(BENCH / "autoattack.py"), "--quick",
                             "--n", "16", "--steps", "5"] + o("autoattack"),
         240),
    ]
  return [
      ("pgd_at_f32", py + [str(BENCH / "adv_train_step.py"), "--models",
                           "preact_resnet18", "--repeats", "5"]
       + o("pgd_at_f32"), 75),
      ("pgd_at_bf16", py + [str(BENCH / "adv_train_step.py"), "--models",
                            "preact_resnet18", "--repeats", "5", "--bf16"]
       + o("pgd_at_bf16"), 75),
      ("distill", py + [str(BENCH / "distill_step.py"), "--model", "resnet18",
                        "--device", "gpu", "--repeats", "3"] + o("distill"),
       80),
      ("program", py + [str(BENCH / "program_analysis.py"), "--methods",
                        "pgd_at,peeraid,advfunmatch", "--time-steps", "5",
                        "--markdown"] + o("program"), 120),
      ("autoattack", py + [str(BENCH / "autoattack.py"), "--device", "gpu",
                           "--models", "resnet18", "--n", "1000"]
       + o("autoattack"),
       60),
      ("ts_protocol", py + [str(BENCH / "ts_protocol.py"), "--no-results-md"]
       + o("ts_protocol"), 60),
  ]


def run_part(name: str, argv: list, timeout: int, env: dict) -> dict:
  print(f"== {name}: {' '.join(argv[1:])}", flush=True)
  t0 = time.perf_counter()
  try:
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    rc, out = p.returncode, p.stdout + p.stderr
  except subprocess.TimeoutExpired as e:
    rc = "timeout"
    out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (
        e.stdout or "")
  seconds = time.perf_counter() - t0
  tail = "\n".join(out.strip().splitlines()[-15:])
  print(f"   -> {rc} in {seconds:.0f} s\n{tail}\n", flush=True)
  return {"argv": argv[1:], "returncode": rc, "seconds": seconds,
          "tail": tail}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cpu-dry-run", action="store_true",
                 help="tiny shapes on the CPU: checks that every part runs")
  p.add_argument("--out-dir", default=None,
                 help="where the parts' JSON go (dry run default: a "
                      "temporary directory; GPU run default: each part's "
                      "own benchmarks/results file)")
  p.add_argument("--only", default=None,
                 help="comma-separated part names to run")
  args = p.parse_args(argv)
  env = dict(os.environ)
  if args.cpu_dry_run:
    env["JAX_PLATFORMS"] = "cpu"
  tmp = None
  out = pathlib.Path(args.out_dir) if args.out_dir else None
  if args.cpu_dry_run and out is None:
    tmp = tempfile.TemporaryDirectory()
    out = pathlib.Path(tmp.name)
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
  todo = parts(args.cpu_dry_run, out)
  if args.only:
    keep = set(args.only.split(","))
    unknown = keep - {n for n, _, _ in todo}
    if unknown:
      p.error(f"--only: unknown parts {sorted(unknown)}; parts: "
              f"{[n for n, _, _ in todo]}")
    todo = [t for t in todo if t[0] in keep]
  t0 = time.perf_counter()
  results = {name: run_part(name, a, timeout, env) for name, a, timeout
             in todo}
  summary = {"dry_run": args.cpu_dry_run, "seconds": time.perf_counter() - t0,
             "parts": results}
  path = (out or BENCH / "results") / (
      "gpu_suite_cpu_dry_run.json" if args.cpu_dry_run else "gpu_suite_gpu.json")
  path.write_text(json.dumps(summary, indent=2) + "\n")
  failed = [n for n, r in results.items() if r["returncode"] != 0]
  print(f"gpu suite: {len(results) - len(failed)}/{len(results)} parts ok in "
        f"{summary['seconds']:.0f} s" + (f"; failed: {failed}" if failed
                                         else "") + f"; summary in {path}")
  if tmp is not None:
    tmp.cleanup()
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

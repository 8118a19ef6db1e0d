"""Seeds vmapped vs seeds run one after another: teacher–student training.

Times the "standard" regime of ``tsjax.train.teacher_student.TeacherStudent``
(built from ``configs/teacher_student.py`` defaults) for S seeds two ways:

* sequential: the same jitted single-seed train function called S times, one
  run after another (each run is waited for before the next is dispatched);
* vmapped: one call of ``tsjax.train.sweep.seed_sweep`` of that function on
  one device (``jit(vmap(...))`` over the S seeds), or, with
  ``--host-devices N``, split over N XLA CPU devices (``shard_map``; each
  device vmaps over its share, so N cores can work at once).

Both paths train through the library as a user would: ``TeacherStudent.train``
with the problem's own training set, which for these configs (no off-span
noise) is ``LowRankData``: k = 10 coordinates per example instead of d = 50
inputs, each batch rebuilt with a [16, 10] x [10, 50] product; batch indices
are drawn, and their rows gathered, 64 steps at a time (``tsjax.train.loop``).
``--data dense`` trains on the dense ``x_train`` array instead (the
pre-LowRankData path; same batches, results equal up to rounding).

Problems (subspace, teacher, data, initial student) and initial train states
are built before timing; both paths are compiled by a warm-up call on the same
shapes before timing; each timing is ``jax.block_until_ready`` wall time over
``--repeats`` interleaved repeats: vmapped = best repeat, sequential = sum over
seeds of each run's best repeat (robust to load spikes on a shared machine;
the best whole repeat and medians are saved too). The final parameters of the
two paths are checked to agree (allclose) so the two timings cannot be of
different work.

Run from the repository root::

  python benchmarks/seed_sweep.py                    # float64 (study default)
  python benchmarks/seed_sweep.py --dtype float32
  python benchmarks/seed_sweep.py --quick            # seconds-long sanity run
  python benchmarks/seed_sweep.py --seeds 1,8,32 --steps 10000 --repeats 5
  python benchmarks/seed_sweep.py --host-devices 2   # vmapped on both cores
  python benchmarks/seed_sweep.py --data dense       # dense-gather baseline

Results: a table on stdout and ``benchmarks/results/seed_sweep_<backend>.json``
(one entry per dtype, data form and device count -- ``float64``,
``float32_2dev``, ``float64_dense``, ... -- so runs sit side by side;
``--quick`` writes ``seed_sweep_<backend>_quick.json`` instead).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import sys
import time


def _host_devices(argv) -> int:
  """``--host-devices N`` read before jax is imported (XLA_FLAGS)."""
  for i, a in enumerate(argv):
    if a.startswith("--host-devices="):
      return int(a.split("=", 1)[1])
    if a == "--host-devices" and i + 1 < len(argv):
      return int(argv[i + 1])
  return 1


if _host_devices(sys.argv[1:]) > 1 and __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_"
      f"count={_host_devices(sys.argv[1:])}").strip()

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import jax  # noqa: E402

# The study's default dtype is float64; enable 64-bit mode before any array
# is created (float32 runs are unaffected by it).
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from _common import (loadavg, machine_info, open_results,  # noqa: E402
                     uptime, write_results)
from tsjax.configs.teacher_student import get_config  # noqa: E402
from tsjax.train.sweep import seed_keys, seed_sweep  # noqa: E402
from tsjax.train.teacher_student import TeacherStudent  # noqa: E402

REGIME = "standard"
DEFAULT_STEPS = 10_000
QUICK = {"seeds": "1,4", "steps": 200, "repeats": 2}
# Agreement of vmapped vs sequential final parameters, per seed and parameter
# array: ||vmapped - sequential|| <= rtol * ||sequential|| (Frobenius). The
# two programs are compiled separately (batched vs unbatched matmuls), so
# summation order may differ, and float32 rounding differences grow over
# thousands of SGD steps (about 1e-4 relative after 10k steps at S=32 here);
# different seeds or step counts would differ at O(1).
TOLERANCES = {"float64": 1e-9, "float32": 2e-3}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", default="1,8,32",
                 help="comma-separated seed counts S (default 1,8,32)")
  p.add_argument("--steps", type=int, default=None,
                 help=f"training steps per run (default {DEFAULT_STEPS}; "
                      f"{QUICK['steps']} with --quick)")
  p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed repeats per S and path (default 5; 2 with --quick)")
  p.add_argument("--seed", type=int, default=0, help="first seed")
  p.add_argument("--host-devices", type=int, default=1,
                 help="XLA CPU devices the vmapped path splits seeds over "
                      "(default 1; the sequential runs use device 0)")
  p.add_argument("--data", choices=("lowrank", "dense"), default="lowrank",
                 help="training-set form: the library default (LowRankData "
                      "coordinates) or the dense x_train array")
  p.add_argument("--quick", action="store_true",
                 help=f"sanity run: seeds {QUICK['seeds']}, {QUICK['steps']} "
                      f"steps, {QUICK['repeats']} repeats unless given")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/"
                      "seed_sweep_<backend>[_quick].json)")
  a = p.parse_args(argv)
  a.argv = list(sys.argv[1:] if argv is None else argv)
  if a.quick and a.seeds == p.get_default("seeds"):
    a.seeds = QUICK["seeds"]
  a.steps = a.steps if a.steps is not None else (
      QUICK["steps"] if a.quick else DEFAULT_STEPS)
  a.repeats = a.repeats if a.repeats is not None else (
      QUICK["repeats"] if a.quick else 5)
  a.seeds = [int(s) for s in str(a.seeds).split(",") if s.strip()]
  if not a.seeds or min(a.seeds) < 1:
    p.error(f"--seeds needs positive integers, got {a.seeds}")
  if a.steps < 1 or a.repeats < 1:
    p.error("--steps and --repeats must be >= 1")
  if a.host_devices < 1:
    p.error("--host-devices must be >= 1")
  return a


def _head(tree, n):
  return jax.tree.map(lambda a: a[:n], tree)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _timed(fn):
  """(wall seconds, process CPU seconds, output) of ``fn()`` run to completion."""
  c0, t0 = time.process_time(), time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t0, time.process_time() - c0, out


def run(args) -> dict:
  config = get_config()
  config.dtype = args.dtype
  config.train.steps = args.steps
  study = TeacherStudent(config)
  steps = args.steps
  smax = max(args.seeds)

  dense = args.data == "dense"

  def train_one(state, problem, num_steps):
    # study.train's default data is study.train_data(problem): LowRankData.
    return study.train(REGIME, state, problem, num_steps,
                       problem["x_train"] if dense else None)

  single = jax.jit(train_one, static_argnums=2)
  device = jax.devices()[0]
  sweep_devices = jax.devices()[:args.host_devices]
  if len(sweep_devices) != args.host_devices:
    raise SystemExit(f"--host-devices {args.host_devices}: only "
                     f"{len(sweep_devices)} devices ({jax.default_backend()})")
  swept = seed_sweep(train_one, devices=sweep_devices, static_argnums=(2,))

  # ---- untimed set-up: problems and initial states for every seed.
  t0 = time.perf_counter()
  # (Per-seed jit of ``problem``: compiling the unbatched builder takes about
  # half as long as the vmapped one; both paths below get the same arrays.)
  keys = seed_keys(args.seed, smax)
  make_problem, make_state = jax.jit(study.problem), jax.jit(study.init_state)
  per_seed = []
  for i in range(smax):
    problem = make_problem(keys[i])
    per_seed.append((make_state(problem), problem))
  per_seed = jax.block_until_ready(per_seed)
  states = _stack([st for st, _ in per_seed])
  problems = _stack([pr for _, pr in per_seed])
  states, problems = jax.block_until_ready((states, problems))
  setup_s = time.perf_counter() - t0

  # ---- warm-up / compile the single-seed function.
  t0 = time.perf_counter()
  jax.block_until_ready(single(*per_seed[0], steps))
  compile_single_s = time.perf_counter() - t0
  t_one, _, _ = _timed(lambda: single(*per_seed[0], steps))
  est = t_one * args.repeats * sum(2 * s + 1 for s in args.seeds)
  print(f"backend {jax.default_backend()} ({device.device_kind}), dtype "
        f"{args.dtype}, {steps} steps/run, seeds {args.seeds}, "
        f"{args.repeats} repeats; one single-seed run {t_one:.3f} s; "
        f"rough total estimate {est:.0f} s", flush=True)

  rows = []
  tol = TOLERANCES[args.dtype]
  for s in args.seeds:
    batch_states, batch_problems = _head(states, s), _head(problems, s)
    batch_states, batch_problems = jax.block_until_ready(
        (batch_states, batch_problems))
    t0 = time.perf_counter()
    jax.block_until_ready(swept(batch_states, batch_problems, steps))
    compile_vmap_s = time.perf_counter() - t0

    run_times, run_cpu = [], []  # [repeat][seed] seconds of each run

    def sequential():
      outs, times, cpu = [], [], []
      for st, pr in per_seed[:s]:
        # Wait for each run: "sequential" means one run after another.
        c0, t0 = time.process_time(), time.perf_counter()
        outs.append(jax.block_until_ready(single(st, pr, steps)))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
      run_times.append(times)
      run_cpu.append(cpu)
      return outs

    def vmapped():
      return swept(batch_states, batch_problems, steps)

    t_seq, t_vmap, c_seq, c_vmap = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so load drifts hit both
      dt, dc, seq_out = _timed(sequential)
      t_seq.append(dt)
      c_seq.append(dc)
      dt, dc, vmap_out = _timed(vmapped)
      t_vmap.append(dt)
      c_vmap.append(dc)

    # ---- agreement: same final parameters, step counts and losses.
    seq_state, seq_stats = _stack([o[0] for o in seq_out]), _stack(
        [o[1] for o in seq_out])
    vmap_state, vmap_stats = vmap_out
    diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), seq_state.params,
        vmap_state.params))

    def rel(a, b):  # per-seed relative Frobenius error, worst seed
      a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
      return float(jnp.max(jnp.linalg.norm(b - a, axis=1) /
                           jnp.maximum(jnp.linalg.norm(a, axis=1), 1e-30)))
    rel_diffs = jax.tree.leaves(jax.tree.map(rel, seq_state.params,
                                             vmap_state.params))
    close = max(rel_diffs) <= tol
    steps_ok = bool(jnp.all(seq_state.step == steps) &
                    jnp.all(vmap_state.step == steps))
    finite = bool(jnp.all(seq_stats["all_finite"]) &
                  jnp.all(vmap_stats["all_finite"]))
    loss_close = bool(jnp.allclose(seq_stats["loss"], vmap_stats["loss"],
                                   rtol=tol, atol=0.0))
    agree = close and steps_ok and finite and loss_close

    # Sequential time: each seed's run at its best repeat, summed. On an idle
    # machine this equals the best whole repeat (to within dispatch time); on a
    # shared one it drops the load spikes that hit some of the S runs of every
    # repeat, just as the best-of-repeats vmapped time drops them.
    best_seq = sum(min(r[i] for r in run_times) for i in range(s))
    best_vmap = min(t_vmap)
    cpu_seq = sum(min(r[i] for r in run_cpu) for i in range(s))
    cpu_vmap = min(c_vmap)
    row = {
        "seeds": s,
        "sequential_s": best_seq,
        "vmapped_s": best_vmap,
        "speedup": best_seq / best_vmap,
        "sequential_best_repeat_s": min(t_seq),
        "speedup_best_repeat": min(t_seq) / best_vmap,
        "sequential_median_s": statistics.median(t_seq),
        "vmapped_median_s": statistics.median(t_vmap),
        "speedup_median": statistics.median(t_seq) / statistics.median(t_vmap),
        "sequential_seed_steps_per_s": s * steps / best_seq,
        "vmapped_seed_steps_per_s": s * steps / best_vmap,
        "vmapped_steps_per_s": steps / best_vmap,
        "sequential_all_s": t_seq,
        "sequential_runs_s": run_times,
        "sequential_runs_cpu_s": run_cpu,
        "vmapped_all_s": t_vmap,
        # Process CPU time (all threads) of each repeat: cpu/wall > 1 means
        # XLA ran work on more than one core.
        "sequential_cpu_all_s": c_seq,
        "vmapped_cpu_all_s": c_vmap,
        # Same estimators on process CPU time: insensitive to time spent
        # waiting for a core on a loaded machine, but it also counts any
        # second XLA thread's (spinning) time, so read it with the wall time.
        "sequential_cpu_s": cpu_seq,
        "vmapped_cpu_s": cpu_vmap,
        "speedup_cpu": cpu_seq / cpu_vmap,
        "compile_vmapped_s": compile_vmap_s,
        "agree": agree,
        "max_abs_param_diff": max(diffs),
        "max_rel_param_diff": max(rel_diffs),
        "final_train_loss_mean": float(jnp.mean(vmap_stats["loss"])),
    }
    rows.append(row)
    print(f"  S={s:3d}: sequential {best_seq:8.3f} s  vmapped {best_vmap:8.3f}"
          f" s  speed-up {row['speedup']:6.2f}x  (max |dparam| "
          f"{row['max_abs_param_diff']:.1e}, relative "
          f"{row['max_rel_param_diff']:.1e}, agree={agree})", flush=True)
    if not agree:
      raise SystemExit(
          f"vmapped and sequential results differ for S={s}: params allclose "
          f"{close} (max relative difference {max(rel_diffs):.3e} > {tol}), step "
          f"counts {steps_ok}, all finite {finite}, mean losses close "
          f"{loss_close}; not saving timings of different work")

  return {
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "dtype": args.dtype,
      "steps": steps,
      "repeats": args.repeats,
      "first_seed": args.seed,
      "regime": REGIME,
      "data": args.data,
      "train_data": ("dense x_train [n, d]" if dense else
                     type(study.train_data(per_seed[0][1])).__name__),
      "host_devices": args.host_devices,
      "config": "configs/teacher_student.py defaults (dtype, train.steps "
                "overridden)",
      "sizes": {"d": config.data.d, "k": config.data.k,
                "n_train": config.data.n_train,
                "teacher_widths": list(study.teacher_widths),
                "student_widths": list(study.student_widths),
                "outputs": config.teacher.outputs,
                "batch_size": config.train.batch_size},
      "setup_s": setup_s,
      "compile_single_s": compile_single_s,
      "timing": "wall time with jax.block_until_ready; vmapped_s: best of "
                "repeats; sequential_s: sum over seeds of each run's best "
                "repeat (sequential waits for each run); medians and whole-"
                "repeat bests alongside",
      "rows": rows,
  }


def print_table(result: dict) -> None:
  hdr = (f"{'S':>4} | {'sequential s':>12} | {'vmapped s':>10} | "
         f"{'speed-up':>8} | {'seq seed-steps/s':>16} | "
         f"{'vmap seed-steps/s':>17} | {'vmap steps/s':>12} || "
         f"{'seq CPU s':>9} | {'vmap CPU s':>10} | {'CPU speed-up':>12}")
  print(f"\nSeed sweep, {result['dtype']}, {result['data']} data, vmapped on "
        f"{result['host_devices']} device(s), {result['steps']} steps/run, "
        f"best of {result['repeats']} (wall time; process CPU time after ||):")
  print(hdr)
  print("-" * len(hdr))
  for r in result["rows"]:
    print(f"{r['seeds']:>4} | {r['sequential_s']:>12.3f} | "
          f"{r['vmapped_s']:>10.3f} | {r['speedup']:>7.2f}x | "
          f"{r['sequential_seed_steps_per_s']:>16,.0f} | "
          f"{r['vmapped_seed_steps_per_s']:>17,.0f} | "
          f"{r['vmapped_steps_per_s']:>12,.0f} || "
          f"{r['sequential_cpu_s']:>9.3f} | {r['vmapped_cpu_s']:>10.3f} | "
          f"{r['speedup_cpu']:>11.2f}x")


def run_key(result: dict) -> str:
  """``float64``, ``float32_2dev``, ``float64_dense``, ...: one entry each."""
  key = result["dtype"]
  if result["host_devices"] > 1:
    key += f"_{result['host_devices']}dev"
  if result["data"] != "lowrank":
    key += f"_{result['data']}"
  return key


def save(result: dict, machine: dict, args) -> pathlib.Path:
  path, data, command = open_results("seed_sweep", machine, args)
  data["runs"][run_key(result)] = {"command": command, "machine": machine,
                                   **result}
  return write_results(path, data)


def main(argv=None) -> None:
  args = parse_args(argv)
  machine = machine_info()
  machine["loadavg_before"] = loadavg()
  machine["uptime_before"] = uptime()
  t0 = time.perf_counter()
  result = run(args)
  result["total_s"] = time.perf_counter() - t0
  machine["loadavg_after"] = loadavg()
  machine["uptime_after"] = uptime()
  print_table(result)
  path = save(result, machine, args)
  print(f"\nsaved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
        f" (total {result['total_s']:.0f} s; load average before/after "
        f"{machine['loadavg_before']} / {machine['loadavg_after']})")


if __name__ == "__main__":
  main()

"""Where the time of a seed-vmapped teacher–student step goes (ablations).

Companion to ``benchmarks/seed_sweep.py``: times pieces of the "standard"
regime's training step, as a ``fori_loop`` of ``--steps`` steps, for one seed
(``jit``) and for S seeds (``jit(vmap)``), and reports microseconds per step
and the vmap gain ``S * t(1 seed) / t(S seeds)`` of each piece:

  full          tsjax as is: ``TeacherStudent.train`` (batch indices drawn
                and ``LowRankData`` coordinates z [n, 10] gathered 64 steps
                at a time; per step the batch rebuilt as z[idx] @ U^T, then
                the step)
  dense         the same on the dense x_train [n, 50] (``x_train=`` override)
  per_step      the library before index blocks and LowRankData: one threefry
                ``sample_batch`` per step inside the loop, dense gather
                (bit-identical to ``dense``; checked)
  pre_idx_y     dense, indices drawn before the loop, teacher targets
                precomputed for the training set (the "standard" regime's
                targets never change)
  fixed_batch   the tsjax train step on a fixed batch (no sampling at all)
  plain_step    bare gradient + SGD update on a fixed batch (no optax, no
                finite check / where-keep): the arithmetic floor of a step
  sample_only   only the per-step sampling of ``per_step`` (threefry + gather)

GFLOP/s columns: the step's arithmetic (teacher and student forward, student
backward; counted from the layer sizes) per second, next to the rate of one
dense 1024^3 matrix product on the same machine (all cores).

With ``--host-devices N`` the process is given N XLA CPU devices
(``--xla_force_host_platform_device_count``) and ``full`` is also timed with
``seed_sweep`` splitting the seeds over all of them (``shard_map``).

  python benchmarks/profile_seed_sweep.py                  # float64, S=32
  python benchmarks/profile_seed_sweep.py --dtype float32 --host-devices 2

Prints a table; writes ``benchmarks/results/profile_seed_sweep_<backend>_
<dtype>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", type=int, default=32)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
  p.add_argument("--host-devices", type=int, default=1,
                 help="XLA CPU devices to create (CPU backend only)")
  p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                 help="wall time, or process CPU time (robust to a loaded "
                      "machine; pin to one core with taskset so it does not "
                      "count a second, spinning XLA thread)")
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


ARGS = parse_args()
if ARGS.host_devices > 1:  # must happen before jax is imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count="
                             f"{ARGS.host_devices}").strip()

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from tsjax.configs.teacher_student import get_config  # noqa: E402
from tsjax.methods.teacher_student import regression_loss  # noqa: E402
from tsjax.train import loop  # noqa: E402
from tsjax.train.state import make_train_step  # noqa: E402
from tsjax.train.sweep import seed_keys, seed_sweep  # noqa: E402
from tsjax.train.teacher_student import TeacherStudent  # noqa: E402


def build(args):
  config = get_config()
  config.dtype = args.dtype
  study = TeacherStudent(config)
  B = int(config.train.batch_size)
  N = args.steps
  step_fn = study._steps["standard"]  # the jit-able step the study trains with
  nets = study.nets

  def indices(state, n):
    # Exactly sample_batch's keys: fold_in(fold_in(key, STREAM), step).
    base = jax.random.fold_in(state.key, loop._BATCH_STREAM)
    steps = state.step + jnp.arange(N)
    return jax.vmap(lambda t: jax.random.randint(
        jax.random.fold_in(base, t), (B,), 0, n))(steps)

  def full(state, p):
    return study.train("standard", state, p, N)[0].params

  def dense(state, p):
    return study.train("standard", state, p, N, p["x_train"])[0].params

  def per_step(state, p):
    x, ctx = p["x_train"], study.ctx(p)
    def body(_, s):
      return step_fn(s, loop.sample_batch(s.key, s.step, x, B), ctx)[0]
    return jax.lax.fori_loop(0, N, body, state).params

  def y_loss(params, model_state, batch, key, ctx):
    del key
    loss = regression_loss(nets, params, ctx, batch["x"], batch["y"])
    return loss, ({"loss": loss}, model_state)
  y_step = make_train_step(y_loss, study.optimizer)

  def pre_idx_y(state, p):
    x, ctx = p["x_train"], study.ctx(p)
    y = nets.teacher_out(ctx, x)
    idx = indices(state, x.shape[0])
    def body(i, s):
      return y_step(s, {"x": x[idx[i]], "y": y[idx[i]]}, ctx)[0]
    return jax.lax.fori_loop(0, N, body, state).params

  def fixed_batch(state, p):
    x, ctx = p["x_train"][:B], study.ctx(p)
    return jax.lax.fori_loop(
        0, N, lambda i, s: step_fn(s, {"x": x}, ctx)[0], state).params

  def plain_step(state, p):
    x, ctx = p["x_train"][:B], study.ctx(p)
    g = jax.grad(lambda w: regression_loss(nets, w, ctx, x))
    lr = float(config.train.lr)
    return jax.lax.fori_loop(
        0, N, lambda i, w: jax.tree.map(lambda a, b: a - lr * b, w, g(w)),
        state.params)

  def sample_only(state, p):
    x = p["x_train"]
    def body(i, acc):
      return acc + jnp.sum(loop.sample_batch(state.key, i, x, B)["x"])
    return jax.lax.fori_loop(0, N, body, jnp.zeros((), x.dtype))

  variants = dict(full=full, dense=dense, per_step=per_step,
                  pre_idx_y=pre_idx_y, fixed_batch=fixed_batch,
                  plain_step=plain_step, sample_only=sample_only)
  return study, variants


def best_time(fn, *a, repeats):
  clock = time.process_time if ARGS.clock == "cpu" else time.perf_counter
  jax.block_until_ready(fn(*a))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = clock()
    jax.block_until_ready(fn(*a))
    times.append(clock() - t0)
  return min(times)


def interleaved_best_times(timed, repeats):
  """{key: best seconds} of ``fn(*args)`` for ``timed = {key: (fn, args)}``:
  all compiled and warmed up first, then timed round-robin ``repeats`` times."""
  clock = time.process_time if ARGS.clock == "cpu" else time.perf_counter
  for fn, a in timed.values():
    jax.block_until_ready(fn(*a))
  times = {key: [] for key in timed}
  for _ in range(repeats):
    for key, (fn, a) in timed.items():
      t0 = clock()
      jax.block_until_ready(fn(*a))
      times[key].append(clock() - t0)
  return {key: min(ts) for key, ts in times.items()}


def gemm_gflops(dtype, n=1024, repeats=5):
  a = jnp.ones((n, n), dtype) / n
  f = jax.jit(lambda a: a @ a)
  return 2 * n ** 3 / best_time(f, a, repeats=repeats) / 1e9


def main(args=ARGS):
  study, variants = build(args)
  S, N = args.seeds, args.steps
  make_problem, make_state = jax.jit(study.problem), jax.jit(study.init_state)
  keys = seed_keys(0, S)
  per_seed = []
  for i in range(S):
    pr = make_problem(keys[i])
    per_seed.append((make_state(pr), pr))
  stack = lambda ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts)
  states = stack([s for s, _ in per_seed])
  problems = stack([p for _, p in per_seed])
  s0, p0 = per_seed[0]
  one_dev = [jax.devices()[0]]

  # per_step (the old library loop) must be the same computation as dense
  # (bit-identical batches); full and pre_idx_y differ by rounding only.
  a = jax.jit(variants["dense"])(s0, p0)
  b = jax.jit(variants["per_step"])(s0, p0)
  c = jax.jit(variants["pre_idx_y"])(s0, p0)
  f = jax.jit(variants["full"])(s0, p0)
  same = all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.all(u == v)),
                                          a, b)))
  maxdiff = lambda u, v: max(jax.tree.leaves(jax.tree.map(
      lambda u, v: float(jnp.max(jnp.abs(u - v))), u, v)))
  dy, dz = maxdiff(a, c), maxdiff(a, f)
  print(f"per_step bit-identical to dense: {same}; max |dparam| vs dense: "
        f"full {dz:.1e}, pre_idx_y {dy:.1e}")

  # Arithmetic per seed and step (multiply-adds x 2) of the two-layer nets:
  # teacher forward, student forward, student backward (no input gradient).
  c = study.config
  B, d, h = int(c.train.batch_size), int(c.data.d), study.student_widths[0]
  m, o = study.teacher_widths[0], int(c.teacher.outputs)
  teacher_flops = 2 * B * (d * m + m * o)
  student_flops = 2 * B * (d * h + h * o) + 2 * B * (h * o + h * o + d * h)
  k = int(c.data.k)
  flops = {name: student_flops + (0 if name == "pre_idx_y" else teacher_flops)
           for name in ("full", "dense", "per_step", "pre_idx_y",
                        "fixed_batch", "plain_step")}
  flops["full"] += 2 * B * k * d  # rebuilding the batch from coordinates
  gemm = gemm_gflops(study.dtype)
  print(f"arithmetic per seed-step {flops['dense'] / 1e3:.1f} kFLOP (full: "
        f"{flops['full'] / 1e3:.1f} with the batch rebuild); dense 1024^3 GEMM "
        f"on this machine: {gemm:.1f} GFLOP/s ({args.dtype})")

  rows = []
  print(f"\n{args.dtype}, {N} steps, S={S}, best of {args.repeats} "
        f"({args.clock} time); "
        f"{jax.device_count()} device(s) {jax.devices()[0].device_kind}")
  hdr = (f"{'variant':14s} {'1 seed us/step':>15s} {f'{S} seeds us/step':>16s}"
         f" {'us/seed-step':>13s} {'vmap gain':>10s} {'GFLOP/s 1':>10s} "
         f"{f'GFLOP/s {S}':>10s}")
  print(hdr)
  print("-" * len(hdr))

  def report(name, t1, tS, note="", f=None):
    f = f or flops.get(name)
    row = {"variant": name, "us_per_step_1": t1, "us_per_step_S": tS,
           "us_per_seed_step_S": tS / S, "vmap_gain": S * t1 / tS,
           "gflops_1": f / t1 / 1e3 if f else None,
           "gflops_S": S * f / tS / 1e3 if f else None}
    rows.append(row)
    g1 = f"{row['gflops_1']:10.1f}" if f else f"{'-':>10s}"
    gS = f"{row['gflops_S']:10.1f}" if f else f"{'-':>10s}"
    print(f"{name:14s} {t1:15.2f} {tS:16.2f} {tS / S:13.2f} "
          f"{row['vmap_gain']:9.2f}x {g1} {gS}{note}", flush=True)
    return row

  # Every variant compiled first, then the repeats interleaved over all
  # variants, so a load drift on a shared machine hits them alike.
  timed = {}
  for name, fn in variants.items():
    timed[(name, 1)] = (jax.jit(fn), (s0, p0))
    timed[(name, S)] = (seed_sweep(fn, devices=one_dev), (states, problems))
  multi = f"full_{jax.device_count()}dev"
  if jax.device_count() > 1:
    timed[(multi, S)] = (seed_sweep(variants["full"]), (states, problems))
  best = interleaved_best_times(timed, args.repeats)
  for name in variants:
    report(name, best[(name, 1)] / N * 1e6, best[(name, S)] / N * 1e6)
  if jax.device_count() > 1:
    report(multi, best[("full", 1)] / N * 1e6, best[(multi, S)] / N * 1e6,
           f"  (seed_sweep over {jax.device_count()} devices)", flops["full"])

  out = pathlib.Path(args.out) if args.out else (
      ROOT / "benchmarks" / "results" /
      f"profile_seed_sweep_{jax.default_backend()}_{args.dtype}"
      f"{'_' + str(jax.device_count()) + 'dev' if jax.device_count() > 1 else ''}"
      f"{'_cpuclock' if args.clock == 'cpu' else ''}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      "benchmark": "profile_seed_sweep",
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": " ".join(["python benchmarks/profile_seed_sweep.py",
                           *sys.argv[1:]]),
      "backend": jax.default_backend(), "dtype": args.dtype, "steps": N,
      "seeds": S, "repeats": args.repeats, "clock": args.clock,
      "cpu_count": os.cpu_count(),
      "cpus_usable": len(os.sched_getaffinity(0)),
      "device_count": jax.device_count(), "jax": jax.__version__,
      "loadavg": list(os.getloadavg()),
      "per_step_bit_identical_to_dense": same,
      "full_max_abs_param_diff_vs_dense": dz,
      "pre_idx_y_max_abs_param_diff": dy,
      "flops_per_seed_step": flops, "gemm_1024_gflops": gemm,
      "rows": rows}, indent=2) + "\n")
  print(f"saved {out}")


if __name__ == "__main__":
  main()

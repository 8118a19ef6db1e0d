"""Where the time of a tsjax PGD-10 adversarial-training step goes (CPU focus).

Companion of ``benchmarks/adv_train_step.py`` (same models, batch, data and
step, built the same way). For each model it times, median of ``--repeats``
(compilation excluded, ``jax.block_until_ready``), float32:

step variants (whole train step, state donated as in training):
  ``step``            the step exactly as ``experiments/train.py`` builds it
                      (the PGD loop is a ``lax.fori_loop``, i.e. an XLA while
                      loop);
  ``step_unrolled``   the same step with the PGD ``fori_loop`` traced with
                      ``unroll=True`` (``jax.lax.fori_loop`` patched while the
                      step is traced; nothing in tsjax is edited);
  ``torch_step``      the PyTorch eager step of ``adv_train_step.py``.

attack pieces:
  ``attack_iter``        one PGD iteration (eval forward + gradient w.r.t.
                         the input + sign step + projection), jitted alone;
  ``attack_iter_x10``    that jitted iteration dispatched 10 times;
  ``attack_fori``        tsjax's ``ce_attack`` (PGD-10, fori_loop);
  ``attack_unrolled``    the same with the loop unrolled;
  ``torch_attack``       the PyTorch attack loop.

layer pieces (small_cnn shapes, one conv / pool layer, jitted; forward and
gradient w.r.t. the layer input, as in the attack):
  ``convN_fwd_dx``           3x3 conv forward + ReLU + gradient w.r.t. the
                            conv input, jitted alone;
  ``convN_fwd_dx_in_loop``  the same, 10 times in a ``fori_loop``, / 10 (XLA
                            CPU leaves the input-gradient conv of a while body
                            with JAX's kernel dimension labels ``01oi``, i.e.
                            reverse(W) not transposed to ``01io``, and emits a
                            naive loop-nest convolution instead of the
                            library (YNNPACK / Eigen) one; cf. the open
                            jax-ml/jax#12868);
  ``convN_fwd_dx_unrolled`` the loop with ``unroll=True``, / 10;
  ``convN_fwd_dx_in_loop_hwoi`` the loop (not unrolled) with
                            ``loop_friendly_conv`` (a custom VJP computing the
                            input gradient against an explicitly transposed
                            kernel), / 10; ``convN_hwoi_max_abs_diff`` checks
                            it gives the same gradient;
  ``pool_reshape_max``   tsjax ``max_pool_2x2`` (reshape + max), fwd + bwd;
  ``pool_reduce_window`` ``flax.linen.max_pool`` (reduce_window; backward is
                         select-and-scatter), fwd + bwd;
  ``torch_pool``         ``F.max_pool2d`` fwd + bwd.

  python benchmarks/adv_train_step_profile.py                  # small_cnn
  python benchmarks/adv_train_step_profile.py --models preact_resnet18 \
      --batch 32 --repeats 2 --steps-only --out benchmarks/results/adv_train_step_profile_cpu_resnet_b32.json

Writes ``benchmarks/results/adv_train_step_profile_<backend>.json`` (or
``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
  if p not in sys.path:
    sys.path.insert(0, p)

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import adv_train_step as bench  # noqa: E402
from tsjax import losses  # noqa: E402
from tsjax.data import images  # noqa: E402
from tsjax.methods.common import ce_attack  # noqa: E402
from tsjax.models import max_pool_2x2  # noqa: E402


@contextlib.contextmanager
def unrolled_fori_loop():
  """``jax.lax.fori_loop(..., unroll=True)`` for code traced inside."""
  orig = jax.lax.fori_loop

  def fori_loop(lower, upper, body_fun, init_val, *, unroll=None):
    del unroll
    return orig(lower, upper, body_fun, init_val, unroll=True)

  jax.lax.fori_loop = fori_loop
  try:
    yield
  finally:
    jax.lax.fori_loop = orig


@jax.custom_vjp
def loop_friendly_conv(x, w):
  """3x3 stride-1 'SAME' NHWC/HWIO conv whose input gradient stays a library
  convolution inside XLA CPU while loops.

  JAX transposes a conv w.r.t. its input into ``conv(ct, reverse(w))`` with
  the kernel's I/O labels swapped (``01oi``); XLA CPU canonicalises that to
  ``01io`` outside loops but not in a while body, where it becomes a naive
  loop nest. Here the backward pass differentiates a conv written against
  an explicitly transposed copy ``swapaxes(w, 2, 3)`` with rhs spec "HWOI",
  whose transpose then has the canonical labels. Same values; a sketch of a
  possible tsjax fix (``nn.Conv(conv_general_dilated=...)``), not used by
  tsjax.
  """
  return _conv(x, w, "HWIO")


def _conv(x, w, rhs_spec):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", rhs_spec, "NHWC"))


def _lfc_fwd(x, w):
  return _conv(x, w, "HWIO"), (x, w)


def _lfc_bwd(res, ct):
  x, w = res
  w_t = jnp.swapaxes(w, 2, 3)                   # materialised HWOI copy
  dx = jax.vjp(lambda v: _conv(v, w_t, "HWOI"), x)[1](ct)[0]
  dw = jax.vjp(lambda k: _conv(x, k, "HWIO"), w)[1](ct)[0]
  return dx, dw


loop_friendly_conv.defvjp(_lfc_fwd, _lfc_bwd)


def median_ms(fn, repeats, finish=jax.block_until_ready):
  finish(fn())  # warm-up (compilation for jitted fns)
  finish(fn())
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    finish(fn())
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def profile_model(name, args, torch_device) -> dict:
  mean, std = images._STATS["cifar10"]
  config, model, params, model_state, step, make_state = bench.build_tsjax(
      name, mean, std, "float32", jax.random.key(args.seed))
  attack = bench.attack_spec(config)
  rng = np.random.default_rng(args.seed)
  imgs = rng.integers(0, 256, (args.batch, *bench.IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, bench.NUM_CLASSES, (args.batch,)).astype(np.int32)
  batch = {"image": jax.device_put(imgs), "label": jax.device_put(labels)}
  x = batch["image"].astype(jnp.float32) / 255.0
  y = batch["label"]
  sync = lambda _: bench.sync(torch_device)
  out = {}

  def report(k, v):
    out[k] = v
    print(f"  {k:<20} {v:10.1f} ms", flush=True)

  # ---- whole steps
  state = {"s": make_state()}

  def run_step(fn):
    def go():
      state["s"], m = fn(state["s"], batch, None)
      return state["s"]
    return go

  t0 = time.perf_counter()
  jax.block_until_ready(run_step(step)())
  out["compile_s_step"] = time.perf_counter() - t0
  report("step", median_ms(run_step(step), args.repeats))
  step_u = bench.clf.jit_train_step(
      bench.with_augmentation(bench.method_loss(config, model), config,
                              bench.NUM_CLASSES),
      bench.clf.make_optimizer(config.train, 100)[0])
  state["s"] = make_state()
  t0 = time.perf_counter()
  with unrolled_fori_loop():      # traced (and compiled) on the first call
    jax.block_until_ready(step_u(state["s"], batch, None))
  out["compile_s_step_unrolled"] = time.perf_counter() - t0
  print(f"  (first call incl. compilation: step {out['compile_s_step']:.1f} s,"
        f" step_unrolled {out['compile_s_step_unrolled']:.1f} s)", flush=True)
  state["s"] = make_state()
  report("step_unrolled", median_ms(run_step(step_u), args.repeats))

  tmodel = bench.torch_model(name, mean, std)
  tmodel.load_state_dict(bench.torch_state_dict(name, params, model_state))
  tmodel.to(torch_device)
  tstep = bench.TorchAdvStep(tmodel, attack, config.train, torch_device, False)
  x_u8_t = torch.from_numpy(np.ascontiguousarray(
      imgs.transpose(0, 3, 1, 2))).to(torch_device)
  y_t = torch.from_numpy(labels.astype(np.int64)).to(torch_device)
  report("torch_step", median_ms(lambda: tstep(x_u8_t, y_t), args.repeats,
                                 sync))

  if args.steps_only:
    return out

  # ---- attack pieces (fixed parameters)
  variables = {"params": params, **model_state}
  key = jax.random.key(1)

  # Everything enters the jitted functions as an argument (closed-over arrays
  # would be XLA constants and get constant-folded).
  def iteration(variables, x, y, delta):
    def loss(d):
      return losses.cross_entropy(model.apply(variables, x + d, train=False), y)
    vals, vjp = jax.vjp(loss, delta)
    g = vjp(jnp.ones_like(vals))[0]
    delta = jnp.clip(delta + attack.step_size * jnp.sign(g), -attack.eps,
                     attack.eps)
    return jnp.clip(x + delta, 0.0, 1.0) - x

  it = jax.jit(iteration)
  d0 = jnp.zeros_like(x)

  def ten():
    d = d0
    for _ in range(attack.steps):
      d = it(variables, x, y, d)
    return d

  report("attack_iter", median_ms(lambda: it(variables, x, y, d0),
                                  args.repeats))
  report("attack_iter_x10", median_ms(ten, args.repeats))
  attack_fn = lambda p, ms, x, y, k: ce_attack(model, p, ms, x, y, k, attack)
  att = jax.jit(attack_fn)
  report("attack_fori", median_ms(
      lambda: att(params, model_state, x, y, key), args.repeats))
  # A distinct function object: jax.jit caches traces per function, so
  # jit(attack_fn) again would reuse the fori_loop trace.
  att_u = jax.jit(lambda p, ms, x, y, k: ce_attack(model, p, ms, x, y, k,
                                                   attack))
  with unrolled_fori_loop():
    jax.block_until_ready(att_u(params, model_state, x, y, key))
  report("attack_unrolled", median_ms(
      lambda: att_u(params, model_state, x, y, key), args.repeats))
  x_t = x_u8_t.float() / 255.0
  report("torch_attack", median_ms(lambda: tstep.attack(x_t, y_t),
                                   args.repeats, sync))

  # ---- layer pieces at the small CNN's shapes
  if name == "small_cnn":
    for label, (h, cin, cout) in {"conv1": (32, 3, 32),
                                  "conv2": (16, 32, 64)}.items():
      k = jax.random.normal(jax.random.key(2), (3, 3, cin, cout)) * 0.1
      xin = jax.random.uniform(jax.random.key(3), (args.batch, h, h, cin))
      ct = jax.random.normal(jax.random.key(4), (args.batch, h, h, cout))
      conv = lambda z, k: jax.lax.conv_general_dilated(
          z, k, (1, 1), ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))

      def dx(z, k, ct):   # forward, ReLU, gradient w.r.t. the conv input
        out, vjp = jax.vjp(lambda v: jnp.sum(jax.nn.relu(conv(v, k)) * ct), z)
        return vjp(jnp.ones_like(out))[0]

      def dx_hwoi(z, k, ct):   # same gradient via loop_friendly_conv
        f = lambda v: jnp.sum(jax.nn.relu(loop_friendly_conv(v, k)) * ct)
        out, vjp = jax.vjp(f, z)
        return vjp(jnp.ones_like(out))[0]

      body = lambda i, c, k, ct: c + 1e-3 * dx(c, k, ct)
      body_hwoi = lambda i, c, k, ct: c + 1e-3 * dx_hwoi(c, k, ct)
      loop_hwoi = jax.jit(lambda z, k, ct: jax.lax.fori_loop(
          0, 10, lambda i, c: body_hwoi(i, c, k, ct), z))
      diff = float(jnp.max(jnp.abs(jax.jit(dx)(xin, k, ct) -
                                   jax.jit(dx_hwoi)(xin, k, ct))))
      out[f"{label}_hwoi_max_abs_diff"] = diff
      one = jax.jit(dx)
      loop = jax.jit(lambda z, k, ct: jax.lax.fori_loop(
          0, 10, lambda i, c: body(i, c, k, ct), z))
      unrolled = jax.jit(lambda z, k, ct: jax.lax.fori_loop(
          0, 10, lambda i, c: body(i, c, k, ct), z, unroll=True))
      report(f"{label}_fwd_dx", median_ms(lambda: one(xin, k, ct),
                                          args.repeats))
      report(f"{label}_fwd_dx_in_loop",
             median_ms(lambda: loop(xin, k, ct), args.repeats) / 10)
      report(f"{label}_fwd_dx_unrolled",
             median_ms(lambda: unrolled(xin, k, ct), args.repeats) / 10)
      report(f"{label}_fwd_dx_in_loop_hwoi",
             median_ms(lambda: loop_hwoi(xin, k, ct), args.repeats) / 10)
    for label, shape in {"pool1": (args.batch, 32, 32, 32),
                         "pool2": (args.batch, 16, 16, 64)}.items():
      z = jax.random.normal(jax.random.key(5), shape)
      ct = jax.random.normal(jax.random.key(6), (shape[0], shape[1] // 2,
                                                 shape[2] // 2, shape[3]))
      import flax.linen as nn
      pools = {"reshape_max": max_pool_2x2,
               "reduce_window": lambda v: nn.max_pool(v, (2, 2), (2, 2))}
      for pname, pool in pools.items():
        f = jax.jit(lambda v, ct, pool=pool: jax.vjp(pool, v)[1](ct)[0])
        report(f"{label}_{pname}", median_ms(lambda: f(z, ct), args.repeats))
      zt = torch.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy()).to(
          torch_device)
      ctt = torch.from_numpy(np.asarray(ct).transpose(0, 3, 1, 2).copy()).to(
          torch_device)

      def tpool(zt=zt, ctt=ctt):
        v = zt.clone().requires_grad_(True)
        return torch.autograd.grad(F.max_pool2d(v, 2), v, ctt)[0]

      report(f"{label}_torch", median_ms(tpool, args.repeats, sync))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="small_cnn")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--batch", type=int, default=bench.BATCH)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps-only", action="store_true",
                 help="time only step / step_unrolled / torch_step")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  models_ = [m.strip() for m in args.models.split(",") if m.strip()]
  torch.set_num_threads(os.cpu_count())
  torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if torch_device.type == "cuda":
    torch.backends.cudnn.benchmark = True
  machine = bench.machine_info(torch_device)
  machine["loadavg_before"] = list(os.getloadavg())
  print(f"backend {jax.default_backend()}, torch {torch_device} "
        f"({torch.get_num_threads()} threads), batch {args.batch}, load "
        f"{machine['loadavg_before']}", flush=True)
  res = {}
  for m in models_:
    print(f"\n{m} (median of {args.repeats}):", flush=True)
    res[m] = profile_model(m, args, torch_device)
  machine["loadavg_after"] = list(os.getloadavg())
  path = pathlib.Path(args.out) if args.out else (
      ROOT / "benchmarks" / "results" /
      f"adv_train_step_profile_{machine['backend']}.json")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({
      "benchmark": "adv_train_step_profile",
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": " ".join(["python benchmarks/adv_train_step_profile.py",
                           *(sys.argv[1:] if argv is None else argv)]),
      "batch": args.batch, "repeats": args.repeats, "dtype": "float32",
      "unit": "ms (median)", "machine": machine, "results": res},
      indent=2) + "\n")
  print(f"\nsaved {path} (load before/after {machine['loadavg_before']} / "
        f"{machine['loadavg_after']})")


if __name__ == "__main__":
  main()

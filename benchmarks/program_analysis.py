"""The paper-scale training steps, compiled and analysed without running them.

For each paper variant's step (``configs/adv_train.py``'s CIFAR-10 recipe of
the method; student ResNet-18 or WRN-34-10; batch 128 of 32x32x3; float32
or bfloat16 compute, ``train.compute_dtype``) this lowers and compiles the
jitted training step (augmentation, attack and update included) and reports
from the compiled program:

* **FLOPs** (``compiled.cost_analysis()``) against the **analytic count**:
  the passes the method needs (below, from its recipe) times the cost of
  each kind of pass, measured on the same backend from programs of one pass
  each: a forward pass (eval or train mode), a forward + input-gradient pass
  (one attack step) and a forward + parameter-gradient pass (a trained
  term). ``excess`` = step / analytic - 1: anything above a few percent
  (losses, the optimizer and augmentation are in the step only) is a pass
  that should not be there; passes the reference code runs and the method
  does not need are listed as ``named`` and counted in the analytic total.
  On the CPU backend the attack loops are unrolled (``tsjax.attacks.pgd``),
  so XLA counts every step; XLA counts a remaining while-loop body once,
  which is why the step's HLO must hold no loop over a convolution or a dot
  (``conv_loops``, 0 in every row).
* **Memory** (``compiled.memory_analysis()``): arguments (parameters,
  optimizer and batch-norm state, batch) + temporaries, and the largest
  per-device batch that fits ``--memory-gb`` (80 GB) if the temporaries grow
  linearly with the batch. XLA:CPU computes bfloat16 convolutions in
  float32, so on this backend the bfloat16 temporaries are an upper bound.
* **Compile seconds** (lowering and XLA compilation separately).

The passes each method needs per step (K attack steps; S student, T
teacher, P peer; ``f`` forward, ``gi`` forward + input gradient, ``gp``
forward + parameter gradient; modes: the attack's ``bn_mode``, eval for
frozen networks, train for trained terms):

  pgd_at       K gi(S) + gp(S)              [+ f_train(S): Rice's clean BN pass]
  trades       f(S) + K gi(S) + 2 gp(S)     [+ gp(S): the reference's third pass]
  ard          f(T) + K gi(S) + 2 gp(S)
  rslad        f(T) + K gi(S) + 2 gp(S)
  iad          2 f(T) + K gi(S) + 2 gp(S)     [+ 2 f_train(S): IAD-I.py's detached
                                               student passes, kept for their BN statistics]
  peeraid      f(P) + K gi(S) + gp(P) + 2 gp(S)  [+ gp(S): S(x*) twice, main.py]
  advfunmatch  K (gi(S) + gi(T)) + f(T) + gp(S)  [+ f(S) + f(T): keep_best]

  python benchmarks/program_analysis.py                 # every row (~1 h on 2 CPU cores)
  python benchmarks/program_analysis.py --models resnet18 --methods pgd_at --dtypes float32
  python benchmarks/program_analysis.py --quick         # tiny widths: seconds (CI)
  python benchmarks/program_analysis.py --table         # RESULTS.md table of the JSON

Results: ``benchmarks/results/program_analysis_<backend>.json`` and, with
``--markdown``, a table appended to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common  # noqa: E402
from experiments import train as exp  # noqa: E402
from tsjax import methods, models  # noqa: E402
from tsjax.configs.adv_train import get_config  # noqa: E402
from tsjax.methods.common import forward  # noqa: E402
from tsjax.methods.distill import teacher_ctx  # noqa: E402
from tsjax.train import TrainState  # noqa: E402
from tsjax.train import classifier as clf  # noqa: E402

METHODS = ("pgd_at", "trades", "ard", "rslad", "iad", "peeraid", "advfunmatch")
# name -> (registry name, kwargs); --quick: the same families, tiny.
STUDENTS = {"resnet18": ("resnet18", {}), "wrn34_10": ("wrn34_10", {}),
            "small_cnn": ("small_cnn", {})}
QUICK = {"resnet18": ("resnet18", {"width": 4}),
         "wrn34_10": ("wide_resnet", {"depth": 10, "widen_factor": 1}),
         "small_cnn": ("small_cnn", {"features": (4, 8), "hidden": 8})}
BATCH = 128


def needed_passes(config) -> tuple[list, list]:
  """``(needed, named)``: lists of ``(network, kind, mode, count)`` of the
  method's step (see the module docstring); ``named``: the passes the
  reference code runs beyond the method's need."""
  m, att = config.method.name, config.method.attack
  k, am = int(att.steps), att.bn_mode
  opts = config.method.options
  named = []
  if m == "pgd_at":
    need = [("S", "gi", am, k), ("S", "gp", "train", 1)]
    if opts.get("clean_bn_pass"):
      named.append(("S", "f", "train", 1))
  elif m == "trades":
    need = [("S", "f", "eval", 1), ("S", "gi", am, k), ("S", "gp", "train", 2)]
    if opts.get("recompute_clean", True):
      named.append(("S", "gp", "train", 1))
  elif m in ("ard", "rslad"):
    need = [("T", "f", "eval", 1), ("S", "gi", am, k), ("S", "gp", "train", 2)]
  elif m == "iad":
    need = [("T", "f", "eval", 2), ("S", "gi", am, k), ("S", "gp", "train", 2)]
    named.append(("S", "f", "train", 2))
  elif m == "peeraid":
    need = [("P", "f", "eval", 1), ("S", "gi", am, k), ("P", "gp", "train", 1),
            ("S", "gp", "train", 2)]
    named.append(("S", "gp", "train", 1))
  elif m == "advfunmatch":
    need = [("S", "gi", am, k), ("T", "gi", "eval", k), ("T", "f", "eval", 1),
            ("S", "gp", "train", 1)]
    if att.keep_best:
      named += [("S", "f", am, 1), ("T", "f", "eval", 1)]
    if opts.get("clean_pass") or opts.get("clean_weight"):
      named.append(("S", "gp" if opts.get("clean_weight") else "f",
                    "train", 1))
  else:
    raise ValueError(f"no pass count for method {m!r}")
  return need, named


def _data():
  return types.SimpleNamespace(
      image_shape=(32, 32, 3), num_classes=10, mean=(0.49, 0.48, 0.45),
      std=(0.25, 0.24, 0.26), images=np.zeros((BATCH, 32, 32, 3), np.uint8),
      labels=np.zeros((BATCH,), np.int32))


def paper_config(method: str, student: str, dtype: str, quick: bool):
  config = get_config(f"cifar10,{method}")
  config.model.name, kwargs = (QUICK if quick else STUDENTS)[student]
  config.model.kwargs = dict(kwargs)
  config.train.compute_dtype = dtype
  if quick:
    config.teacher.model.name = "resnet18"
    config.teacher.model.kwargs = {"width": 4}
  return config


def _teacher(config, data, key):
  if not methods.get(config.method.name).needs_teacher:
    return None
  t = config.teacher.model
  model = models.get_model(t.name, num_classes=data.num_classes,
                           mean=data.mean, std=data.std, **t.kwargs.to_dict())
  params, state = clf.init_model(model, key, data.image_shape)
  return model, teacher_ctx(params, state)


def _timed_compile(fn, *args):
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


def conv_loops(hlo: str) -> int:
  """While loops of a compiled HLO module whose body holds a convolution or
  a dot (XLA's cost analysis counts a loop body once, so those would be
  undercounted; loops without one are XLA's own elementwise loops)."""
  comps = {}
  for block in hlo.split("\n\n"):
    m = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s", block)
    if m:
      comps[m.group(1)] = block
  bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
  return sum(1 for b in bodies if re.search(r" (convolution|dot)\(",
                                            comps.get(b, "")))


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan")))


def pass_costs(model, params, state, x, dtype: str) -> dict:
  """FLOPs of one pass of each kind: ``{(kind, mode): flops}``."""
  m = models.with_compute_dtype(model, dtype)
  sg = jax.lax.stop_gradient

  def f(mode):
    return lambda p, s, x: forward(m, sg(p), s, x, mode == "train")[0].sum()

  costs = {}
  for mode in ("eval", "train"):
    costs[("f", mode)] = jax.jit(f(mode))
    costs[("gi", mode)] = jax.jit(jax.grad(f(mode), argnums=2))
    costs[("gp", mode)] = jax.jit(jax.grad(
        lambda p, s, x, mode=mode: forward(m, p, s, x, mode == "train")[0].sum()))
  return {k: _flops(fn.lower(params, state, x).compile())
          for k, fn in costs.items()}


def time_steps(compiled, state, batch, ctx, n: int) -> float | None:
  """Median seconds of ``n`` runs of the compiled step (after one untimed
  run); None for ``n = 0``. On the CPU backend a paper step takes minutes."""
  if n <= 0:
    return None
  state, _ = compiled(state, batch, ctx)
  jax.block_until_ready(state)
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    state, _ = compiled(state, batch, ctx)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def analyse(method: str, student: str, dtype: str, *, quick: bool,
            memory_gb: float, timed_steps: int = 0) -> dict:
  config = paper_config(method, student, dtype, quick)
  data = _data()
  key = jax.random.key(0)
  model = exp.make_model(config, data)
  teacher = _teacher(config, data, jax.random.fold_in(key, 1))
  built = exp.build(config, model, data, key, teacher)
  opt, _ = clf.make_optimizer(config.train, 390)
  state = TrainState.create(built.params, opt, jax.random.key(1),
                            built.model_state)
  step = clf.jit_train_step(exp.with_augmentation(
      built.loss_fn, config, data.num_classes), opt)
  batch = {"image": jnp.zeros((BATCH, 32, 32, 3), jnp.uint8),
           "label": jnp.zeros((BATCH,), jnp.int32),
           "epoch": jnp.zeros((), jnp.int32)}
  compiled, t_lower, t_compile = _timed_compile(step, state, batch, built.ctx)
  flops = _flops(compiled)
  hlo = compiled.as_text()
  mem = compiled.memory_analysis()
  step_s = time_steps(compiled, state, batch, built.ctx, timed_steps)

  x = jnp.zeros((BATCH, 32, 32, 3), jnp.float32)
  view = built.view or (lambda p, s: (p, s))
  s_params, s_state = view(built.params, built.model_state)
  nets = {"S": pass_costs(model, s_params, s_state, x, dtype)}
  if method == "peeraid":
    nets["P"] = pass_costs(model, built.params["peer"],
                           built.model_state["peer"], x, dtype)
  if teacher is not None:
    t_vars = next(iter(teacher[1].values()))
    nets["T"] = pass_costs(teacher[0], t_vars["params"],
                           t_vars["model_state"], x, dtype)
  need, named = needed_passes(config)
  total = lambda passes: sum(n * nets[net][(kind, mode)]
                             for net, kind, mode, n in passes)
  analytic, extra = total(need), total(named)
  args = mem.argument_size_in_bytes
  temp = mem.temp_size_in_bytes
  per_example = temp / BATCH
  return {
      "method": method, "student": student, "dtype": dtype,
      "teacher": config.teacher.model.name if teacher else None,
      "batch": BATCH, "attack_steps": int(config.method.attack.steps),
      "flops": flops, "analytic_flops": analytic, "named_flops": extra,
      "excess": flops / (analytic + extra) - 1.0,
      "named": [f"{n} {kind}_{mode}({net})" for net, kind, mode, n in named],
      "conv_loops": conv_loops(hlo),
      "argument_bytes": args, "temp_bytes": temp,
      "peak_bytes": args + temp + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes,
      "max_batch": int((memory_gb * 1e9 - args) // per_example)
                   if per_example else None,
      "lower_s": t_lower, "compile_s": t_compile, "step_s": step_s,
      "tflop_per_s": flops / step_s / 1e12 if step_s else None,
      "pass_flops": {net: {f"{k}_{m}": v for (k, m), v in c.items()}
                     for net, c in nets.items()},
  }


# Datasheet peaks of one H100 SXM (dense): the floor of a step's time is its
# FLOPs over these (GPU rows stay "not measured" until a GPU runs the suite).
H100_PEAK_TFLOPS = {"float32": 67.0, "bfloat16": 989.0}


def markdown(rows, machine) -> list[str]:
  lines = ["", f"## Program analysis of the paper steps "
           f"(`benchmarks/program_analysis.py`, {machine['backend']}, "
           f"{machine['cpu_model'] or machine['device_kind']})", "",
           "Batch 128 of 32x32x3, CIFAR-10 recipes (teachers WRN-34-10). "
           "Analytic = the passes the method needs; named = passes the "
           "reference runs beyond that (counted in the excess). Peak memory "
           "and compile seconds are XLA:CPU's (bf16 convolutions computed in "
           "f32 there); the H100 floor is FLOPs / datasheet peak "
           f"({H100_PEAK_TFLOPS['float32']:g} TFLOP/s f32, "
           f"{H100_PEAK_TFLOPS['bfloat16']:g} bf16 dense); H100 step time: "
           "not measured.", "",
           "| method | student | dtype | step TFLOP | analytic (+named) | "
           "excess | named | conv loops | peak GB | max batch / 80 GB | "
           "lower + compile s | H100 floor ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    floor = r["flops"] / (H100_PEAK_TFLOPS[r["dtype"]] * 1e12) * 1e3
    lines.append(
        f"| {r['method']} | {r['student']} | {r['dtype']} | "
        f"{r['flops'] / 1e12:.3f} | {r['analytic_flops'] / 1e12:.3f} "
        f"(+{r['named_flops'] / 1e12:.3f}) | {100 * r['excess']:+.1f}% | "
        f"{', '.join(r['named']) or '-'} | {r['conv_loops']} | "
        f"{r['peak_bytes'] / 1e9:.2f} | "
        f"{r['max_batch']} | {r['lower_s']:.0f} + {r['compile_s']:.0f} | "
        f"{floor:.1f} |")
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--models", default="resnet18,wrn34_10")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--memory-gb", type=float, default=80.0)
  p.add_argument("--quick", action="store_true",
                 help="width-4 networks: checks the script in seconds")
  p.add_argument("--time-steps", type=int, default=0,
                 help="also run each compiled step this many times and "
                      "report its seconds and achieved TFLOP/s (on an "
                      "accelerator)")
  p.add_argument("--markdown", action="store_true",
                 help="append the table to benchmarks/RESULTS.md")
  p.add_argument("--out", default=None)
  p.add_argument("--table", action="store_true",
                 help="compile nothing: append the table of the rows already "
                      "in the results JSON to benchmarks/RESULTS.md")
  args = p.parse_args(argv)
  args.argv = argv if argv is not None else sys.argv[1:]
  machine = _common.machine_info()
  path, data, command = _common.open_results("program_analysis", machine, args)
  if args.table:
    rows = list(data["runs"].values())
    _common.append_to_results_md(markdown(rows, rows[0]["machine"]))
    return rows
  rows = []
  for student in args.models.split(","):
    for method in args.methods.split(","):
      for dtype in args.dtypes.split(","):
        r = analyse(method, student, dtype, quick=args.quick,
                    memory_gb=args.memory_gb, timed_steps=args.time_steps)
        rows.append(r)
        print(f"{method:12s} {student:9s} {dtype:9s} "
              f"{r['flops'] / 1e12:8.3f} TFLOP (analytic "
              f"{r['analytic_flops'] / 1e12:.3f} + named "
              f"{r['named_flops'] / 1e12:.3f}, excess "
              f"{100 * r['excess']:+.1f}%) conv loops {r['conv_loops']} peak "
              f"{r['peak_bytes'] / 1e9:.2f} GB max batch {r['max_batch']} "
              f"compile {r['lower_s']:.1f}+{r['compile_s']:.1f} s"
              + (f" step {r['step_s'] * 1e3:.1f} ms "
                 f"({r['tflop_per_s']:.1f} TFLOP/s)" if r["step_s"] else ""),
              flush=True)
        data["runs"][f"{method}/{student}/{dtype}"] = {
            **r, "command": command, "machine": machine}
        _common.write_results(path, data)
  if args.markdown:
    _common.append_to_results_md(markdown(rows, machine))
  return rows


if __name__ == "__main__":
  main()

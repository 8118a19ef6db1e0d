"""The teacher–student study protocol end to end: tsjax vs eager PyTorch.

What a user runs, timed from the outside:

* **tsjax**: ``python -m experiments.teacher_student --config
  configs/teacher_student.py --config.regimes=standard,pgd_at,offsubspace
  --config.num_seeds=N --config.dtype=float32 --workdir <fresh dir>`` as a
  subprocess (all N seeds at once, as the experiment runs them), twice:
  **cold** (``JAX_COMPILATION_CACHE_DIR`` set to a fresh, empty directory:
  every program compiles) and **warm** (the same cache directory again, which
  the cold run filled; JAX's default cache thresholds). Each run gets a fresh
  work dir, so nothing resumes from a checkpoint. The wall time includes
  Python start-up, imports, compiling, training (checkpoints included),
  evaluation and the report (summary with bootstrap intervals of the
  Spearman correlations, plots) -- everything the command does. The
  PyTorch side computes the per-run metrics but no summary statistics or
  plots; the JSON records the tsjax report's share (``report_s``: last
  evaluation line to exit).
* **PyTorch**: an independent eager implementation of the same protocol,
  written here (``--torch-worker`` mode of this file, also a subprocess,
  importing torch and numpy only), seeds one after another as in Tian's
  luckmatters code. Per seed: its own subspace U (QR of a Gaussian), Tian
  teacher (distinct patterns of {-1, -0.75, ..., 1}, unit-norm fan-in
  columns, fan-out row i divided by (i + 1)^p, biases -0.1), low-rank
  training and evaluation inputs, full-rank evaluation inputs, student init
  N(0, init_std^2) with zero biases; then per regime (same teacher, data,
  initial student and batch order within a seed): ``train.steps`` plain SGD
  steps on batches of ``train.batch_size`` drawn with replacement, loss
  ``0.5 ||student(x) - teacher(x)||^2`` (batch mean), with

  - standard: clean inputs;
  - pgd_at: inputs replaced by l2 PGD (uniform start in the ball,
    ``adv.steps`` normalised-gradient steps of ``adv.step_frac * eps``, the
    best iterate kept; gradient through the student only, as tsjax's
    ``disagreement`` stops it at the teacher), target = teacher there;
  - offsubspace: each example moved with probability ``offsubspace.fraction``
    to ``x + scale * P_perp xi``, ``xi ~ N(0, I_d)``, labelled by the teacher;

  then the evaluation tsjax's ``TeacherStudent.evaluate`` computes:
  per-neuron teacher–student Pearson correlations of the hidden layer on the
  in-subspace and full-rank evaluation points (best match per teacher node,
  mean over active nodes, counts above ``eval.thresholds``), first-layer
  drift off span(U) and inside it, clean MSE / argmax error / teacher
  variance on both point sets, and robust MSE for every restriction in
  ``eval.attacks`` (full / in-subspace / orthogonal): l2 PGD with radius
  ``eval.eps_frac * sigma sqrt(k)``, ``eval.steps`` steps of ``eval.step_frac
  * eps``, ``eval.restarts`` restarts (batched: the points repeated once per
  restart) and the best per example kept, on the ``data.n_eval`` in-subspace
  points. All settings are read from ``configs/teacher_student.py`` (with
  the same overrides as the tsjax command), float32 throughout.

  PyTorch runs with ``torch.set_num_threads(os.cpu_count())`` and with 1
  thread (``--torch-threads``), each on the smallest seed count; the faster is
  the reference, and it alone runs the larger seed counts: one sequential run
  of the largest N, whose time for its first n seeds (launch to the end of
  seed n, imports included) is the time of an n-seed run.
  ``--torch-max-seeds M`` stops that run after M seeds and extrapolates
  linearly (start-up + per-seed mean x n; marked ``extrapolated``).

  ``--pairs R`` measures the smallest N R times as interleaved pairs (tsjax
  cold and warm launches, then PyTorch) and reports the median of the
  pairs' ratios: on a machine whose speed drifts (on the development VM the
  same PyTorch protocol took 174-396 s within hours) each ratio then
  compares two runs minutes apart, not tsjax's time at the start of the
  benchmark with PyTorch's at its end.

**Sanity check (not identity).** The two implementations draw different
random numbers, so the same seed gives different teachers and numbers in each
framework; what must agree is the range of the results. The script prints
the per-regime means side by side and, except with ``--quick`` (too few steps
to specialise), asserts loose agreement on the largest common N: the standard
regime's in-subspace specialization >= 0.8 in both and within 0.1 of each
other, its full-rank specialization within 0.15, its clean MSE within a
factor 10, PGD-AT's and off-subspace's full-rank specialization above the
standard regime's in both, and the standard regime's unrestricted robust
rel-MSE at least 5x PGD-AT's in both (default study, 8 seeds: ~90x; one seed of
10 000 steps already gave 0.84-0.85 in-subspace and 0.31-0.33 full-rank
specialization, 12x / 9x, in the two frameworks). A failed check exits
with status 1 (results JSON written with ``agreement_ok: false``,
RESULTS.md untouched).

Run from the repository root::

  python benchmarks/ts_protocol.py                      # N = 3, 8, 32
  python benchmarks/ts_protocol.py --seeds 3            # the issue's protocol
  python benchmarks/ts_protocol.py --seeds 3 --pairs 3  # ... 3 interleaved pairs
  python benchmarks/ts_protocol.py --torch-max-seeds 8   # N=32 extrapolated
  python benchmarks/ts_protocol.py --quick              # ~1-2 min sanity run

Results: a table on stdout, ``benchmarks/results/ts_protocol_<backend>.json``
(one row per N) and a section appended to ``benchmarks/RESULTS.md`` (machine,
command, times, ratios; ``--no-results-md`` skips it). ``--quick`` (N = 2,
400 steps, 256 evaluation points, 2 restarts of 5 steps) writes
``ts_protocol_<backend>_quick.json`` and never touches RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
  if _p not in sys.path:
    sys.path.insert(0, _p)

# Nothing heavy at import time: the PyTorch worker (``--torch-worker``) must
# not pay for (or be slowed by) JAX. The driver imports JAX lazily.

REGIMES = ("standard", "pgd_at", "offsubspace")
DTYPE = "float32"
DEFAULT_SEEDS = "3,8,32"
QUICK_SEEDS = "2"
QUICK_SET = {"train.steps": 400, "data.n_train": 1000, "data.n_eval": 256,
             "eval.restarts": 2, "eval.steps": 5}
# Metrics compared side by side (means over seeds, per regime).
COMPARE = ("spec_in/mean_best", "spec_full/mean_best", "drift_perp",
           "clean_in/mse", "clean_in/cls_error", "robust_full/rel_mse",
           "robust_in/rel_mse", "robust_orth/rel_mse")
TSJAX_ECHO = ("teacher-student study", "round", "evaluation", "done in",
              "config error", "Traceback")


# ====================================================================== torch
# The PyTorch side. ``torch`` is bound by ``torch_worker`` (the driver never
# imports it).
torch = None


def _restrict(v, U, restrict):
  if restrict is None:
    return v
  inside = (v @ U) @ U.T
  return inside if restrict == "in" else v - inside


def _project_l2(v, eps):
  n = v.norm(dim=1, keepdim=True)
  return v * torch.clamp(eps / (n + 1e-12), max=1.0)


class TorchProblem:
  """One seed's subspace, teacher, data and initial student (float32)."""

  def __init__(self, cfg, seed):
    d, k = int(cfg["data"]["d"]), int(cfg["data"]["k"])
    sigma = float(cfg["data"]["sigma"])
    m = int(cfg["teacher"]["widths"][0])
    c = int(cfg["teacher"]["outputs"])
    g = torch.Generator().manual_seed(1_000_003 * seed + 17)
    q, r = torch.linalg.qr(torch.randn(d, k, generator=g))
    self.U = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    self.d, self.k = d, k
    self.x_train = sigma * torch.randn(int(cfg["data"]["n_train"]), k,
                                       generator=g) @ self.U.T
    n_eval = int(cfg["data"]["n_eval"])
    self.x_eval = sigma * torch.randn(n_eval, k, generator=g) @ self.U.T
    self.x_full = sigma * math.sqrt(k / d) * torch.randn(n_eval, d,
                                                         generator=g)
    p = float(cfg["teacher"]["strength_decay"])
    bias = float(cfg["teacher"]["bias"])
    w1 = _patterns(m, d, g).T                          # [d, m] fan-in columns
    self.w1 = w1 / w1.norm(dim=0, keepdim=True)
    self.b1 = torch.full((m,), bias)
    strength = (torch.arange(m, dtype=torch.float32) + 1.0) ** p
    self.w2 = _patterns(c, m, g).T / strength[:, None]  # [m, c]
    self.b2 = torch.full((c,), bias)
    n = int(cfg["student"]["multi"]) * m
    self.student0 = torch_student(d, n, c, float(cfg["student"]["init_std"]), g)

  def teacher_hidden(self, x):
    return torch.relu(x @ self.w1 + self.b1)

  def teacher(self, x):
    return self.teacher_hidden(x) @ self.w2 + self.b2


def _patterns(rows, cols, g, levels=9):
  """``rows`` distinct non-zero rows of entries in {-1, -0.75, ..., 1}."""
  half = (levels - 1) / 2
  draw = lambda shape: (torch.randint(0, levels, shape, generator=g).float()
                        - half) / half
  p = draw((rows, cols))
  for _ in range(100):
    bad = [i for i in range(rows) if not p[i].any() or any(
        torch.equal(p[i], p[j]) for j in range(i))]
    if not bad:
      return p
    for i in bad:
      p[i] = draw((cols,))
  raise RuntimeError("could not draw distinct teacher patterns")


def torch_student(d, n, c, init_std, g):
  """Two-layer ReLU student as a PyTorch user writes it: ``nn.Sequential``
  of Linear-ReLU-Linear, weights N(0, init_std^2), zero biases."""
  net = torch.nn.Sequential(torch.nn.Linear(d, n), torch.nn.ReLU(),
                            torch.nn.Linear(n, c))
  with torch.no_grad():
    for layer in (net[0], net[2]):
      layer.weight.copy_(init_std * torch.randn(layer.weight.shape,
                                                generator=g))
      layer.bias.zero_()
  return net


def _disagreement(net, prob, x):
  """Per-example ``0.5 ||student(x) - teacher(x)||^2``, teacher detached."""
  with torch.no_grad():
    t = prob.teacher(x)
  return 0.5 * (net(x) - t).pow(2).sum(1)


def torch_pgd_l2(net, prob, x, eps, step, steps, restarts, restrict, g):
  """l2 PGD on the disagreement: uniform start in the (restricted) ball,
  normalised-gradient steps, restriction then radial projection after each
  step, best iterate (and restart) kept per example. Restarts run batched
  (the points repeated). Returns ``(x_adv, loss at x_adv)``."""
  U, b = prob.U, x.shape[0]
  xr = x.repeat(restarts, 1) if restarts > 1 else x
  dim = {None: prob.d, "in": prob.k, "orth": prob.d - prob.k}[restrict]
  u = _restrict(torch.randn(xr.shape, generator=g), U, restrict)
  u = u / (u.norm(dim=1, keepdim=True) + 1e-12)
  r = torch.rand(xr.shape[0], 1, generator=g) ** (1.0 / dim)
  delta = _project_l2(_restrict(eps * r * u, U, restrict), eps)
  best_d = delta
  best_l = torch.full((xr.shape[0],), -math.inf)
  for _ in range(steps):
    delta.requires_grad_(True)
    loss = _disagreement(net, prob, xr + delta)
    grad, = torch.autograd.grad(loss.sum(), delta)
    with torch.no_grad():
      loss = loss.detach()
      better = loss > best_l
      best_d = torch.where(better[:, None], delta, best_d)
      best_l = torch.where(better, loss, best_l)
      grad = _restrict(grad, U, restrict)
      grad = grad / (grad.norm(dim=1, keepdim=True) + 1e-12)
      delta = _project_l2(_restrict(delta + step * grad, U, restrict), eps)
  with torch.no_grad():
    loss = _disagreement(net, prob, xr + delta)
    better = loss > best_l
    best_d = torch.where(better[:, None], delta, best_d)
    best_l = torch.where(better, loss, best_l)
    if restarts > 1:
      win = best_l.view(restarts, b).argmax(0)
      best_d = best_d.view(restarts, b, -1)[win, torch.arange(b)]
      best_l = best_l.view(restarts, b)[win, torch.arange(b)]
  return (x + best_d).detach(), best_l


def torch_train(regime, prob, cfg, seed, scales):
  """One regime's SGD run from the seed's initial student (Tian's loop)."""
  net = copy.deepcopy(prob.student0)
  t = cfg["train"]
  opt = torch.optim.SGD(net.parameters(), lr=float(t["lr"]))
  steps, bs = int(t["steps"]), int(t["batch_size"])
  # Same batch order in every regime of a seed; per-regime noise stream.
  g_batch = torch.Generator().manual_seed(7919 * seed + 1)
  g_noise = torch.Generator().manual_seed(7919 * seed + 2 + REGIMES.index(
      regime))
  idx = torch.randint(0, prob.x_train.shape[0], (steps, bs), generator=g_batch)
  x_train, U = prob.x_train, prob.U
  eps, step, adv_steps = scales["adv_eps"], scales["adv_step"], scales[
      "adv_steps"]
  off_scale, frac = scales["off_scale"], scales["off_fraction"]
  loss = None
  for i in range(steps):
    x = x_train[idx[i]]
    if regime == "pgd_at":
      x, _ = torch_pgd_l2(net, prob, x, eps, step, adv_steps, 1, None, g_noise)
    elif regime == "offsubspace":
      xi = torch.randn(x.shape, generator=g_noise)
      move = (torch.rand(bs, 1, generator=g_noise) < frac).float()
      x = x + move * off_scale * (xi - (xi @ U) @ U.T)
    with torch.no_grad():
      y = prob.teacher(x)
    loss = 0.5 * (net(x) - y).pow(2).sum(1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  return net, float(loss.detach()) if loss is not None else float("nan")


def _corr(a_t, a_s):
  """[m, n] Pearson correlations (centred, eps 1e-10 as tsjax) and the
  active teacher nodes (variance > 1e-12)."""
  dt = a_t - a_t.mean(0)
  ds = a_s - a_s.mean(0)
  m2_t, m2_s = (dt * dt).sum(0), (ds * ds).sum(0)
  c = (dt.T @ ds) * torch.rsqrt(m2_t + 1e-10)[:, None] * torch.rsqrt(
      m2_s + 1e-10)[None, :]
  return c, m2_t / a_t.shape[0] > 1e-12


def torch_evaluate(net, prob, cfg, scales, seed, regime):
  out = {}
  thresholds = torch.tensor([float(v) for v in cfg["eval"]["thresholds"]])
  net.requires_grad_(False)
  with torch.no_grad():
    for name, xs in (("in", prob.x_eval), ("full", prob.x_full)):
      c, active = _corr(prob.teacher_hidden(xs), torch.relu(net[0](xs)))
      best = c.max(1).values
      w = active.float()
      n_act = float(w.sum())
      out[f"spec_{name}/mean_best"] = float((best * w).sum()) / max(n_act, 1.0)
      above = (best[None, :] > thresholds[:, None]) & active[None, :]
      out[f"spec_{name}/count_above"] = above.sum(1).tolist()
      out[f"spec_{name}/num_active"] = float(n_act)
    w1 = net[0].weight.T                              # [d, n], tsjax layout
    w0 = prob.student0[0].weight.T
    dw = w1 - w0
    U = prob.U
    out["drift_perp"] = float((dw - U @ (U.T @ dw)).norm() / w0.norm())
    out["drift_in"] = float((U.T @ dw).norm() / w0.norm())
    for name, xs in (("in", prob.x_eval), ("full", prob.x_full)):
      s, t = net(xs), prob.teacher(xs)
      out[f"clean_{name}/mse"] = float((s - t).pow(2).mean())
      out[f"clean_{name}/cls_error"] = float(
          (s.argmax(-1) != t.argmax(-1)).float().mean())
      out[f"clean_{name}/teacher_var"] = float(t.var(0, unbiased=False).mean())
  g = torch.Generator().manual_seed(104_729 * seed + 3 + REGIMES.index(regime))
  restrict = {"full": None, "in": "in", "orth": "orth"}
  tvar = out["clean_in/teacher_var"]
  for name in cfg["eval"]["attacks"]:
    x_adv, _ = torch_pgd_l2(net, prob, prob.x_eval, scales["eval_eps"],
                            scales["eval_step"], scales["eval_steps"],
                            scales["eval_restarts"], restrict[name], g)
    with torch.no_grad():
      r = (net(x_adv) - prob.teacher(x_adv)).pow(2).mean(1).mean()
    out[f"robust_{name}/mse"] = float(r)
    out[f"robust_{name}/rel_mse"] = float(r) / tvar
  net.requires_grad_(True)
  return out


def check_torch_config(cfg):
  """The PyTorch side implements the default study's model; refuse others."""
  c = cfg
  bad = []
  if len(c["teacher"]["widths"]) != 1:
    bad.append("teacher.widths (one hidden layer only)")
  for f, v in (("teacher.centre_bias", c["teacher"]["centre_bias"]),
               ("teacher.normalise_output", c["teacher"]["normalise_output"]),
               ("data.noise_in", c["data"]["noise_in"]),
               ("data.noise_out", c["data"]["noise_out"]),
               ("train.momentum", c["train"]["momentum"]),
               ("train.weight_decay", c["train"]["weight_decay"])):
    if v:
      bad.append(f"{f} (must be 0 / False)")
  if isinstance(c["student"]["multi"], (list, tuple)):
    bad.append("student.multi (an integer multiple only)")
  for f in ("adv.norm", "eval.norm"):
    sect, key = f.split(".")
    if c[sect][key] != "l2":
      bad.append(f"{f} (l2 only)")
  if bad:
    raise SystemExit("the PyTorch protocol implements the default study only;"
                     " unsupported settings: " + ", ".join(bad))


def protocol_scales(cfg) -> dict:
  """Absolute radii and steps, as ``TeacherStudent.__init__`` derives them."""
  d, k = int(cfg["data"]["d"]), int(cfg["data"]["k"])
  x_norm = float(cfg["data"]["sigma"]) * math.sqrt(k)
  adv, ev = cfg["adv"], cfg["eval"]
  return {
      "x_norm": x_norm,
      "adv_eps": float(adv["eps_frac"]) * x_norm,
      "adv_step": float(adv["step_frac"]) * float(adv["eps_frac"]) * x_norm,
      "adv_steps": int(adv["steps"]),
      "eval_eps": float(ev["eps_frac"]) * x_norm,
      "eval_step": float(ev["step_frac"]) * float(ev["eps_frac"]) * x_norm,
      "eval_steps": int(ev["steps"]),
      "eval_restarts": int(ev["restarts"]),
      "off_scale": float(cfg["offsubspace"]["scale"]) * float(
          cfg["data"]["sigma"]) * math.sqrt(k / d),
      "off_fraction": float(cfg["offsubspace"]["fraction"]),
  }


def torch_worker(args) -> None:
  """``--torch-worker CONFIG.json``: the PyTorch protocol, seeds in turn;
  appends one JSON line per seed to ``--worker-out`` (timings, metrics and
  the wall-clock time the seed ended)."""
  global torch
  import torch as _torch
  torch = _torch
  t_imported = time.time()
  torch.set_num_threads(int(args.threads))
  cfg = json.loads(pathlib.Path(args.torch_worker).read_text())
  check_torch_config(cfg)
  scales = protocol_scales(cfg)
  regimes = list(cfg["regimes"])
  unknown = [r for r in regimes if r not in REGIMES]
  if unknown:
    raise SystemExit(f"PyTorch protocol: unknown regimes {unknown}")
  torch.manual_seed(0)
  out = pathlib.Path(args.worker_out)
  with out.open("w") as f:
    f.write(json.dumps({"kind": "start", "imported": t_imported,
                        "threads": torch.get_num_threads(),
                        "torch": torch.__version__}) + "\n")
  seed0 = int(cfg["seed"])
  for s in range(seed0, seed0 + int(args.num_seeds)):
    t0 = time.perf_counter()
    prob = TorchProblem(cfg, s)
    row = {"kind": "seed", "seed": s, "setup_s": time.perf_counter() - t0,
           "train_s": {}, "eval_s": {}, "final_loss": {}, "metrics": {}}
    for regime in regimes:
      t1 = time.perf_counter()
      net, last = torch_train(regime, prob, cfg, s, scales)
      t2 = time.perf_counter()
      row["metrics"][regime] = torch_evaluate(net, prob, cfg, scales, s,
                                              regime)
      row["eval_s"][regime] = time.perf_counter() - t2
      row["train_s"][regime] = t2 - t1
      row["final_loss"][regime] = last
    row["seed_s"] = time.perf_counter() - t0
    row["end"] = time.time()
    with out.open("a") as f:
      f.write(json.dumps(row) + "\n")
    print(f"seed {s}: {row['seed_s']:.1f} s (train " + ", ".join(
        f"{r} {row['train_s'][r]:.1f}" for r in regimes) + "; eval " +
        ", ".join(f"{r} {row['eval_s'][r]:.1f}" for r in regimes) + ")",
        flush=True)


# ===================================================================== driver
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", default=None,
                 help=f"comma-separated seed counts N (default {DEFAULT_SEEDS};"
                      f" {QUICK_SEEDS} with --quick)")
  p.add_argument("--torch-threads", default=None,
                 help="comma-separated torch.set_num_threads values tried on "
                      "the smallest N (default: os.cpu_count(),1); the "
                      "fastest is the reference for every N")
  p.add_argument("--pairs", type=int, default=1,
                 help="time the smallest N this many times as interleaved "
                      "pairs (tsjax cold + warm, then PyTorch) and report "
                      "the median of the pairs' ratios (default 1)")
  p.add_argument("--torch-max-seeds", type=int, default=0,
                 help="run the PyTorch reference for at most this many seeds"
                      " and extrapolate larger N linearly (0: run them all)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override for both sides (repeatable), e.g. "
                      "--set train.steps=3000")
  p.add_argument("--quick", action="store_true",
                 help=f"sanity run: N={QUICK_SEEDS}, {QUICK_SET}")
  p.add_argument("--keep-workdirs", action="store_true",
                 help="keep the tsjax work dirs and caches (printed)")
  p.add_argument("--no-results-md", action="store_true",
                 help="do not append a section to benchmarks/RESULTS.md")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/"
                      "ts_protocol_<backend>[_quick].json)")
  # PyTorch worker mode (internal).
  p.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--num-seeds", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  a.argv = list(sys.argv[1:] if argv is None else argv)
  if a.torch_worker:
    return a
  a.seeds = sorted({int(s) for s in (a.seeds or (
      QUICK_SEEDS if a.quick else DEFAULT_SEEDS)).split(",") if s.strip()})
  if not a.seeds or min(a.seeds) < 1:
    p.error("--seeds takes positive integers")
  threads = a.torch_threads or f"{os.cpu_count()},1"
  a.torch_threads = list(dict.fromkeys(int(t) for t in threads.split(",")
                                       if t.strip()))
  if not a.torch_threads or min(a.torch_threads) < 1:
    p.error("--torch-threads takes positive integers")
  if a.pairs < 1:
    p.error(f"--pairs takes a positive integer, got {a.pairs}")
  overrides = dict(QUICK_SET) if a.quick else {}
  for item in a.set:
    if "=" not in item:
      p.error(f"--set takes FIELD=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    overrides[k.strip()] = v.strip()
  a.overrides = overrides
  return a


def _parse_value(v):
  if isinstance(v, str):
    for cast in (int, float):
      try:
        return cast(v)
      except ValueError:
        pass
    if v in ("True", "False"):
      return v == "True"
  return v


def build_config(overrides: dict, num_seeds: int):
  """The study config both sides run: defaults, the protocol's fields, then
  the overrides (checked by TeacherStudent's validation)."""
  from tsjax.configs.teacher_student import get_config
  c = get_config("")
  c.regimes = REGIMES
  c.num_seeds = int(num_seeds)
  c.dtype = DTYPE
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = c
    for q in parents:
      node = node[q]
    if leaf not in node:
      raise SystemExit(f"--set {path}: no such config field")
    node[leaf] = _parse_value(value)
  return c


def tsjax_command(n: int, overrides: dict, workdir: str) -> list[str]:
  cmd = [sys.executable, "-m", "experiments.teacher_student", "--config",
         "configs/teacher_student.py",
         f"--config.regimes={','.join(REGIMES)}",
         f"--config.num_seeds={n}", f"--config.dtype={DTYPE}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  return cmd + ["--workdir", workdir]


def _children_cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _stream(cmd, env, echo_prefix, echo_filter=None, cwd=ROOT):
  """Runs ``cmd``; returns ``(wall_s, rc, [(t since launch, line)], cpu_s)``
  where ``cpu_s`` is the user + system CPU time of the process (all its
  threads; one child runs at a time)."""
  cpu0 = _children_cpu_s()
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)
  lines = []
  for line in proc.stdout:
    line = line.rstrip("\n")
    lines.append((time.perf_counter() - t0, line))
    if echo_filter is None or line.startswith(echo_filter):
      print(f"{echo_prefix}{line}", flush=True)
  rc = proc.wait()
  return time.perf_counter() - t0, rc, lines, _children_cpu_s() - cpu0


def _fail(what, rc, lines):
  tail = "\n".join(l for _, l in lines[-40:])
  raise SystemExit(f"{what} failed (exit {rc}); last output:\n{tail}")


def _dir_stats(path) -> dict:
  files = [p for p in pathlib.Path(path).rglob("*") if p.is_file()]
  return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def run_tsjax(n: int, overrides: dict, cache_dir: str, label: str,
              keep: bool) -> dict:
  """One launch of the experiment with a fresh work dir; wall time, the
  phases it printed and its per-seed metrics (results.jsonl)."""
  workdir = tempfile.mkdtemp(prefix=f"ts_protocol_{label}_N{n}_")
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir,
         "PYTHONUNBUFFERED": "1"}
  cmd = tsjax_command(n, overrides, workdir)
  print(f"  tsjax {label}, N={n}: {' '.join(cmd[1:])}", flush=True)
  wall, rc, lines, cpu = _stream(cmd, env, f"    [tsjax {label}] ",
                                 TSJAX_ECHO)
  if rc:
    _fail(f"tsjax {label} run (N={n})", rc, lines)
  # Training prints one line per round (one chunk of every regime, the
  # regimes side by side on their devices): "round i/n | T s | ...".
  rounds_s, eval_s = [], {}
  for _, line in lines:
    parts = [q.strip() for q in line.split("|")]
    if line.startswith("round ") and len(parts) >= 3:
      rounds_s.append(float(parts[1].split()[0]))
    elif line.startswith("evaluation |") and len(parts) >= 3:
      eval_s[parts[1]] = float(parts[2].split()[0])
  first_chunk = next((t for t, l in lines if l.startswith("round ")), None)
  last_eval = max((t for t, l in lines if l.startswith("evaluation |")),
                  default=None)
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "results.jsonl")
          .read_text().splitlines() if l.strip()]
  metrics = {}
  for r in rows:
    metrics.setdefault(r["regime"], []).append(
        {k: r[k] for k in COMPARE if k in r})
  out = {"wall_s": wall, "cpu_s": cpu, "train_rounds_s": rounds_s,
         "eval_s": eval_s,
         "train_total_s": sum(rounds_s),
         "eval_total_s": sum(eval_s.values()),
         "first_round_done_s": first_chunk,
         # after the last evaluation: summary (bootstrap Spearman), plots,
         # results files, interpreter exit
         "report_s": wall - last_eval if last_eval is not None else None,
         "cache": _dir_stats(cache_dir), "metrics": metrics,
         "command": " ".join(cmd[1:-2]), "workdir": workdir if keep else None}
  out["other_s"] = wall - out["train_total_s"] - out["eval_total_s"]
  if not keep:
    shutil.rmtree(workdir, ignore_errors=True)
  print(f"  tsjax {label}, N={n}: {wall:.1f} s, CPU {cpu:.1f} s (training "
        f"{out['train_total_s']:.1f} s, evaluation {out['eval_total_s']:.1f}"
        f" s, other {out['other_s']:.1f} s, of which report after the last "
        f"evaluation {out['report_s'] or 0:.1f} s; cache "
        f"{out['cache']['files']} files)", flush=True)
  return out


def run_torch(cfg_path: str, threads: int, num_seeds: int) -> dict:
  """The PyTorch protocol for ``num_seeds`` seeds in a subprocess;
  ``cumulative[i]`` = launch to the end of seed i (imports included)."""
  fd, out_path = tempfile.mkstemp(prefix="ts_protocol_torch_", suffix=".jsonl")
  os.close(fd)
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()),
         "--torch-worker", cfg_path, "--threads", str(threads),
         "--num-seeds", str(num_seeds), "--worker-out", out_path]
  print(f"  PyTorch, {threads} thread(s), {num_seeds} seed(s)", flush=True)
  launch = time.time()
  wall, rc, lines, cpu = _stream(
      cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, f"    [torch {threads}t] ")
  if rc:
    _fail(f"PyTorch protocol ({threads} threads)", rc, lines)
  recs = [json.loads(l) for l in pathlib.Path(out_path).read_text()
          .splitlines() if l.strip()]
  os.unlink(out_path)
  start = next(r for r in recs if r["kind"] == "start")
  seeds = [r for r in recs if r["kind"] == "seed"]
  res = {"threads": threads, "torch_threads_reported": start["threads"],
         "wall_s": wall, "cpu_s": cpu, "num_seeds": len(seeds),
         "startup_s": start["imported"] - launch,
         "cumulative_s": [r["end"] - launch for r in seeds],
         "seed_s": [r["seed_s"] for r in seeds],
         "train_s": {k: sum(r["train_s"][k] for r in seeds)
                     for k in seeds[0]["train_s"]},
         "eval_s": {k: sum(r["eval_s"][k] for r in seeds)
                    for k in seeds[0]["eval_s"]},
         "metrics": {reg: [r["metrics"][reg] for r in seeds]
                     for reg in seeds[0]["metrics"]}}
  print(f"  PyTorch, {threads} thread(s), {num_seeds} seed(s): {wall:.1f} s, "
        f"CPU {cpu:.1f} s "
        f"(training {sum(res['train_s'].values()):.1f} s, evaluation "
        f"{sum(res['eval_s'].values()):.1f} s)", flush=True)
  return res


def torch_time(run: dict, n: int) -> tuple[float, bool]:
  """Wall time of an n-seed PyTorch run from a run of >= n seeds (exact:
  launch to the end of seed n) or, beyond it, extrapolated linearly."""
  if n == run["num_seeds"]:
    return run["wall_s"], False
  if n < run["num_seeds"]:
    return run["cumulative_s"][n - 1], False
  per_seed = statistics.mean(run["seed_s"])
  start = run["cumulative_s"][0] - run["seed_s"][0]
  return start + per_seed * n + (run["wall_s"] - run["cumulative_s"][-1]), True


def summarise(metrics_by_regime: dict, n: int | None = None) -> dict:
  """``{regime: {metric: (mean, std)}}`` over the first ``n`` seeds."""
  out = {}
  for regime, rows in metrics_by_regime.items():
    rows = rows[:n] if n else rows
    out[regime] = {}
    for k in COMPARE:
      v = [float(r[k]) for r in rows if k in r]
      if v:
        out[regime][k] = (statistics.mean(v),
                          statistics.pstdev(v) if len(v) > 1 else 0.0)
  return out


def agreement(tj: dict, tt: dict) -> list[dict]:
  """The loose cross-framework checks of the module docstring."""
  m = lambda s, r, k: s[r][k][0]
  checks = []

  def add(name, ok, detail):
    checks.append({"name": name, "ok": bool(ok), "detail": detail})

  if "standard" in tj and "standard" in tt:
    a, b = m(tj, "standard", "spec_in/mean_best"), m(tt, "standard",
                                                      "spec_in/mean_best")
    add("standard spec_in >= 0.8 in both, |diff| <= 0.1",
        min(a, b) >= 0.8 and abs(a - b) <= 0.1, f"tsjax {a:.3f}, torch {b:.3f}")
    a, b = m(tj, "standard", "spec_full/mean_best"), m(tt, "standard",
                                                        "spec_full/mean_best")
    add("standard spec_full |diff| <= 0.15", abs(a - b) <= 0.15,
        f"tsjax {a:.3f}, torch {b:.3f}")
    a, b = m(tj, "standard", "clean_in/mse"), m(tt, "standard", "clean_in/mse")
    ratio = max(a, b) / max(min(a, b), 1e-30)
    add("standard clean MSE within a factor 10", ratio <= 10,
        f"tsjax {a:.2e}, torch {b:.2e}")
    for r in ("pgd_at", "offsubspace"):
      if r in tj and r in tt:
        ok = (m(tj, r, "spec_full/mean_best") > m(tj, "standard",
                                                  "spec_full/mean_best") and
              m(tt, r, "spec_full/mean_best") > m(tt, "standard",
                                                  "spec_full/mean_best"))
        add(f"{r} spec_full > standard's in both", ok,
            f"tsjax {m(tj, r, 'spec_full/mean_best'):.3f} vs "
            f"{m(tj, 'standard', 'spec_full/mean_best'):.3f}, torch "
            f"{m(tt, r, 'spec_full/mean_best'):.3f} vs "
            f"{m(tt, 'standard', 'spec_full/mean_best'):.3f}")
    if "pgd_at" in tj and "pgd_at" in tt:
      key = "robust_full/rel_mse"
      rj = m(tj, "standard", key) / max(m(tj, "pgd_at", key), 1e-30)
      rt = m(tt, "standard", key) / max(m(tt, "pgd_at", key), 1e-30)
      add("standard robust_full rel-MSE >= 5x pgd_at's in both",
          min(rj, rt) >= 5, f"tsjax {rj:.1f}x, torch {rt:.1f}x")
  return checks


def print_side_by_side(tj: dict, tt: dict, n: int) -> None:
  print(f"\nResults side by side (N = {n}; mean ± std over seeds; different "
        f"random draws per framework, so ranges, not values, should agree):")
  hdr = f"{'regime':<12} {'metric':<22} {'tsjax':>24} {'PyTorch':>24}"
  print(hdr)
  print("-" * len(hdr))
  for regime in tj:
    for k in COMPARE:
      if k in tj[regime] and k in tt.get(regime, {}):
        a, b = tj[regime][k], tt[regime][k]
        print(f"{regime:<12} {k:<22} {a[0]:>12.4g} ± {a[1]:<9.2g} "
              f"{b[0]:>12.4g} ± {b[1]:<9.2g}")


def _load(avg) -> str:
  return "n/a" if avg is None else " / ".join(f"{v:.1f}" for v in avg)


def results_md_lines(result: dict, machine: dict, command: str) -> list:
  """This run's RESULTS.md section (machine, command, ratios), as lines."""
  rows = result["rows"]
  lines = [
      "", "## Teacher–student protocol end to end "
      f"(benchmarks/ts_protocol.py), {result['timestamp']}", "",
      f"Command: `{command}` (commit {machine['git_commit'][:7]}). Machine: "
      f"{machine['cpu_model']}, {machine['cpu_count']} cores, jax "
      f"{machine['jax']}, torch {machine.get('torch', '?')}; load average "
      f"{_load(machine['loadavg_before'])} before, "
      f"{_load(machine['loadavg_after'])} after."
      f" Protocol: regimes {', '.join(REGIMES)}, {DTYPE}, "
      f"{result['config']['train']['steps']} SGD steps, evaluation on "
      f"{result['config']['data']['n_eval']} points x "
      f"{len(result['config']['eval']['attacks'])} restrictions, "
      f"{result['config']['eval']['restarts']} restarts. PyTorch reference: "
      f"{result['torch_reference_threads']} thread(s) (faster of "
      f"{result['torch_threads_tried']}). Cold = empty JAX compilation cache;"
      f" warm = second launch, same cache.", "",
      "| N seeds | tsjax cold s | tsjax warm s | PyTorch s | speed-up cold |"
      " speed-up warm | tsjax cold CPU s | tsjax warm CPU s |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    mark = " (extrapolated)" if r["torch_extrapolated"] else ""
    lines.append(f"| {r['num_seeds']} | {r['tsjax_cold_s']:.1f} | "
                 f"{r['tsjax_warm_s']:.1f} | {r['torch_s']:.1f}{mark} | "
                 f"**{r['speedup_cold']:.2f}×** | {r['speedup_warm']:.2f}× | "
                 f"{r['tsjax_cold_cpu_s']:.1f} | {r['tsjax_warm_cpu_s']:.1f} |")
  paired = [r for r in rows if r.get("pairs") and len(r["pairs"]) > 1]
  for r in paired:
    fmt = lambda k, f: ", ".join(format(p[k], f) for p in r["pairs"])
    lines += ["", f"N = {r['num_seeds']}: {len(r['pairs'])} interleaved "
              f"pairs (tsjax cold and warm launches, then PyTorch); the row "
              f"gives the medians. Cold speed-ups {fmt('speedup_cold', '.2f')}"
              f"; tsjax cold {fmt('tsjax_cold_s', '.1f')} s; PyTorch "
              f"{fmt('torch_s', '.1f')} s."]
  cores = machine["cpu_count"]
  lines += ["", f"CPU s = user + system time of the launch (all threads); "
            f"on {cores} cores no schedule can finish a launch in less than "
            f"CPU s / {cores}.", ""]
  verdict = "pass" if result["agreement_ok"] else "FAIL"
  lines.append(f"Agreement checks ({verdict}): " + "; ".join(
      f"{c['name']}: {c['detail']}" for c in result["agreement"]) + ".")
  return lines


def tsjax_cold_warm(n: int, args) -> dict:
  """A cold launch (empty compilation cache) and a warm one (same cache)."""
  cache = tempfile.mkdtemp(prefix=f"ts_protocol_jaxcache_N{n}_")
  cold = run_tsjax(n, args.overrides, cache, "cold", args.keep_workdirs)
  warm = run_tsjax(n, args.overrides, cache, "warm", args.keep_workdirs)
  if not args.keep_workdirs:
    shutil.rmtree(cache, ignore_errors=True)
  return {"cold": cold, "warm": warm,
          "cache_dir": cache if args.keep_workdirs else None}


def pair_row(pair: dict) -> dict:
  """Times and ratios of one tsjax (cold, warm) + PyTorch measurement."""
  tj, t_torch = pair["tsjax"], pair["torch"]["wall_s"]
  return {"tsjax_cold_s": tj["cold"]["wall_s"],
          "tsjax_warm_s": tj["warm"]["wall_s"],
          "tsjax_cold_cpu_s": tj["cold"]["cpu_s"],
          "tsjax_warm_cpu_s": tj["warm"]["cpu_s"],
          "torch_s": t_torch,
          "speedup_cold": t_torch / tj["cold"]["wall_s"],
          "speedup_warm": t_torch / tj["warm"]["wall_s"]}


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.torch_worker:
    torch_worker(args)
    return
  import jax
  from _common import (append_to_results_md, installed_version, loadavg,
                       machine_info, merge_rows, open_results, write_results)
  machine = machine_info()
  machine["torch"] = installed_version("torch")
  machine["loadavg_before"] = loadavg()
  t_all = time.perf_counter()
  n_max = max(args.seeds)
  config = build_config(args.overrides, n_max)
  from tsjax.train.teacher_student import TeacherStudent
  TeacherStudent(config)                      # validates the overrides
  cfg = json.loads(config.to_json())
  print(f"teacher-student protocol: regimes {', '.join(REGIMES)}, {DTYPE}, "
        f"{cfg['train']['steps']} steps, n_eval {cfg['data']['n_eval']}, "
        f"eval restarts {cfg['eval']['restarts']} x {cfg['eval']['steps']} "
        f"steps, attacks {cfg['eval']['attacks']}; N = {args.seeds}; jax "
        f"{jax.__version__} ({jax.default_backend()}), torch "
        f"{machine['torch']}, {os.cpu_count()} cores, load average "
        f"{machine['loadavg_before']}", flush=True)
  fd, cfg_path = tempfile.mkstemp(prefix="ts_protocol_cfg_", suffix=".json")
  os.close(fd)
  pathlib.Path(cfg_path).write_text(json.dumps(cfg))

  # ---- the smallest N: tsjax (cold, warm) and PyTorch in interleaved
  # pairs, the first pair also choosing PyTorch's thread count
  n_min = min(args.seeds)
  pairs, probes = [], {}
  for i in range(args.pairs):
    tj = tsjax_cold_warm(n_min, args)
    tried = args.torch_threads if i == 0 else [ref_threads]
    runs = {t: run_torch(cfg_path, t, n_min) for t in tried}
    if i == 0:
      probes = runs
      ref_threads = min(probes, key=lambda t: probes[t]["wall_s"])
    pairs.append({"tsjax": tj, "torch": runs[ref_threads]})
    print(f"  pair {i + 1}/{args.pairs}: PyTorch / tsjax cold = "
          f"{pair_row(pairs[-1])['speedup_cold']:.2f}x", flush=True)
  # ---- larger N: tsjax alone; PyTorch's reference run below
  tsjax_runs = {n_min: pairs[0]["tsjax"]}
  for n in args.seeds:
    if n != n_min:
      tsjax_runs[n] = tsjax_cold_warm(n, args)
  ref = probes[ref_threads]
  n_torch = min(n_max, args.torch_max_seeds or n_max)
  if n_torch > n_min:
    ref = run_torch(cfg_path, ref_threads, n_torch)
  os.unlink(cfg_path)

  rows = []
  for n in args.seeds:
    if n == n_min:
      per_pair = [pair_row(p) for p in pairs]
      row = {k: statistics.median(r[k] for r in per_pair)
             for k in per_pair[0]}
      row.update(torch_extrapolated=False, pairs=per_pair,
                 torch_by_threads_s={t: p["wall_s"] for t, p in probes.items()})
      src = pairs[0]["torch"]
    else:
      t_torch, extrap = torch_time(ref, n)
      row = pair_row({"tsjax": tsjax_runs[n], "torch": {"wall_s": t_torch}})
      row.update(torch_extrapolated=extrap, pairs=None,
                 torch_by_threads_s=None)
      src = ref
    rows.append({
        "num_seeds": n, **row, "torch_threads": ref_threads,
        "tsjax": tsjax_runs[n],
        "torch_breakdown": {k: src[k] for k in (
            "wall_s", "num_seeds", "startup_s", "seed_s", "train_s", "eval_s",
            "threads")},
    })

  # ---- sanity check on the largest N both sides ran in full
  n_check = max(n for n in args.seeds if n <= max(n_torch, n_min))
  tj_sum = summarise(tsjax_runs[n_check]["cold"]["metrics"])
  src = probes[ref_threads] if n_check == n_min else ref
  tt_sum = summarise(src["metrics"], n_check)
  print_side_by_side(tj_sum, tt_sum, n_check)
  checks = agreement(tj_sum, tt_sum)
  ok = all(c["ok"] for c in checks)
  note = " (not asserted with --quick)" if args.quick else ""
  print(f"\nAgreement checks{note}:")
  for c in checks:
    print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")

  machine["loadavg_after"] = loadavg()
  print("\nEnd to end, wall time (tsjax: separate launches of "
        "experiments.teacher_student; PyTorch: the faster of "
        f"{args.torch_threads} threads -> {ref_threads}):")
  hdr = (f"{'N':>4} | {'tsjax cold s':>12} | {'tsjax warm s':>12} | "
         f"{'PyTorch s':>14} | {'speed-up cold':>13} | {'speed-up warm':>13}")
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    mark = "*" if r["torch_extrapolated"] else " "
    print(f"{r['num_seeds']:>4} | {r['tsjax_cold_s']:>12.1f} | "
          f"{r['tsjax_warm_s']:>12.1f} | {r['torch_s']:>13.1f}{mark} | "
          f"{r['speedup_cold']:>12.2f}x | {r['speedup_warm']:>12.2f}x")
  if any(r["torch_extrapolated"] for r in rows):
    print(f"  * extrapolated from {n_torch} PyTorch seeds")
  for t, p in probes.items():
    print(f"  PyTorch {t} thread(s), N={n_min}: {p['wall_s']:.1f} s")

  result = {
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "regimes": list(REGIMES), "dtype": DTYPE, "quick": args.quick,
      "overrides": args.overrides, "config": cfg,
      "torch_threads_tried": args.torch_threads,
      "torch_reference_threads": ref_threads,
      "torch_max_seeds": args.torch_max_seeds,
      "agreement_seeds": n_check, "agreement": checks,
      "agreement_ok": ok, "agreement_asserted": not args.quick,
      "total_s": time.perf_counter() - t_all,
      "timing": "wall time of each launch (subprocess), start to exit",
      "rows": rows,
  }
  path, data, command = open_results("ts_protocol", machine, args)
  merge_rows(data, DTYPE, result, machine, command, "num_seeds",
             sorted({*args.seeds, *(r["num_seeds"] for r in data["runs"].get(
                 DTYPE, {}).get("rows", []))}))
  write_results(path, data)
  print(f"\nsaved {path} (total {result['total_s']:.0f} s; load average "
        f"before/after {machine['loadavg_before']} / "
        f"{machine['loadavg_after']})")
  if not args.quick and not args.no_results_md and ok:
    append_to_results_md(results_md_lines(result, machine, command))
  if not args.quick and not ok:
    raise SystemExit("the PyTorch and tsjax protocols disagree beyond the "
                     "loose checks; RESULTS.md not updated")


if __name__ == "__main__":
  main()

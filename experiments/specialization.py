r"""Specialization on real images (configs/specialization.py).

  python -m experiments.specialization --config configs/specialization.py:fashion_mnist \
      --workdir runs/specialization

1. The robust teacher: ``configs/adv_train.py:DATASET,pgd_at`` with the
   teacher's network and ``teacher.overrides``, trained by
   ``experiments.train`` in ``WORKDIR/teacher``.
2. For every method and seed, an over-realised student (the teacher's widths
   x ``student.multiple``) trained by ``experiments.train`` in
   ``WORKDIR/METHOD_sSEED`` (distillation methods from the teacher).
3. Every finished run is measured once (``measure``) and appended to
   ``WORKDIR/results.jsonl`` (one row per run; a killed study resumes run by
   run and row by row, the same seeds giving the same rows).
4. ``WORKDIR/summary.md``: the table, Spearman correlations between
   specialization (per layer, per input kind) and robust accuracy across all
   runs and within each method with at least ``eval.min_runs`` runs, each
   with a bootstrap interval and a permutation p-value; PNG plots. A study
   with every row present trains nothing and writes the summary again.

Measurements of a run's validation-selected ("best") student on the first
``eval.num_images`` test images, all in eval mode:

* specialization (``tsjax.metrics.image_specialization``; conv channels with
  spatial positions as samples, see there why): mean over teacher units of
  the best student correlation, per hidden layer, on clean images (``clean``),
  on images moved off the training images' PCA subspace by Gaussian noise in
  its complement on the surface of the attack's L-inf ball (``off``), and on
  the student's own unrestricted PGD examples (``adv``);
* accuracy clean and under PGD (``eval.pgd_steps`` steps, L-inf
  ``eval.eps``, no [0, 1] box so that restricted and unrestricted attacks
  search the same ball) unrestricted (``pgd``), inside the subspace
  (``pgd_in``) and in its complement (``pgd_orth``); AutoAttack (boxed, from
  the training run).
"""

from __future__ import annotations

import functools
import json
import os
import platform

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np

from . import common, train
from tsjax import config_checks as cc
from tsjax import losses, methods
from tsjax.attacks import AttackSpec
from tsjax.configs import adv_train
from tsjax.data import images, subspace
from tsjax.methods.common import logits_fn
from tsjax.metrics import image_specialization as ispec
from tsjax.metrics import stats
from tsjax.train.teachers import load_run

KINDS = ("clean", "off", "adv")
ROBUST = ("pgd", "pgd_in", "pgd_orth")


# ------------------------------------------------------------------ configs
def flat(section) -> dict:
  """Dotted paths of a nested overrides section."""
  out = {}
  for k, v in section.items():
    if hasattr(v, "items"):
      out.update({f"{k}.{p}": w for p, w in flat(v).items()})
    else:
      out[k] = v
  return out


def _with_overrides(c, section, name: str):
  missing = common.apply_overrides(c, flat(section))
  if missing:
    raise cc.ConfigError(f"config field '{name}' sets {missing}, which "
                         f"configs/adv_train.py does not have")
  return c


def teacher_config(config):
  c = adv_train.get_config(f"{config.dataset},pgd_at")
  c.data.data_dir = config.data_dir
  c.model.name = config.teacher.model
  c.model.kwargs = config.teacher.kwargs
  return _with_overrides(c, config.teacher.overrides, "teacher.overrides")


def student_kwargs(config) -> dict:
  """The teacher's widths times ``student.multiple``."""
  kw, m = config.teacher.kwargs.to_dict(), int(config.student.multiple)
  if "features" in kw:
    kw["features"] = tuple(int(f) * m for f in kw["features"])
  if "hidden" in kw:
    kw["hidden"] = int(kw["hidden"]) * m
  return kw


def student_config(config, method: str, seed: int, teacher_dir: str):
  c = adv_train.get_config(f"{config.dataset},{method}")
  c.data.data_dir = config.data_dir
  c.model.name = config.teacher.model
  c.model.kwargs = student_kwargs(config)
  c.seed = int(seed)
  if methods.get(method).needs_teacher:
    c.teacher.checkpoint = teacher_dir
  _with_overrides(c, config.student.overrides, "student.overrides")
  if c.train.get("swa_start_epoch") is not None:
    bounds = tuple(c.train.boundaries)
    c.train.swa_start_epoch = int(bounds[0]) if bounds else None
  return c


def validate(config) -> None:
  """Every field the study reads, before anything trains."""
  for m in config.methods:
    if m not in methods.REGISTRY:
      raise cc.ConfigError(f"config field 'methods' names {m!r}; registered "
                           f"methods are {sorted(methods.REGISTRY)}")
  if not config.seeds:
    raise cc.ConfigError("config field 'seeds' is empty")
  cc.check_number(config, "student.multiple", low=1, integer=True)
  cc.check_number(config, "subspace.variance", low=0.0, high=1.0)
  cc.check_number(config, "eval.num_images", low=2, integer=True)
  cc.check_number(config, "eval.batch_size", low=1, integer=True)
  cc.check_number(config, "eval.eps", low=0.0)
  cc.check_number(config, "eval.pgd_steps", low=1, integer=True)
  cc.check_choice(config, "eval.conv_samples", ispec.CONV_SAMPLES)
  cc.check_number(config, "eval.bootstrap", low=1, integer=True)
  cc.check_number(config, "eval.permutations", low=1, integer=True)
  cc.check_number(config, "eval.min_runs", low=1, integer=True)
  train.validate(teacher_config(config))
  for m in config.methods:
    train.validate(student_config(config, m, config.seeds[0], "teacher"),
                   teacher_trained=False)


# ------------------------------------------------------------- measurement
def eval_attack(config) -> AttackSpec:
  """The evaluation PGD (no [0, 1] box: with a subspace restriction the box
  would shrink the whole perturbation to nothing on Fashion-MNIST's
  saturated background, see ``pgd``; every attack, restricted or not, sees
  the same ball)."""
  e = config.eval
  return AttackSpec(eps=float(e.eps), step_size=float(e.pgd_step_size),
                    steps=int(e.pgd_steps), bounds=None)


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def attack_batch(params, ms, x, y, U, key, *, model, spec):
  """``(correct per attack, unrestricted x_adv)`` of one batch: clean, PGD
  unrestricted, inside span(U) and in its complement. Compiled once per
  architecture and attack (every run of a study shares it)."""
  f = logits_fn(model, params, ms, "eval")
  loss = lambda xa: losses.cross_entropy(f(xa), y)
  out = {"clean": jnp.argmax(f(x), -1) == y}
  x_adv = None
  for i, (name, restrict) in enumerate(
      (("pgd", None), ("pgd_in", "in"), ("pgd_orth", "orth"))):
    xa = spec.replace(restrict=restrict).run(
        loss, x, jax.random.fold_in(key, i), U=U if restrict else None)
    out[name] = jnp.argmax(f(xa), -1) == y
    x_adv = xa if x_adv is None else x_adv
  return out, x_adv


def _spec_row(layers, kind: str) -> dict:
  row = {}
  for li, layer in enumerate(layers):
    row[f"spec_{kind}/layer{li}"] = float(layer["mean_best"][0])
    row[f"success_{kind}/layer{li}"] = np.asarray(
        layer["best_corr"][0]).round(4).tolist()
  return row


def measure(config, run_dir, teacher, sub, x, y, key) -> dict:
  """One run's row (see the module docstring)."""
  e = config.eval
  model, params, ms, _ = load_run(run_dir, "best")
  t_model, t_vars = teacher
  spec = eval_attack(config)
  correct, adv = {}, []
  for i in range(0, len(x), int(e.batch_size)):
    out, xa = attack_batch(params, ms, x[i:i + e.batch_size],
                           y[i:i + e.batch_size], sub.U,
                           jax.random.fold_in(key, i), model=model, spec=spec)
    adv.append(np.asarray(xa))
    for k, v in out.items():
      correct.setdefault(k, []).append(np.asarray(v))
  row = {f"{k}_acc": float(np.concatenate(v).mean()) for k, v in correct.items()}
  off = subspace.off_subspace_noise(jax.random.fold_in(key, len(x)), x, sub.U,
                                    float(e.eps), "linf")
  s_vars = ispec.stack_variables([{"params": params, **ms}])
  for kind, xs in (("clean", x), ("off", off), ("adv", np.concatenate(adv))):
    layers = ispec.image_specialization(
        t_model, t_vars, model, s_vars, xs, batch_size=int(e.batch_size),
        conv_samples=e.conv_samples, thresholds=tuple(e.thresholds))
    row.update(_spec_row(layers, kind))
  res = json.load(open(os.path.join(run_dir, "results.json")))
  best = res["results"]["best"]
  row["aa_acc"] = best.get("aa_acc")
  row["aa_num"] = best.get("aa_num")
  row["num_layers"] = len(layers)
  return row


# ---------------------------------------------------------------- the study
def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_row(path: str, row: dict) -> None:
  """Appends one JSON line (rows are written whole; a row cut by a kill is
  dropped by ``read_rows``'s caller on resume)."""
  rows = read_rows(path) + [row]
  common.atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                    for r in rows))


def _test_images(config):
  test = images.load_dataset(config.dataset, "test", config.data_dir)
  n = int(config.eval.num_images)
  x = test.images[:n].astype(np.float32) / 255.0
  return jnp.asarray(x), jnp.asarray(test.labels[:n])


def _train_and_measure(config, workdir, rows_path, sub) -> None:
  """Trains the teacher (once) and every (method, seed) run without a row,
  measuring each into ``rows_path`` as it finishes."""
  done = {(r["method"], r["seed"]) for r in read_rows(rows_path)}
  todo = [(m, int(s)) for s in config.seeds for m in config.methods
          if (m, int(s)) not in done]
  if not todo:
    return
  teacher_dir = os.path.join(workdir, "teacher")
  if not os.path.exists(os.path.join(teacher_dir, "results.json")):
    print("== teacher (PGD-AT)", flush=True)   # results.json: run finished
    train.run(teacher_config(config), teacher_dir)
  t_model, t_params, t_ms, _ = load_run(teacher_dir, "best")
  teacher = (t_model, {"params": t_params, **t_ms})
  x, y = _test_images(config)
  for method, seed in todo:
    run_dir = os.path.join(workdir, f"{method}_s{seed}")
    print(f"== {method} seed {seed}", flush=True)
    if not os.path.exists(os.path.join(run_dir, "results.json")):
      train.run(student_config(config, method, seed, teacher_dir), run_dir)
    row = {"method": method, "seed": seed, "k": sub.k,
           **measure(config, run_dir, teacher, sub, x, y,
                     jax.random.key(seed)),
           "provenance": common.provenance()}
    append_row(rows_path, row)


def run(config, workdir: str) -> dict:
  """The study (module docstring). A work dir whose ``results.jsonl`` has a
  row for every (method, seed) trains nothing: the summary and plots are
  made again from the rows (e.g. after a change of the summary's
  statistics). A work dir of another config is refused."""
  validate(config)
  train_x = images.load_dataset(config.dataset, "train", config.data_dir)
  common.prepare_workdir(workdir, config)   # after every check
  sub = subspace.pca_subspace(train_x.images, variance=config.subspace.variance,
                              max_examples=config.subspace.max_examples)
  print(f"data subspace: k = {sub.k} directions explain "
        f"{100 * sub.explained:.1f}% of the variance", flush=True)
  rows_path = os.path.join(workdir, "results.jsonl")
  _train_and_measure(config, workdir, rows_path, sub)
  wanted = {(m, int(s)) for m in config.methods for s in config.seeds}
  rows = [r for r in read_rows(rows_path) if (r["method"], r["seed"]) in wanted]
  text = summary_markdown(config, rows, sub)
  common.atomic_write(os.path.join(workdir, "summary.md"), text)
  plot(rows, workdir)
  print(text)
  return {"rows": rows, "k": sub.k}


# ------------------------------------------------------------------ summary
def correlations(rows, config, target: str = "pgd_acc") -> list[dict]:
  """Spearman(specialization, ``target``) per layer and input kind, across
  all runs (bootstrap resampling runs within each method) and within each
  method (resampling its seeds), each with a two-sided permutation p-value
  (``stats.permutation_pvalue``: the accuracies permuted over the group's
  runs). A group of fewer than ``eval.min_runs`` runs gets no correlation
  (``rho`` None): with 3 runs a rank correlation takes four values and a
  bootstrap interval such as [+1.00, +1.00] reads as certainty."""
  out = []
  n_layers = min(r["num_layers"] for r in rows)
  method_of = np.asarray([r["method"] for r in rows])
  acc = np.asarray([r[target] for r in rows], float)
  e = config.eval
  for kind in KINDS:
    for li in range(n_layers):
      s = np.asarray([r[f"spec_{kind}/layer{li}"] for r in rows], float)
      groups = [("all", np.ones(len(rows), bool))] + [
          (m, method_of == m) for m in dict.fromkeys(method_of)]
      for name, sel in groups:
        c = {"kind": kind, "layer": li, "runs": name, "n": int(sel.sum()),
             "rho": None, "low": None, "high": None, "p": None}
        if c["n"] >= int(e.min_runs):
          c["rho"] = stats.spearman(s[sel], acc[sel])
          c["low"], c["high"] = stats.bootstrap_ci(
              stats.spearman, s[sel], acc[sel], n_boot=int(e.bootstrap),
              strata=method_of[sel] if name == "all" else None)
          c["p"] = stats.permutation_pvalue(s[sel], acc[sel],
                                            n_perm=int(e.permutations))
        out.append(c)
  return out


def _fmt(v, pct=True):
  if v is None or (isinstance(v, float) and np.isnan(v)):
    return "–"
  return f"{100 * v:.1f}" if pct else f"{v:+.2f}"


def _fmt_p(p) -> str:
  if np.isnan(p):
    return "–"
  return "<0.001" if p < 0.001 else f"{p:.3f}"


def summary_markdown(config, rows, sub) -> str:
  n_layers = min(r["num_layers"] for r in rows)
  head = ["method", "seed", "clean", "PGD", "PGD in", "PGD orth", "AA"] + [
      f"spec {k} L{li}" for k in KINDS for li in range(n_layers)]
  lines = [f"# Specialization on real images: {config.dataset}", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} cores. Teacher "
           f"{config.teacher.model} {config.teacher.kwargs.to_dict()} (PGD-AT); "
           f"students x{config.student.multiple}; data subspace k = {sub.k} "
           f"({100 * sub.explained:.1f}% of the variance); L-inf eps "
           f"{config.eval.eps}, PGD-{config.eval.pgd_steps}; "
           f"{config.eval.num_images} test images. Accuracies in %; "
           f"specialization = mean over teacher units of the best student "
           f"correlation.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["method"], str(r["seed"])] + [
        _fmt(r.get(f"{k}_acc")) for k in ("clean",) + ROBUST] + [
        _fmt(r.get("aa_acc"))] + [
        f"{r[f'spec_{k}/layer{li}']:.3f}" for k in KINDS for li in range(n_layers)]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Spearman correlation between specialization and PGD "
            "accuracy: 95% bootstrap interval (across all runs the "
            "resampling keeps each method's number of runs) and two-sided "
            "permutation p-value (the accuracies permuted over the group's "
            f"runs); groups of fewer than {int(config.eval.min_runs)} runs "
            "get no correlation (\"n too small\"):", "",
            "| input | layer | runs | n | rho | interval | p |",
            "|---|---|---|---|---|---|---|"]
  for c in correlations(rows, config):
    cells = ("n too small", "–", "–") if c["rho"] is None else (
        _fmt(c["rho"], False),
        f"[{_fmt(c['low'], False)}, {_fmt(c['high'], False)}]",
        _fmt_p(c["p"]))
    lines.append(f"| {c['kind']} | {c['layer']} | {c['runs']} | {c['n']} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(rows, workdir: str) -> None:
  """specialization_vs_robustness.png (per layer, clean inputs) and
  success_per_unit.png (per teacher unit: best correlation, mean per method)."""
  n_layers = min(r["num_layers"] for r in rows)
  names = list(dict.fromkeys(r["method"] for r in rows))
  fig = Figure(figsize=(4 * n_layers, 3.5))
  axes = fig.subplots(1, n_layers, squeeze=False)
  for li, ax in enumerate(axes[0]):
    for m in names:
      sel = [r for r in rows if r["method"] == m]
      ax.scatter([r[f"spec_clean/layer{li}"] for r in sel],
                 [100 * r["pgd_acc"] for r in sel], label=m, s=18)
    ax.set(xlabel=f"specialization, layer {li} (clean)", ylabel="PGD acc (%)")
  axes[0][-1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "specialization_vs_robustness.png"), dpi=120)
  fig = Figure(figsize=(4 * n_layers, 3.5))
  axes = fig.subplots(1, n_layers, squeeze=False)
  for li, ax in enumerate(axes[0]):
    for m in names:
      per_unit = np.mean([r[f"success_clean/layer{li}"] for r in rows
                          if r["method"] == m], axis=0)
      ax.plot(np.sort(per_unit)[::-1], label=m)
    ax.set(xlabel="teacher unit (sorted)", ylabel="best correlation",
           title=f"layer {li}")
  axes[0][-1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "success_per_unit.png"), dpi=120)


if __name__ == "__main__":
  common.launch("specialization", run, "configs/specialization.py:fashion_mnist",
                "configs/specialization.py[:fashion_mnist|smoke]",
                default_variant="fashion_mnist")

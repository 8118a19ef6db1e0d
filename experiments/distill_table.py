r"""The distillation comparison: one robust teacher, small students, the same
budget for every method, several seeds, one table.

  python -m experiments.distill_table --workdir runs/distill_table \
      --out experiments/results/fashion_mnist_distill.md

1. The teacher: ``configs/adv_train.py:DATASET,pgd_at`` with ``TEACHER_BUDGET``
   and the ``--teacher_config.FIELD=VALUE`` overrides, trained by
   ``experiments.train`` in ``WORKDIR/teacher`` (or ``--teacher=DIR``, an
   existing work dir).
2. Every distillation method (``configs/adv_train.py:DATASET,METHOD``) and
   the from-scratch baselines (PGD-AT, TRADES with the student architecture)
   for every seed, with ``STUDENT_BUDGET`` and the same
   ``--config.FIELD=VALUE`` overrides (``--config`` names the data set:
   ``configs/adv_train.py:DATASET``), each in ``WORKDIR/METHOD_sSEED`` (a
   killed table resumes run by run).
3. Test-set clean, PGD and AutoAttack accuracy of the validation-selected
   ("best") student, mean and spread over seeds, in a Markdown table (also
   the last-epoch PGD and, for PeerAiD, the SWA student).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from tsjax.configs import adv_train
from . import common, train
from tsjax import methods as registry

FLAGS = flags.FLAGS

SCRATCH = ("pgd_at", "trades")
# The CPU budgets of the committed comparison; --config.FIELD=VALUE and
# --teacher_config.FIELD=VALUE override them.
TEACHER_BUDGET = {"data.train_subset": 20000, "train.epochs": 3,
                  "train.boundaries": (2,), "method.attack.steps": 5,
                  "method.attack.step_size": 0.05}
STUDENT_BUDGET = {"data.train_subset": 10000, "data.num_val": 1000,
                  "data.test_subset": 1000, "train.epochs": 3,
                  "train.boundaries": (2,), "method.attack.steps": 5,
                  "method.attack.step_size": 0.05, "eval.val_subset": 500,
                  "eval.autoattack_subset": 500,
                  "eval.autoattack_params": ("best",)}


def define_flags():
  config_flags.DEFINE_config_file(
      "config", "configs/adv_train.py:fashion_mnist",
      "configs/adv_train.py:DATASET; --config.FIELD=VALUE for every student "
      "run.", lock_config=True)
  config_flags.DEFINE_config_file(
      "teacher_config", "configs/adv_train.py:fashion_mnist,pgd_at",
      "The teacher's config; --teacher_config.FIELD=VALUE overrides.",
      lock_config=True)
  flags.DEFINE_string("methods", "kd,ard,rslad,iad,peeraid,advfunmatch,pgd_at,trades",
                      "Distillation methods and from-scratch baselines.")
  flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds.")
  flags.DEFINE_string("teacher", None, "Existing teacher work dir (else trained).")
  flags.DEFINE_string("workdir", "runs/distill_table", "Output directory.")
  flags.DEFINE_string("out", None, "Also write the Markdown table here.")
  flags.DEFINE_bool("table_only", False,
                    "Train nothing: tabulate the runs that have finished "
                    "(the others are listed as not run yet).")


def student_config(method: str, dataset: str, seed: int, teacher_dir: str,
                   overrides: dict):
  c = adv_train.get_config(f"{dataset},{method}")
  if registry.get(method).needs_teacher:
    c.teacher.checkpoint = teacher_dir
  if method in SCRATCH:
    ref = adv_train.get_config(f"{dataset},kd")   # the same student network
    c.model.name = ref.model.name
    c.model.kwargs = ref.model.kwargs
    c.model.normalize = ref.model.normalize
  c.seed = seed
  common.apply_overrides(c, {**STUDENT_BUDGET, **overrides})
  if c.train.swa_start_epoch is not None:   # SWA from the first decay
    c.train.swa_start_epoch = int(c.train.boundaries[0])
  return c


def _items(d: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in sorted(d.items()))


def _mean_spread(values):
  v = np.asarray([x for x in values if x is not None], float)
  if not len(v):
    return "–"
  if len(v) == 1:
    return f"{100 * v[0]:.1f}"
  return f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f}"


def train_runs(dataset, seeds, methods, teacher_dir, overrides) -> dict:
  """Every (method, seed) run, trained unless finished (``--table_only``:
  none trained): ``{(method, seed): (results.json, wall seconds)}``."""
  runs = {}
  for method in methods:
    for seed in seeds:
      c = student_config(method, dataset, seed, teacher_dir, overrides)
      wd = os.path.join(FLAGS.workdir, f"{method}_s{seed}")
      done = os.path.join(wd, "results.json")
      if not os.path.exists(done) and FLAGS.table_only:
        continue
      if not os.path.exists(done):
        print(f"== {method} seed {seed}")
        train.run(c, wd)
      s = json.load(open(done))
      # Wall time of the run (training + evaluation) from its files, so
      # that runs finished by an earlier invocation keep their time.
      runs[(method, seed)] = (s, os.path.getmtime(done) - os.path.getmtime(
          os.path.join(wd, "config.json")))
  return runs


def _method_rows(methods, seeds, runs, pgd_n) -> list[str]:
  """The table's rows and the per-seed list."""
  lines = []
  for method in methods:
    rows = [runs[(method, s)][0]["results"] for s in seeds]
    best = [r.get("best") or r["last"] for r in rows]
    last = [r["last"] for r in rows]
    swa = [r["swa"]["pgd_acc"] if "swa" in r else None for r in rows]
    secs = np.mean([runs[(method, s)][1] for s in seeds])
    aa_n = best[0].get("aa_num")
    lines.append(
        f"| {method} | {_mean_spread([b['clean_acc'] for b in best])} | "
        f"{_mean_spread([b['pgd_acc'] for b in best])} | "
        f"{_mean_spread([b.get('aa_acc') for b in best])}"
        f"{f' (n={aa_n})' if aa_n else ''} | "
        f"{_mean_spread([l['clean_acc'] for l in last])} | "
        f"{_mean_spread([l['pgd_acc'] for l in last])} | "
        f"{_mean_spread(swa)} | "
        f"{secs:.0f} s |")
  lines += ["", f"Per seed (best params: clean / PGD-{pgd_n} / AutoAttack):", ""]
  for method in methods:
    per = []
    for s in seeds:
      r = runs[(method, s)][0]["results"]
      b = r.get("best") or r["last"]
      aa = f"{100 * b['aa_acc']:.1f}" if "aa_acc" in b else "–"
      per.append(f"seed {s}: {100 * b['clean_acc']:.1f} / "
                 f"{100 * b['pgd_acc']:.1f} / {aa}")
    lines.append(f"- {method}: " + "; ".join(per))
  return lines


def table_markdown(dataset, seeds, methods, runs, teacher, teacher_dir,
                   t_overrides, overrides, seconds) -> str:
  eps = teacher["eps"]
  pgd_n = teacher["results"]["last"].get("pgd_steps", 20)
  tb = teacher["results"].get("best") or teacher["results"]["last"]
  first = runs[(methods[0], seeds[0])][0]
  lines = [
      f"# {dataset}: adversarial distillation vs. training from scratch "
      f"(linf eps {eps:g})", "",
      f"Machine: {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores; this invocation {seconds:.0f} s "
      f"(runs already finished are reused). Seeds: {seeds}.", "",
      f"Teacher: {teacher['model']} trained with PGD-AT "
      f"({_items(t_overrides) if not FLAGS.teacher else teacher_dir}); "
      f"test clean {100 * tb['clean_acc']:.1f}%, PGD-{pgd_n} {100 * tb['pgd_acc']:.1f}% "
      f"on {tb['num_test']} test images.", "",
      f"Students: the same network for every method ({first['model']} "
      f"{json.dumps(first['config']['model']['kwargs'])}), "
      f"the same budget: {_items({**STUDENT_BUDGET, **overrides})}.", "",
      "Accuracies in % on the test set, mean ± std over seeds, of the "
      "validation-selected student (best validation PGD accuracy; the "
      "validation split is carved from train). AutoAttack = standard version "
      "on the first test images as listed. 'last' = final epoch.", "",
      f"| method | clean | PGD-{pgd_n} | AutoAttack | last: clean | "
      f"last: PGD-{pgd_n} | SWA: PGD-{pgd_n} | wall time / run (train + eval) |",
      "|---|---|---|---|---|---|---|---|"]
  missing = [f"{m} seed {s}" for m in methods for s in seeds
             if (m, s) not in runs]
  complete = [m for m in methods if all((m, s) in runs for s in seeds)]
  lines += _method_rows(complete, seeds, runs, pgd_n)
  if missing:
    lines += ["", f"Not run yet (resume with the same command): "
              f"{', '.join(missing)}."]
  lines += ["", "Command (resumes; finished runs are reused; `--table_only` "
            "only tabulates):", "", "```",
            " ".join(["python -m experiments.distill_table",
                      *(shlex.quote(a) for a in sys.argv[1:]
                        if not a.startswith("--table_only"))]), "```"]
  return "\n".join(lines) + "\n"


def write_outputs(text: str, runs: dict) -> None:
  print(text)
  common.atomic_write(os.path.join(FLAGS.workdir, "table.md"), text)
  common.atomic_write(os.path.join(FLAGS.workdir, "table.json"), json.dumps(
      common.to_jsonable({f"{m}_s{s}": v[0] for (m, s), v in runs.items()}),
      indent=2))
  if FLAGS.out:
    # A hand-written reading of the table (from a "## Reading" heading on)
    # survives regeneration.
    if os.path.exists(FLAGS.out):
      old = open(FLAGS.out).read()
      if "\n## Reading" in old:
        text += "\n" + old[old.index("\n## Reading") + 1:]
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    common.atomic_write(FLAGS.out, text)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  dataset = FLAGS.config.data.name
  overrides = common.config_overrides()
  t_overrides = {**TEACHER_BUDGET, **common.config_overrides("teacher_config")}
  t_all = time.time()
  os.makedirs(FLAGS.workdir, exist_ok=True)
  teacher_dir = FLAGS.teacher or os.path.join(FLAGS.workdir, "teacher")
  seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
  methods = [m for m in FLAGS.methods.split(",") if m]
  tc = adv_train.get_config(f"{dataset},pgd_at")
  common.apply_overrides(tc, t_overrides)
  # Every run's config is checked before the first one trains.
  train.validate(tc)
  for m in methods:
    train.validate(student_config(m, dataset, seeds[0], teacher_dir,
                                  overrides), teacher_trained=False)
  if not FLAGS.teacher and not FLAGS.table_only:
    print("== teacher (PGD-AT)")
    train.run(tc, teacher_dir)
  teacher = json.load(open(os.path.join(teacher_dir, "results.json")))
  runs = train_runs(dataset, seeds, methods, teacher_dir, overrides)
  write_outputs(table_markdown(dataset, seeds, methods, runs, teacher,
                               teacher_dir, t_overrides, overrides,
                               time.time() - t_all), runs)


if __name__ == "__main__":
  common.prepare_backend(common.IMAGE_XLA_FLAGS)
  define_flags()
  app.run(common.one_line_config_errors(main))

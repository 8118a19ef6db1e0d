r"""Several methods of experiments.train on one data set, one table.

  python -m experiments.adv_train_table --config configs/adv_train.py:fashion_mnist \
      --methods standard,pgd_at,trades,ccat --workdir runs/fmnist_table \
      --config.train.epochs=3 --out experiments/results/fashion_mnist_adv_train.md

Each method runs ``configs/adv_train.py:DATASET,METHOD`` with the same
``--config.FIELD=VALUE`` overrides (as for the experiments; a field a method's
config does not have, e.g. another method's option, is skipped for it), in
its own sub-directory of the work dir (so a killed table resumes method by
method), and the test-set results of the last and the best
(validation-selected) parameters are gathered into one Markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags, logging
from ml_collections import config_flags

from tsjax.configs import adv_train
from . import common, train

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file(
      "config", "configs/adv_train.py:fashion_mnist",
      "configs/adv_train.py:DATASET; --config.FIELD=VALUE overrides apply to "
      "every method.", lock_config=True)
  flags.DEFINE_string("methods", "standard,pgd_at,trades,ccat", "Methods.")
  flags.DEFINE_string("workdir", "runs/adv_train_table", "Output directory.")
  flags.DEFINE_string("out", None, "Also write the Markdown table here.")


def method_config(dataset: str, method: str, overrides: dict):
  """``configs/adv_train.py:DATASET,METHOD`` with the table's overrides."""
  config = adv_train.get_config(f"{dataset},{method}")
  missing = common.apply_overrides(config, overrides)
  if missing and not all(m.startswith("method.options.") for m in missing):
    raise ValueError(f"--config overrides {missing} name no field of the "
                     f"{method!r} config")
  return config


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  dataset = FLAGS.config.data.name
  overrides = common.config_overrides()
  rows = []
  t_all = time.time()
  methods = [m for m in FLAGS.methods.split(",") if m]
  for method in methods:           # every config checked before any trains
    train.validate(method_config(dataset, method, overrides))
  for method in methods:
    config = method_config(dataset, method, overrides)
    t0 = time.time()
    print(f"== {method}")
    res = train.run(config, os.path.join(FLAGS.workdir, method))
    rows.append((method, res["summary"], time.time() - t0))
  eps = rows[0][1]["eps"]
  steps = rows[0][1]["results"]["last"]["pgd_steps"]
  items = [f"{k}={v}" for k, v in sorted(overrides.items())]
  lines = [f"# {dataset}: adversarial training methods (linf eps {eps:g})",
           "",
           f"Machine: {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores; total {time.time() - t_all:.0f} s. "
           f"Overrides: {', '.join(items) or 'none'}. Accuracies on "
           f"the test set; 'best' = epoch with the best validation PGD "
           f"accuracy (validation split carved from train, never the test set).",
           "",
           f"| method | params | clean acc | PGD-{steps} acc | CCAT thresholded "
           f"robust err. | train time |",
           "|---|---|---|---|---|---|"]
  for method, s, secs in rows:
    for name, r in s["results"].items():
      tag = f"{name} (epoch {s['best_epoch']})" if name == "best" else name
      ccat = (f"{r['ccat_robust_error']:.4f} (tau {r['ccat_tau']:.3f})"
              if "ccat_robust_error" in r else "–")
      lines.append(f"| {method} | {tag} | {r['clean_acc']:.4f} | "
                   f"{r['pgd_acc']:.4f} | {ccat} | {secs:.0f} s |")
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  common.atomic_write(os.path.join(FLAGS.workdir, "table.md"), text)
  common.atomic_write(os.path.join(FLAGS.workdir, "table.json"), json.dumps(
      common.to_jsonable([{"method": m, **s} for m, s, _ in rows]), indent=2))
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    common.atomic_write(FLAGS.out, text)


if __name__ == "__main__":
  common.prepare_backend(common.IMAGE_XLA_FLAGS)
  define_flags()
  app.run(common.one_line_config_errors(main))

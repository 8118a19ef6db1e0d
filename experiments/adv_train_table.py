r"""Several methods of experiments.train on one data set, one table.

  python -m experiments.adv_train_table --dataset fashion_mnist \
      --methods standard,pgd_at,trades,ccat --workdir runs/fmnist_table \
      --out experiments/results/fashion_mnist_adv_train.md

Each method runs ``configs/adv_train.py:DATASET,METHOD`` with the same
overrides (``--override FIELD=VALUE``, repeatable, applied to every method),
in its own sub-directory of the work dir (so a killed table resumes method by
method), and the test-set results of the last and the best (validation-selected)
parameters are gathered into one Markdown table.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("dataset", "fashion_mnist", "Data set variant.")
  flags.DEFINE_string("methods", "standard,pgd_at,trades,ccat", "Methods.")
  flags.DEFINE_multi_string("override", [], "FIELD=VALUE for every method.")
  flags.DEFINE_string("workdir", "runs/adv_train_table", "Output directory.")
  flags.DEFINE_string("out", None, "Also write the Markdown table here.")


def apply_override(config, item: str) -> None:
  field, _, raw = item.partition("=")
  if not field or not _:
    raise ValueError(f"--override expects FIELD=VALUE, got {item!r}")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  node = config
  *path, leaf = field.split(".")
  for p in path:
    node = node[p]
  if leaf not in node:
    raise ValueError(f"--override: config has no field {field!r}")
  node[leaf] = value


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from configs.adv_train import get_config
  from experiments import common, train

  rows = []
  t_all = time.time()
  for method in [m for m in FLAGS.methods.split(",") if m]:
    config = get_config(f"{FLAGS.dataset},{method}")
    for item in FLAGS.override:
      apply_override(config, item)
    t0 = time.time()
    print(f"== {method}")
    res = train.run(config, os.path.join(FLAGS.workdir, method))
    rows.append((method, res["summary"], time.time() - t0))
  eps = rows[0][1]["eps"]
  lines = [f"# {FLAGS.dataset}: adversarial training methods (linf eps {eps:g})",
           "",
           f"Machine: {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores; total {time.time() - t_all:.0f} s. "
           f"Overrides: {', '.join(FLAGS.override) or 'none'}. Accuracies on "
           f"the test set; 'best' = epoch with the best validation PGD "
           f"accuracy (validation split carved from train, never the test set).",
           "",
           "| method | params | clean acc | PGD-20 acc | CCAT thresholded robust err. | train time |",
           "|---|---|---|---|---|---|"]
  for method, s, secs in rows:
    for name, r in s["results"].items():
      tag = f"{name} (epoch {s['best_epoch']})" if name == "best" else name
      ccat = (f"{r['ccat_robust_error']:.4f} (tau {r['ccat_tau']:.3f})"
              if "ccat_robust_error" in r else "–")
      lines.append(f"| {method} | {tag} | {r['clean_acc']:.4f} | "
                   f"{r['pgd20_acc']:.4f} | {ccat} | {secs:.0f} s |")
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
  define_flags()
  app.run(main)

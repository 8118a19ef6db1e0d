r"""Robustness report of a trained tsjax classifier.

  python -m experiments.evaluate --config configs/evaluate.py \
      --config.checkpoint=RUN_DIR [--config.which=last] [--workdir OUT]

Loads the model and data set from RUN_DIR/config.json (a work dir of
experiments.train), the best (validation-selected) or last parameters, and
reports clean, FGSM, PGD-20, CW-inf and AutoAttack accuracy on the test split.
Writes eval.json and eval.md to the work dir; AutoAttack progress is kept in
the work dir, so a killed evaluation resumes.

Several processes (a ``distributed`` config section, as in
configs/adv_train.py): the test batches are sharded over all devices of all
processes and counted on device; AutoAttack splits the points between the
processes (``tsjax.train.classifier.autoattack_split``) and sums their counts; only process 0 writes
files and prints.
"""

from __future__ import annotations

import json
import os
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from . import common
from tsjax import config_checks as cc
from tsjax.attacks import AttackSpec
from tsjax.attacks.autoattack import VERSIONS
from tsjax.data import images
from tsjax.train import classifier as clf
from tsjax.train import distributed
from tsjax.train.teachers import load_run


def load_classifier(run_dir: str, which: str = "best"):
  """``(model, params, model_state, train_config, test_set)`` of a run of
  experiments.train or experiments.distill (see tsjax.train.teachers)."""
  if not os.path.exists(os.path.join(run_dir, "config.json")):
    raise FileNotFoundError(
        f"config field 'checkpoint': {run_dir!r} is not a work dir of "
        f"experiments.train or experiments.distill (no config.json there)")
  model, params, ms, cfg = load_run(run_dir, which)
  return model, params, ms, cfg, images.load_from_config(cfg, "test")


def validate(config) -> None:
  """Every field, before anything is loaded or compiled."""
  if not config.checkpoint:
    raise cc.ConfigError("config field 'checkpoint' is required: the work dir "
                         "of an experiments.train run")
  if not os.path.exists(os.path.join(config.checkpoint, "config.json")):
    raise cc.ConfigError(
        f"config field 'checkpoint': {config.checkpoint!r} is not a work dir "
        f"of experiments.train or experiments.distill (no config.json there)")
  cc.check_choice(config, "which", ("best", "last", "swa"))
  cc.check_choice(config, "norm", ("linf", "l2"))
  cc.check_choice(config, "aa_version", tuple(VERSIONS))
  for f in ("pgd_steps", "cw_steps", "batch_size"):
    cc.check_number(config, f, low=1, integer=True)
  for f in ("subset", "aa_subset"):
    if config.get(f) is not None:
      cc.check_number(config, f, low=1, integer=True)
  if config.get("eps") is not None:
    cc.check_eps(config, "eps", config.norm)


def run(config, workdir: str, progress: bool = True) -> dict:
  validate(config)
  distributed.initialize(config.get("distributed"))
  main = distributed.is_main_process()
  model, params, ms, tcfg, test = load_classifier(config.checkpoint,
                                                  config.which)
  eps = float(tcfg.eval.eps if config.eps is None else config.eps)
  n = min(config.subset or len(test), len(test))
  x, y = test.images[:n], test.labels[:n]
  # A changed config is refused: AutoAttack's progress kept there was made
  # with the old one.
  common.prepare_workdir(workdir, config)
  distributed.barrier("evaluate workdir")   # AutoAttack progress goes there
  key = jax.random.key(int(config.seed))
  att = lambda steps: AttackSpec(norm=config.norm, eps=eps,
                                 step_size=2.5 * eps / steps, steps=steps)
  fgsm = AttackSpec(norm=config.norm, eps=eps, step_size=eps, steps=1,
                    start="zero")
  step = clf.make_eval_step(model, {
      "fgsm": ("ce", fgsm), f"pgd{config.pgd_steps}": ("ce", att(config.pgd_steps)),
      "cw": ("cw", att(config.cw_steps))})
  # Batches sharded over every device of every process (the batch rounded
  # up to a multiple of the device count; padding is masked), the model
  # replicated there: each process attacks its rows, counts add up on device.
  mesh = images.data_mesh()
  bs = -(-int(config.batch_size) // mesh.size) * mesh.size
  p_ms = distributed.to_global((params, ms), NamedSharding(mesh, P()))
  t0 = time.time()
  r = clf.evaluate(step, *p_ms, images.eval_batches(x, y, bs, mesh=mesh), key,
                   per_example=False)
  res = {k: v for k, v in r.items() if k.endswith("/acc")}
  res["num_examples"] = r["num_examples"]
  res["seconds_pgd"] = time.time() - t0
  if config.autoattack:
    m = min(config.aa_subset or n, n)
    t0 = time.time()
    aa = clf.autoattack_split(model, params, ms, x[:m], y[:m], key,
                          norm=config.norm, eps=eps, version=config.aa_version,
                          batch_size=int(config.batch_size),
                          state_dir=workdir, progress=progress)
    res.update({"autoattack/acc": aa["robust_acc"],
                "autoattack/clean_acc": aa["clean_acc"],
                "autoattack/num_examples": m,
                "autoattack/after": aa["robust_acc_after"],
                "autoattack/warnings": aa["warnings"],
                "seconds_autoattack": time.time() - t0})
  out = {"checkpoint": config.checkpoint, "which": config.which,
         "norm": config.norm, "eps": eps, "results": res,
         "config": common.config_dict(config),
         "provenance": common.provenance()}
  if not main:
    return out
  common.atomic_write(os.path.join(workdir, "eval.json"),
                      json.dumps(common.to_jsonable(out), indent=2))
  lines = [f"# {config.checkpoint} ({config.which}), {config.norm} eps {eps:g}",
           "", "| attack | accuracy | examples |", "|---|---|---|"]
  for k in ("clean/acc", "fgsm/acc", f"pgd{config.pgd_steps}/acc", "cw/acc"):
    lines.append(f"| {k.split('/')[0]} | {res[k]:.4f} | {res['num_examples']} |")
  if config.autoattack:
    for a, v in res["autoattack/after"].items():
      lines.append(f"| AA after {a} | {v:.4f} | {res['autoattack/num_examples']} |")
    lines.append(f"| AutoAttack ({config.aa_version}) | {res['autoattack/acc']:.4f}"
                 f" | {res['autoattack/num_examples']} |")
  text = "\n".join(lines) + "\n"
  common.atomic_write(os.path.join(workdir, "eval.md"), text)
  if progress:
    print(text)
  return out


if __name__ == "__main__":
  common.launch("evaluate", run, "configs/evaluate.py", "Evaluation config.",
                workdir_fn=lambda c: os.path.join(c.checkpoint or ".",
                                                  f"eval_{c.which}"),
                xla_flags=common.IMAGE_XLA_FLAGS)

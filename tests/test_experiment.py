"""End-to-end checks of experiments/teacher_student.py: outputs, resume, CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from tsjax.configs.teacher_student import get_config
from compile_events import BACKEND_COMPILE, compile_events
from experiments import common
from experiments import teacher_student as exp
from tsjax.train import teacher_student as ts_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**over):
  c = get_config("smoke")
  c.num_seeds = 2
  c.data.n_train = 256
  c.data.n_eval = 128
  c.train.steps = 120
  c.checkpoint_every = 40
  c.robust_features.steps = 10
  c.eval.restarts = 2
  c.eval.steps = 3
  c.eval.corr_batch = 50          # 128 = 2 x 50 + 28: exercises the masked tail
  for k, v in over.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def test_outputs(tmp_path):
  c = tiny_config()
  out = exp.run(c, str(tmp_path), progress=False)
  rows = [json.loads(l) for l in open(tmp_path / "results.jsonl")]
  assert len(rows) == len(c.regimes) * c.num_seeds
  assert {(r["regime"], r["seed"]) for r in rows} == {
      (g, s) for g in c.regimes for s in range(c.seed, c.seed + c.num_seeds)}
  for r in rows:
    assert r["config"]["data"]["d"] == c.data.d
    assert r["eval_restarts"] == c.eval.restarts
    for key in ("spec_in/mean_best", "spec_full/mean_best", "drift_perp",
                "robust_full/mse", "robust_in/mse", "robust_orth/mse",
                "clean_in/mse", "spec_in/layer0/best_corr"):
      assert key in r, key
    assert len(r["spec_in/layer0/best_corr"]) == c.teacher.widths[0]
    # Robust error is a maximum over a ball containing the clean point.
    assert r["robust_full/mse"] >= r["clean_in/mse"] - 1e-12
  # Rows carry exactly the returned metrics.
  m = out["metrics"]["pgd_at"]["spec_full/mean_best"]
  got = [r["spec_full/mean_best"] for r in rows if r["regime"] == "pgd_at"]
  np.testing.assert_allclose(got, m)
  summary = json.load(open(tmp_path / "summary.json"))
  assert set(summary["table"]) == set(c.regimes)
  assert "spec_full vs robust_full/mse" in summary["spearman"]
  assert (tmp_path / "summary.md").read_text().startswith("# Teacher")
  for png in ("specialization_vs_robust_error.png",
              "success_per_teacher_node.png"):
    data = (tmp_path / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _params(result):
  return jax.tree.map(np.asarray, {r: s.params for r, s in
                                   result["states"].items()})


def test_resume_equals_uninterrupted(tmp_path):
  c = tiny_config(regimes=("standard", "pgd_at", "robust_features"))
  full = exp.run(c, str(tmp_path / "a"), progress=False)
  # "Kill" after 4 of the 9 chunks (two rounds of standard and pgd_at side
  # by side; robust_features trains after them) ...
  assert exp.run(c, str(tmp_path / "b"), progress=False,
                 stop_after_chunks=4) is None
  ckpts = sorted(os.listdir(tmp_path / "b" / "checkpoints"))
  assert "4" in ckpts and "9" not in ckpts
  # ... then resume in a fresh call: it must end with identical parameters.
  resumed = exp.run(c, str(tmp_path / "b"), progress=False)
  a, b = _params(full), _params(resumed)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  np.testing.assert_array_equal(full["metrics"]["robust_features"]["drift_perp"],
                                resumed["metrics"]["robust_features"]["drift_perp"])
  # The resumed run really trained fewer chunks (its checkpoints continue).
  assert "9" in os.listdir(tmp_path / "b" / "checkpoints")


@pytest.mark.slow
def test_regimes_side_by_side_equal_one_device(tmp_path):
  """Regimes trained side by side on several devices (the default with
  several devices) give bitwise the parameters and metrics of a run on one
  device."""
  c = tiny_config(regimes=("standard", "offsubspace", "robust_features"),
                  **{"robust_features.source": "standard", "train.steps": 40,
                     "checkpoint_every": 20})
  assert jax.device_count() >= 3
  side = exp.run(c, str(tmp_path / "side"), progress=False)
  one = exp.run(c, str(tmp_path / "one"), progress=False,
                devices=jax.devices()[:1])
  used = {r: {d.id for d in s.params["hidden_0"]["kernel"].devices()}
          for r, s in side["states"].items()}
  assert len(set.union(*used.values())) >= 2, used
  jax.tree.map(np.testing.assert_array_equal, _params(side), _params(one))
  jax.tree.map(np.testing.assert_array_equal, side["metrics"], one["metrics"])


def test_two_regimes_side_by_side_equal_one_device(tmp_path):
  """Fast version of the check above (two regimes, a few steps): side by
  side on two devices gives bitwise the one-device parameters."""
  c = tiny_config(regimes=("standard", "offsubspace"),
                  **{"train.steps": 20, "checkpoint_every": 10})
  side = exp.run(c, str(tmp_path / "side"), progress=False,
                 devices=jax.devices()[:2])
  one = exp.run(c, str(tmp_path / "one"), progress=False,
                devices=jax.devices()[:1])
  assert {d.id for s in side["states"].values()
          for d in s.params["hidden_0"]["kernel"].devices()} == {0, 1}
  jax.tree.map(np.testing.assert_array_equal, _params(side), _params(one))



def test_programs_compiled_ahead_are_reused(tmp_path, monkeypatch):
  """Side by side, the training chunks are compiled in a background thread
  from the shapes alone while the set-up runs (``compile_training_ahead``),
  and the evaluation while the last round trains (``compile_ahead``); the
  run then reuses those programs: no more compiles than without either, and
  bitwise the same metrics."""
  c = tiny_config(regimes=("standard", "offsubspace"),
                  **{"train.steps": 20, "checkpoint_every": 10})
  devices = jax.devices()[:2]
  evals, trains = [], {}
  real_eval, real_train = exp.compile_ahead, exp.compile_training_ahead
  monkeypatch.setattr(exp, "compile_ahead",
                      lambda *a: evals.extend(real_eval(*a)) or evals)
  monkeypatch.setattr(exp, "compile_training_ahead",
                      lambda *a: trains.update(real_train(*a)) or dict(trains))
  jax.clear_caches()
  with compile_events() as events:
    ahead = exp.run(c, str(tmp_path / "ahead"), progress=False, devices=devices)
  assert len(evals) == 1 and evals[0].done()
  assert sorted(trains) == ["offsubspace", "standard"]
  assert all(f.done() and f.exception() is None for f in trains.values())
  monkeypatch.setattr(exp, "compile_ahead", lambda *a: [])
  monkeypatch.setattr(exp, "compile_training_ahead", lambda *a: {})
  jax.clear_caches()
  with compile_events() as plain_events:
    plain = exp.run(c, str(tmp_path / "plain"), progress=False,
                    devices=devices)
  assert events.count(BACKEND_COMPILE) == plain_events.count(BACKEND_COMPILE)
  jax.tree.map(np.testing.assert_array_equal, ahead["metrics"],
               plain["metrics"])
  for r in c.regimes:
    jax.tree.map(np.testing.assert_array_equal, ahead["states"][r].params,
                 plain["states"][r].params)

def test_placement_balances_regimes_by_cost():
  study = ts_lib.TeacherStudent(tiny_config(
      regimes=("standard", "pgd_at", "offsubspace")))
  devices = jax.devices()[:2]
  p = exp.Placement(study, devices)
  # PGD-AT (the heaviest) alone; the two lighter ones share the other device.
  assert p.regime["pgd_at"] != p.regime["standard"] == p.regime["offsubspace"]
  assert exp.Placement(study, devices[:1]).side_by_side is False
  one = ts_lib.TeacherStudent(tiny_config(regimes=("pgd_at",)))
  assert exp.Placement(one, devices).regime["pgd_at"] == devices


def test_resume_refuses_other_config(tmp_path):
  c = tiny_config(regimes=("standard",))
  exp.run(c, str(tmp_path), progress=False, stop_after_chunks=1)
  c2 = tiny_config(regimes=("standard",))
  c2.train.lr = 0.02
  with pytest.raises(ValueError, match=r"train\.lr"):
    exp.run(c2, str(tmp_path), progress=False)


def _cli(workdir, *extra):
  return [sys.executable, "-m", "experiments.teacher_student",
          "--config", "configs/teacher_student.py:smoke",
          f"--workdir={workdir}", "--config.num_seeds=1",
          "--config.data.n_train=200", "--config.data.n_eval=64",
          "--config.eval.corr_batch=32", "--config.robust_features.steps=5",
          *extra]


def test_cli_overrides_and_bad_field(tmp_path):
  env = {**os.environ, "XLA_FLAGS": ""}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cache = tmp_path / "cache"
  p = subprocess.run(_cli(tmp_path / "ok", "--config.train.steps=60",
                          "--config.checkpoint_every=30",
                          "--config.regimes=standard,offsubspace",
                          f"--compilation_cache={cache}"),
                     cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  # The persistent compilation cache is on (here in a directory of ours) and
  # keeps the sub-second programs too (common.CACHE_MIN_COMPILE_S; JAX's 1 s
  # default kept only the evaluation): set-up, two training programs and the
  # evaluation at least.
  assert len([f for f in os.listdir(cache) if f.endswith("-cache")]) >= 4
  rows = [json.loads(l) for l in open(tmp_path / "ok" / "results.jsonl")]
  assert {r["regime"] for r in rows} == {"standard", "offsubspace"}
  assert rows[0]["config"]["train"]["steps"] == 60
  bad = subprocess.run(_cli(tmp_path / "bad", "--config.adv.eps_frac=-1",
                            "--compilation_cache=off"),
                       cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode != 0
  assert "adv.eps_frac" in bad.stderr and ">= 0" in bad.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
  """A real kill mid-run (SIGKILL after the first checkpoint) resumes to the
  same parameters as an uninterrupted run."""
  env = {**os.environ, "XLA_FLAGS": ""}
  args = ("--config.train.steps=3000", "--config.checkpoint_every=500",
          "--config.regimes=standard,pgd_at")
  ref = subprocess.run(_cli(tmp_path / "ref", *args), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert ref.returncode == 0, ref.stderr[-3000:]
  p = subprocess.Popen(_cli(tmp_path / "run", *args), cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ck = tmp_path / "run" / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline:
    if ck.exists() and any(n.isdigit() and int(n) >= 3 for n in os.listdir(ck)):
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not (tmp_path / "run" / "results.jsonl").exists()
  again = subprocess.run(_cli(tmp_path / "run", *args), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from checkpoint" in again.stdout
  a = [json.loads(l) for l in open(tmp_path / "ref" / "results.jsonl")]
  b = [json.loads(l) for l in open(tmp_path / "run" / "results.jsonl")]
  for ra, rb in zip(a, b):
    assert ra["drift_perp"] == rb["drift_perp"]
    assert ra["spec_full/layer0/best_corr"] == rb["spec_full/layer0/best_corr"]


def test_default_workdir_names_are_plain_directory_names():
  """``tfds:NAME`` variants and variant lists give one path component of
  letters, digits and ``._-`` (no ``:`` that breaks on some file systems)."""
  cfg = ml_collections.ConfigDict({"a": 1})
  path = common.default_workdir("train", "tfds:svhn_cropped,pgd_at", cfg)
  head, name = os.path.split(path)
  assert head == "runs"
  assert name.startswith("train_tfds-svhn_cropped-pgd_at_")
  assert all(c.isalnum() or c in "._-" for c in name)
  # Other configs never share a directory.
  assert path != common.default_workdir(
      "train", "tfds:svhn_cropped,pgd_at", ml_collections.ConfigDict({"a": 2}))


def test_table_overrides_reach_every_run():
  """The tables' ``--config.FIELD=VALUE`` overrides and budgets set nested
  fields of each run's config (tuples from lists), and a field a method's
  config lacks is reported, not set."""
  from experiments import distill_table
  from tsjax.configs import adv_train
  c = adv_train.get_config("fashion_mnist,ard")
  missing = common.apply_overrides(c, {
      "data.train_subset": 123, "train.boundaries": [1, 2],
      "method.attack.steps": 3, "method.options.no_such": 1, "nope.x": 2})
  assert (c.data.train_subset, c.train.boundaries, c.method.attack.steps) == (
      123, (1, 2), 3)
  assert missing == ["method.options.no_such", "nope.x"]
  s = distill_table.student_config("ard", "fashion_mnist", 1, "/t",
                                   {"train.epochs": 2})
  budget = {**distill_table.STUDENT_BUDGET, "train.epochs": 2}
  for path, value in budget.items():
    node = s
    for p in path.split("."):
      node = node[p]
    assert node == value, path
  assert (s.seed, s.teacher.checkpoint) == (1, "/t")


def test_evaluate_cli_config_error_is_one_line(tmp_path):
  """experiments.evaluate shares the experiments' launcher: a bad field ends
  in one line naming it, exit status 2, before anything is loaded."""
  p = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", "--config",
       "configs/evaluate.py", f"--config.checkpoint={tmp_path / 'none'}",
       "--compilation_cache=off"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={**os.environ, "XLA_FLAGS": ""})
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("config error: config field 'checkpoint'")
  assert "Traceback" not in p.stderr


def test_validation_split_must_fit_the_training_subset():
  """Checked with the other fields, before any data is read."""
  from experiments import train
  from tsjax.configs import adv_train
  from tsjax.config_checks import ConfigError
  c = adv_train.get_config("fashion_mnist,pgd_at")
  c.data.train_subset = 300                      # num_val stays 5000
  with pytest.raises(ConfigError, match=r"'data.num_val' \(5000\) must be "
                     r"below 'data.train_subset' \(300\)"):
    train.validate(c)
  c.data.num_val = 100
  train.validate(c)


def test_add_xla_flags_keeps_what_the_user_set(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_cpu_experimental_ynn_fusion_type=dot")
  assert common.add_xla_flags(common.IMAGE_XLA_FLAGS) == []
  assert os.environ["XLA_FLAGS"].endswith("ynn_fusion_type=dot")
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  assert common.add_xla_flags(common.IMAGE_XLA_FLAGS) == list(
      common.IMAGE_XLA_FLAGS)
  assert os.environ["XLA_FLAGS"] == "--xla_foo=1 " + common.IMAGE_XLA_FLAGS[0]
  monkeypatch.delenv("XLA_FLAGS")
  common.add_xla_flags(common.IMAGE_XLA_FLAGS)
  assert os.environ["XLA_FLAGS"] == common.IMAGE_XLA_FLAGS[0]

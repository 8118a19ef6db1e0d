"""The specialization study on real images (experiments/specialization.py):
the smoke variant end to end, resuming, the same rows from the same runs, and
config errors before anything trains."""

import json
import os
import types

import numpy as np
import pytest

from experiments import specialization as study
from tsjax.config_checks import ConfigError
from tsjax.configs import specialization as configs
from tsjax.data import images
from tsjax.metrics import stats

needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(images.DEFAULT_FASHION_MNIST_DIR),
    reason=f"needs `{images.FASHION_MNIST_APT}`")


@needs_fmnist
def test_smoke_study_end_to_end_and_resume(tmp_path):
  c = configs.get_config("fashion_mnist,smoke")
  out = study.run(c, str(tmp_path))
  rows = out["rows"]
  assert [(r["method"], r["seed"]) for r in rows] == [
      (m, s) for s in c.seeds for m in c.methods]
  for r in rows:
    assert r["k"] == out["k"] and 1 <= r["k"] < 784
    for name in ("clean_acc", "pgd_acc", "pgd_in_acc", "pgd_orth_acc"):
      assert 0.0 <= r[name] <= 1.0
    # An attack is no help to the model: unrestricted PGD searches a ball
    # that contains both restricted ones' (same radius, same steps).
    assert r["pgd_acc"] <= r["clean_acc"]
    assert r["num_layers"] == 3        # small CNN: conv1, conv2, fc1
    for kind in study.KINDS:
      for li in range(3):
        assert 0.0 < r[f"spec_{kind}/layer{li}"] <= 1.0 + 1e-6
        per_unit = np.asarray(r[f"success_{kind}/layer{li}"])
        # the summary's mean over teacher units (dead units left out)
        assert per_unit.max() <= 1.0 + 1e-6
    assert len(r["success_clean/layer0"]) == c.teacher.kwargs.features[0]
  for f in ("summary.md", "specialization_vs_robustness.png",
            "success_per_unit.png", "results.jsonl"):
    assert os.path.getsize(tmp_path / f) > 0
  text = (tmp_path / "summary.md").read_text()
  assert "| clean | 2 | all | 3 |" in text
  corr = study.correlations(rows, c)
  want = stats.spearman([r["spec_clean/layer2"] for r in rows],
                        [r["pgd_acc"] for r in rows])
  got = [x for x in corr if (x["kind"], x["layer"], x["runs"]) ==
         ("clean", 2, "all")][0]["rho"]
  np.testing.assert_allclose(got, want)
  # Resuming trains nothing and measures nothing again...
  mtimes = {d: os.path.getmtime(tmp_path / d / "results.json")
            for d in ("teacher", "standard_s0", "kd_s0")}
  again = study.run(c, str(tmp_path))
  assert again["rows"] == rows
  assert mtimes == {d: os.path.getmtime(tmp_path / d / "results.json")
                    for d in mtimes}
  # ... and a changed config is refused before anything is written.
  saved = (tmp_path / "config.json").read_text()
  c2 = configs.get_config("fashion_mnist,smoke")
  c2.eval.pgd_steps = 3
  with pytest.raises(ValueError, match="eval.pgd_steps"):
    study.run(c2, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == saved
  # (test_same_seeds_same_rows, slow: the same rows from scratch.)


def _rows(per_method, n_layers=1, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for m, n in per_method.items():
    for s in range(n):
      r = {"method": m, "seed": s, "num_layers": n_layers,
           "pgd_acc": float(rng.uniform()), "clean_acc": 0.9}
      for kind in study.KINDS:
        for li in range(n_layers):
          r[f"spec_{kind}/layer{li}"] = float(rng.uniform())
      rows.append(r)
  return rows


def test_summary_reports_no_correlation_for_fewer_than_min_runs():
  """No interval or rho from fewer than eval.min_runs (8) runs; the groups
  that have them get rho, interval and a permutation p-value."""
  c = configs.get_config("fashion_mnist")
  c.eval.bootstrap, c.eval.permutations = 200, 500
  rows = _rows({"standard": 3, "pgd_at": 8, "iad": 7})
  corr = {(x["kind"], x["runs"]): x for x in study.correlations(rows, c)}
  for kind in study.KINDS:
    for name, n in (("standard", 3), ("iad", 7)):
      x = corr[(kind, name)]
      assert x["n"] == n and x["rho"] is x["low"] is x["p"] is None
    for name in ("pgd_at", "all"):
      x = corr[(kind, name)]
      assert x["rho"] is not None and 0 < x["p"] <= 1
      assert x["low"] <= x["rho"] <= x["high"]
  sub = types.SimpleNamespace(k=5, explained=0.9)
  text = study.summary_markdown(c, rows, sub)
  assert "| clean | 0 | standard | 3 | n too small | – | – |" in text
  assert "| clean | 0 | iad | 7 | n too small | – | – |" in text
  assert "| clean | 0 | pgd_at | 8 | n too small" not in text


def test_config_errors_before_training(tmp_path):
  c = configs.get_config("fashion_mnist,smoke")
  c.methods = ("standard", "nope")
  with pytest.raises(ConfigError, match="'methods' names 'nope'"):
    study.run(c, str(tmp_path))
  c = configs.get_config("fashion_mnist,smoke")
  c.student.overrides.train.no_such_field = 1
  with pytest.raises(ConfigError, match="'student.overrides' sets "
                     r"\['train.no_such_field'\]"):
    study.run(c, str(tmp_path))
  c = configs.get_config("fashion_mnist,smoke")
  c.eval.conv_samples = "mean"
  with pytest.raises(ConfigError, match="eval.conv_samples"):
    study.run(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "teacher")
  with pytest.raises(ValueError, match="unknown variant"):
    configs.get_config("cifar10")


def test_student_is_the_teacher_widened():
  c = configs.get_config("fashion_mnist")
  kw = study.student_kwargs(c)
  assert kw == {"features": (16, 32), "hidden": 64}
  s = study.student_config(c, "ard", 3, "/teacher")
  assert (s.seed, s.teacher.checkpoint, s.model.kwargs.hidden) == (
      3, "/teacher", 64)
  assert s.data.train_subset == c.student.overrides.data.train_subset
  t = study.teacher_config(c)
  assert t.method.name == "pgd_at" and t.model.kwargs.features == (8, 16)


@needs_fmnist
@pytest.mark.slow
def test_same_seeds_same_rows(tmp_path):
  """Two smoke studies from scratch in separate directories: the same rows,
  to the last digit (training, subspace and measurements deterministic)."""
  c = configs.get_config("fashion_mnist,smoke")
  a = study.run(c, str(tmp_path / "a"))["rows"]
  b = study.run(c, str(tmp_path / "b"))["rows"]
  assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

"""A small seed sweep of the teacher–student study, from Python.

What it shows: the study of ``python -m experiments.teacher_student`` is a
pure function of one seed's key, ``TeacherStudent(config).run(key)`` (data
subspace, teacher, student init, every regime trained and evaluated), and
``seed_sweep`` turns it into one jitted function of many keys (``vmap`` on a
device, ``shard_map`` across devices). The config is the installed default
(``tsjax.configs.get_config("teacher_student")``) with a smaller budget:
4 seeds, two regimes (standard training and PGD-AT), 6 000 SGD steps, a
cheaper robustness evaluation. Printed per seed: in-subspace and full-rank
specialization (mean best teacher–student correlation), the first-layer
drift off the data subspace, clean MSE and robust (unrestricted L2 PGD)
relative MSE, then the means over seeds. Even at this budget the study's
pattern shows: standard students never move off span(U) (drift ~1e-14) and
specialise far less on full-rank inputs than PGD-AT students, which are
also more robust.

Precision: the study defaults to float64 (``config.dtype = "float64"``: in
float32, rounding alone moves the first-layer weights off span(U) by ~1e-4,
hiding standard training's exact invariance), so JAX's 64-bit mode is
switched on first; ``TeacherStudent`` refuses a float64 config without it.
Set ``config.dtype = "float32"`` instead to run in single precision.

Nothing is downloaded or written. Run from the repository root:

  python examples/seed_sweep_teacher_student.py      # ~20 s on a 2-core CPU
"""

import time

import jax
import numpy as np

from tsjax import configs
from tsjax.train import seed_keys, seed_sweep
from tsjax.train.teacher_student import TeacherStudent

METRICS = {                              # result key -> column title
    "spec_in/mean_best": "spec in",
    "spec_full/mean_best": "spec full",
    "drift_perp": "P_perp drift",
    "clean_in/mse": "clean MSE",
    "robust_full/rel_mse": "robust rel-MSE",
}


def small_config():
  """The default study config with a budget that runs in seconds."""
  config = configs.get_config("teacher_student")
  config.num_seeds = 4
  config.regimes = ("standard", "pgd_at")
  config.data.n_train = 1000
  config.data.n_eval = 256
  config.train.steps = 6000
  config.eval.steps = 5
  config.eval.restarts = 2
  config.eval.attacks = ("full",)
  config.eval.corr_batch = 128
  return config


def main():
  jax.config.update("jax_enable_x64", True)    # the study's float64 default
  t0 = time.time()
  config = small_config()
  study = TeacherStudent(config)               # validates the config
  keys = seed_keys(config.seed, config.num_seeds)
  results = seed_sweep(study.run)(keys)        # every metric, leading axis S
  results = jax.tree.map(np.asarray, results)
  seeds = range(config.seed, config.seed + config.num_seeds)
  print(f"{config.num_seeds} seeds x {len(study.regimes)} regimes, "
        f"{config.train.steps} steps, dtype {config.dtype}, on "
        f"{jax.device_count()} device(s)")
  header = f"{'regime':>8} {'seed':>4} " + " ".join(
      f"{t:>14}" for t in METRICS.values())
  for regime in study.regimes:
    print(header)
    r = results[regime]
    for i, seed in enumerate(seeds):
      print(f"{regime:>8} {seed:>4} " + " ".join(
          f"{r[k][i]:>14.4g}" for k in METRICS))
    print(f"{regime:>8} {'mean':>4} " + " ".join(
        f"{r[k].mean():>14.4g}" for k in METRICS))
  print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
  main()

r"""Specialization on real images: does a student that matches its robust
teacher unit by unit inherit its robustness?

  python -m experiments.specialization --config configs/specialization.py:fashion_mnist
  python -m experiments.specialization --config configs/specialization.py:fashion_mnist,smoke

One robust teacher (PGD-AT, ``configs/adv_train.py:DATASET,pgd_at`` with
``teacher.overrides``) and over-realised students: the teacher's
architecture with every width multiplied by ``student.multiple`` (Tian 2019
and Yang et al. 2021 use students wider than the teacher), each trained by
every method of ``methods`` (``configs/adv_train.py:DATASET,METHOD`` with
``student.overrides``) for every seed of ``seeds``. Every run is then
measured (``eval``): per-layer teacher–student specialization on clean test
images, on test images moved off the training images' PCA subspace
(``subspace``), and on the student's own PGD adversarial examples; clean and
robust accuracy under PGD unrestricted, restricted to the subspace and to its
complement; AutoAttack accuracy from the training run.

Variants: ``fashion_mnist`` (the committed study; a 2-core CPU budget),
``within`` (added to it: the four methods whose within-method question
matters, standard, PGD-AT, IAD and AdvFunMatch, at ``WITHIN_SEEDS`` seeds on
a smaller student budget, so that a within-method correlation rests on at
least ``eval.min_runs`` runs) and ``smoke`` (a few steps on small subsets;
what the tests run).
"""

import ml_collections

# Every method of the study: from scratch (standard, PGD-AT), the remedy of
# Yang et al. (off-subspace augmentation) and the distillation methods.
METHODS = ("standard", "pgd_at", "offsubspace", "kd", "ard", "rslad", "iad",
           "peeraid", "advfunmatch")
WITHIN_METHODS = ("standard", "pgd_at", "iad", "advfunmatch")
WITHIN_SEEDS = tuple(range(8))
VARIANTS = ("fashion_mnist", "within", "smoke")


def _nested(dotted: dict) -> ml_collections.ConfigDict:
  """``{"train.epochs": 3}`` -> ``{"train": {"epochs": 3}}``: fields of
  ``configs/adv_train.py`` to set in every run, overridable on the command
  line as ``--config.student.overrides.train.epochs=5``."""
  out = {}
  for path, value in dotted.items():
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return ml_collections.ConfigDict(out)


def get_config(arg: str = "fashion_mnist") -> ml_collections.ConfigDict:
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  unknown = [p for p in parts if p not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown} of "
                     f"configs/specialization.py; expected some of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.dataset = "fashion_mnist"
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.methods = METHODS
  c.seeds = (0, 1, 2)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.model = "small_cnn"
  c.teacher.kwargs = ml_collections.ConfigDict({"features": (8, 16),
                                                "hidden": 32})
  c.teacher.overrides = _nested({
      "data.train_subset": 20000, "train.epochs": 4, "train.boundaries": (3,),
      "method.attack.steps": 5, "method.attack.step_size": 0.05,
      "eval.val_subset": 1000, "data.test_subset": 2000})

  c.student = ml_collections.ConfigDict()
  c.student.multiple = 2          # every width x2: an over-realised student
  c.student.overrides = _nested({
      "data.train_subset": 10000, "data.num_val": 1000,
      "data.test_subset": 1000, "train.epochs": 3, "train.boundaries": (2,),
      "method.attack.steps": 5, "method.attack.step_size": 0.05,
      "eval.val_subset": 500, "eval.autoattack_subset": 200,
      "eval.autoattack_params": ("best",)})

  c.subspace = ml_collections.ConfigDict()
  c.subspace.variance = 0.9       # k: smallest with >= 90% of the variance
  c.subspace.max_examples = 20000

  c.eval = ml_collections.ConfigDict()
  c.eval.num_images = 1000        # test images for every measurement
  c.eval.batch_size = 250
  c.eval.eps = 0.1                # L-inf, the training attack's radius
  c.eval.pgd_steps = 20
  c.eval.pgd_step_size = 0.0125   # 2.5 eps / steps
  c.eval.conv_samples = "positions"
  c.eval.thresholds = (0.5, 0.8, 0.9)
  c.eval.bootstrap = 2000         # resamples of every confidence interval
  c.eval.permutations = 10000     # of the permutation p-values (exact if n! <=)
  # Fewer runs than this: no correlation is reported for the group (with 3
  # runs a rank correlation takes only four values).
  c.eval.min_runs = 8

  if "within" in parts:
    c.methods, c.seeds = WITHIN_METHODS, WITHIN_SEEDS
    c.student.overrides = _nested({
        "data.train_subset": 6000, "data.num_val": 1000,
        "data.test_subset": 1000, "train.epochs": 2, "train.boundaries": (1,),
        "method.attack.steps": 5, "method.attack.step_size": 0.05,
        "eval.val_subset": 500, "eval.autoattack_subset": 0})
    c.eval.num_images = 500

  if "smoke" in parts:
    c.methods = ("standard", "kd", "offsubspace")
    c.seeds = (0,)
    c.teacher.overrides = _nested({
        "data.train_subset": 600, "data.num_val": 100, "data.test_subset": 100,
        "train.epochs": 1, "train.boundaries": (), "train.batch_size": 64,
        "method.attack.steps": 2, "eval.val_subset": 100,
        "eval.val_pgd_steps": 2, "eval.pgd_steps": 2})
    c.student.overrides = _nested({
        "data.train_subset": 400, "data.num_val": 100, "data.test_subset": 100,
        "train.epochs": 1, "train.boundaries": (), "train.batch_size": 64,
        "method.attack.steps": 2, "eval.val_subset": 100,
        "eval.val_pgd_steps": 2, "eval.pgd_steps": 2,
        "eval.autoattack_subset": 0})
    c.subspace.max_examples = 600
    c.eval.num_images = 64
    c.eval.batch_size = 32
    c.eval.pgd_steps = 2
    c.eval.pgd_step_size = 0.05
    c.eval.bootstrap = 200
    c.eval.permutations = 200
    c.eval.min_runs = 1
  return c

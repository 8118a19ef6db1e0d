"""Teacher–student robustness study (Yang et al., AISTATS 2021).

Launch (from the repository root):

  python -m experiments.teacher_student --config configs/teacher_student.py \
      --workdir runs/teacher_student
  python -m experiments.teacher_student --config configs/teacher_student.py:smoke
  python -m experiments.teacher_student --config configs/teacher_student.py \
      --config.num_seeds=8 --config.student.multi=5

Defaults follow the settings an independent implementation found to train
reliably (spec §1.5 [MEASURED]): d = 50, k = 10, m = 10 teacher nodes, c = 10
outputs, sigma = 1.5, strength decay p = 1, student = 2 x teacher width, init
N(0, 0.005^2), plain SGD lr 0.01, batch 16, no weight decay. Radii are fractions
of the typical input norm sigma * sqrt(k).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                 # first seed; seeds are seed, seed+1, ...
  c.num_seeds = 8            # 8 seeds x 5 regimes: ~3 min on a 2-core CPU
  c.dtype = "float64"        # float32 rounding alone moves W1 off-span by ~1e-4
  c.regimes = ("standard", "pgd_at", "ccat", "offsubspace", "robust_features")
  c.checkpoint_every = 5000  # training steps between checkpoints

  c.data = ml_collections.ConfigDict()
  c.data.d = 50              # input dimension
  c.data.k = 10              # rank of the data subspace
  c.data.sigma = 1.5         # z ~ N(0, sigma^2 I_k)
  c.data.n_train = 10_000
  c.data.n_eval = 2048
  c.data.noise_in = 0.0      # optional per-coordinate noise inside span(U)
  c.data.noise_out = 0.0     # ... and outside it (breaks the low-rank property)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.widths = (10,)   # hidden widths; more entries = multi-layer
  c.teacher.outputs = 10
  c.teacher.strength_decay = 1.0
  c.teacher.bias = -0.1
  c.teacher.centre_bias = False
  c.teacher.normalise_output = False

  c.student = ml_collections.ConfigDict()
  c.student.multi = 2        # student width = multi x teacher width
  c.student.init_std = 0.005

  c.train = ml_collections.ConfigDict()
  c.train.steps = 30_000
  c.train.batch_size = 16
  c.train.lr = 0.01
  c.train.momentum = 0.0
  c.train.weight_decay = 0.0

  # Attack used by PGD-AT and CCAT training.
  c.adv = ml_collections.ConfigDict()
  c.adv.norm = "l2"
  c.adv.eps_frac = 0.5       # eps = eps_frac * sigma * sqrt(k)
  c.adv.steps = 5
  c.adv.step_frac = 0.5      # step = step_frac * eps

  c.ccat = ml_collections.ConfigDict()
  c.ccat.rho = 10.0
  c.ccat.clean_fraction = 0.5

  c.offsubspace = ml_collections.ConfigDict()
  c.offsubspace.scale = 1.0  # x std, in units of the full-rank per-coord std
  c.offsubspace.fraction = 0.5

  c.robust_features = ml_collections.ConfigDict()
  c.robust_features.source = "pgd_at"
  c.robust_features.steps = 500
  c.robust_features.step_frac = 0.1
  c.robust_features.init = "shuffled"

  c.eval = ml_collections.ConfigDict()
  c.eval.norm = "l2"
  c.eval.eps_frac = 0.25
  c.eval.steps = 20
  c.eval.step_frac = 0.125   # 2.5 * eps / steps
  c.eval.restarts = 10
  c.eval.attacks = ("full", "in", "orth")
  c.eval.thresholds = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
  c.eval.corr_batch = 512

  # Several processes (jax.distributed; tsjax.train.distributed.settings):
  # auto=True joins the cluster JAX detects (SLURM srun, Open MPI, TPU pods);
  # or an explicit coordinator "host:port" with the two fields below.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.auto = False
  c.distributed.coordinator_address = ml_collections.FieldReference(
      None, field_type=str)
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  # XLA CPU devices of each process: "cores" (one per core; the regimes then
  # train side by side, see experiments/teacher_student.py), an integer, or
  # None for JAX's default (one). XLA_FLAGS'
  # --xla_force_host_platform_device_count wins.
  c.distributed.cpu_devices = "cores"

  for part in filter(None, (p.strip() for p in arg.split(","))):
    if part == "smoke":
      c.num_seeds = 2
      c.data.n_train = 1000
      c.data.n_eval = 256
      c.train.steps = 600
      c.checkpoint_every = 300
      c.robust_features.steps = 50
      c.eval.restarts = 2
      c.eval.steps = 5
    else:
      raise ValueError(f"unknown variant {part!r} of configs/teacher_student.py;"
                       " known: smoke")
  return c

"""The synthetic teacher–student study as pure, seed-vmappable functions.

``TeacherStudent(config)`` validates the config (``ValueError`` naming the
field, before anything is traced) and exposes the pieces of one seed's run:

* ``problem(key)``: subspace U, teacher, data sets, the student's initial
  parameters — shared by every regime of that seed (same teacher, data, init
  and batch order, so regime differences are clean);
* ``init_state(problem)`` and ``train(regime, state, problem, num_steps)``;
* ``robust_dataset(source_state, problem)``: the Ilyas et al. inputs;
* ``evaluate(state, problem)``: specialization (in-subspace and full-rank
  data, per hidden layer), first-layer off-subspace drift, clean and robust
  errors (unrestricted, in-subspace and off-subspace attacks);
* ``run(key)``: everything above for every configured regime.

``run_seeds(config, keys)`` runs whole studies for a batch of seeds at once
(``vmap`` on a device, ``shard_map`` across devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from tsjax import config_checks as cc
from tsjax.attacks import NORMS
from tsjax.data import robust_features, synthetic
from tsjax.methods import ccat, offsubspace, pgd_at, standard
from tsjax.attacks import AttackSpec
from tsjax.methods.teacher_student import Networks, ts_attack
from tsjax.metrics import robustness, specialization as spec
from tsjax.models.mlp import MLP, check_student_widths, student_widths
from tsjax.train.loop import train_steps
from tsjax.train.state import TrainState, make_train_step
from tsjax.train.sweep import seed_sweep


@dataclasses.dataclass(frozen=True)
class Regime:
  """One training regime of the study.

  ``make_loss(study)``: its training loss (the tsjax method signature),
  built from the study's networks, attack scales and config.
  ``step_cost(config)``: the relative time of one of its training steps (a
  standard step = 1) as measured on a CPU with the default config; it
  balances regimes trained side by side over devices. ``synthesized``:
  trained on a data set synthesised from another regime's final students.
  """
  make_loss: Callable[[Any], Callable]
  step_cost: Callable[[Any], float] = lambda config: 1.0
  synthesized: bool = False


def _adversarial_cost(config) -> float:
  # ~1.5 per forward-backward pass: the attack steps and the update.
  return 1.5 * (int(config.adv.steps) + 1)


def _offsubspace_loss(study):
  c = study.config
  std = synthetic.fullrank_std(c.data.sigma, c.data.d, c.data.k)
  return offsubspace.make_ts_loss(study.nets, scale=c.offsubspace.scale * std,
                                  fraction=c.offsubspace.fraction)


REGISTRY = {
    "standard": Regime(lambda s: standard.make_ts_loss(s.nets)),
    "pgd_at": Regime(lambda s: pgd_at.make_ts_loss(s.nets, s.scales.adv),
                     _adversarial_cost),
    "ccat": Regime(lambda s: ccat.make_ts_loss(
        s.nets, s.scales.adv, rho=s.config.ccat.rho,
        clean_fraction=s.config.ccat.clean_fraction), _adversarial_cost),
    # ~4: the noise draws.
    "offsubspace": Regime(_offsubspace_loss, lambda config: 4.0),
    "robust_features": Regime(lambda s: standard.make_ts_loss(s.nets),
                              synthesized=True),
}
REGIMES = tuple(REGISTRY)
TRAINED_ON_SYNTHESIZED = tuple(r for r in REGIMES if REGISTRY[r].synthesized)
ATTACK_RESTRICTIONS = {"full": None, "in": "in", "orth": "orth"}
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}

REQUIRED_FIELDS = (
    "seed", "num_seeds", "dtype", "regimes",
    "data.d", "data.k", "data.sigma", "data.n_train", "data.n_eval",
    "data.noise_in", "data.noise_out",
    "teacher.widths", "teacher.outputs", "teacher.strength_decay",
    "teacher.bias", "teacher.centre_bias", "teacher.normalise_output",
    "student.multi", "student.init_std",
    "train.steps", "train.batch_size", "train.lr", "train.momentum",
    "train.weight_decay",
    "adv.norm", "adv.eps_frac", "adv.steps", "adv.step_frac",
    "ccat.rho", "ccat.clean_fraction",
    "offsubspace.scale", "offsubspace.fraction",
    "robust_features.source", "robust_features.steps",
    "robust_features.step_frac", "robust_features.init",
    "eval.norm", "eval.eps_frac", "eval.steps", "eval.step_frac",
    "eval.restarts", "eval.attacks", "eval.thresholds", "eval.corr_batch",
)


def validate(config) -> None:
  """Checks every field the study reads; raises ``ConfigError`` (a ValueError)."""
  cc.require_fields(config, REQUIRED_FIELDS)
  cc.check_number(config, "seed", low=0, integer=True)
  cc.check_number(config, "num_seeds", low=1, integer=True)
  cc.check_choice(config, "dtype", tuple(DTYPES))
  if config.dtype == "float64" and not jax.config.jax_enable_x64:
    raise cc.ConfigError(
        "config field 'dtype' is 'float64' but JAX 64-bit mode is off; set "
        "JAX_ENABLE_X64=1 or call jax.config.update('jax_enable_x64', True) "
        "before using JAX (experiments/teacher_student.py does this)")
  regimes = cc.check_sequence_choices(config, "regimes", REGIMES)
  d = cc.check_number(config, "data.d", low=1, integer=True)
  k = cc.check_number(config, "data.k", low=1, integer=True)
  if k > d:
    raise cc.ConfigError(f"config field 'data.k' (subspace rank) must be <= "
                         f"'data.d' (input dimension); got k={k} > d={d}")
  cc.check_number(config, "data.sigma", low=0, low_open=True)
  cc.check_number(config, "data.n_train", low=1, integer=True)
  cc.check_number(config, "data.n_eval", low=2, integer=True)
  cc.check_number(config, "data.noise_in", low=0)
  cc.check_number(config, "data.noise_out", low=0)
  widths = tuple(config.teacher.widths)
  if not widths or not all(cc.is_positive_int(w) for w in widths):
    raise cc.ConfigError(f"config field 'teacher.widths' must be a non-empty "
                         f"tuple of positive integers, got {widths!r}")
  cc.check_number(config, "teacher.outputs", low=1, integer=True)
  cc.check_number(config, "teacher.strength_decay", low=0)
  cc.check_number(config, "teacher.bias")
  multi = config.student.multi
  if isinstance(multi, (tuple, list)):  # explicit widths
    try:
      check_student_widths(widths, tuple(multi))
    except ValueError as e:
      raise cc.ConfigError(f"config field 'student.multi': {e}") from None
  else:
    if not cc.is_positive_int(multi):
      raise cc.ConfigError(
          f"config field 'student.multi' must be a positive integer (student "
          f"width = multi x teacher width) or a tuple of student widths that "
          f"are multiples of the teacher's {widths}; got {multi!r}")
  cc.check_number(config, "student.init_std", low=0, low_open=True)
  cc.check_number(config, "train.steps", low=0, integer=True)
  cc.check_number(config, "train.batch_size", low=1, integer=True)
  cc.check_number(config, "train.lr", low=0, low_open=True)
  cc.check_number(config, "train.momentum", low=0, high=1)
  cc.check_number(config, "train.weight_decay", low=0)
  for sect in ("adv", "eval"):
    cc.check_choice(config, f"{sect}.norm", NORMS)
    cc.check_number(config, f"{sect}.eps_frac", low=0)
    cc.check_number(config, f"{sect}.steps", low=1, integer=True)
    cc.check_number(config, f"{sect}.step_frac", low=0, low_open=True)
  cc.check_number(config, "eval.restarts", low=1, integer=True)
  cc.check_sequence_choices(config, "eval.attacks", tuple(ATTACK_RESTRICTIONS))
  for t in tuple(config.eval.thresholds):
    if not -1.0 <= t <= 1.0:
      raise cc.ConfigError(f"config field 'eval.thresholds' entries must lie in "
                           f"[-1, 1], got {t!r}")
  cc.check_number(config, "eval.corr_batch", low=1, integer=True)
  cc.check_number(config, "ccat.rho", low=0, low_open=True)
  if "ccat" in regimes and not config.adv.eps_frac > 0:
    raise cc.ConfigError("config field 'adv.eps_frac' must be > 0 when 'ccat' "
                         "is among the regimes (CCAT's transition divides by "
                         "eps)")
  cc.check_number(config, "ccat.clean_fraction", low=0, high=1)
  cc.check_number(config, "offsubspace.scale", low=0)
  cc.check_number(config, "offsubspace.fraction", low=0, high=1)
  cc.check_number(config, "robust_features.steps", low=1, integer=True)
  cc.check_number(config, "robust_features.step_frac", low=0, low_open=True)
  cc.check_choice(config, "robust_features.init", ("shuffled", "gaussian"))
  src = cc.check_choice(config, "robust_features.source",
                        tuple(r for r in REGIMES if r not in
                              TRAINED_ON_SYNTHESIZED))
  if "robust_features" in regimes:
    if src not in regimes or regimes.index(src) > regimes.index(
        "robust_features"):
      raise cc.ConfigError(
          f"config field 'robust_features.source' names {src!r}, which must "
          f"be trained before 'robust_features' in 'regimes' {regimes}")


@dataclasses.dataclass(frozen=True)
class Scales:
  """Absolute radii derived from the data scale ``sigma * sqrt(k)``."""
  x_norm: float
  adv: AttackSpec
  eval: dict  # name -> AttackSpec


class TeacherStudent:
  """Pure building blocks of the study for one seed (see module docstring)."""

  def __init__(self, config):
    validate(config)
    self.config = config
    c = config
    self.dtype = DTYPES[c.dtype]
    self.regimes = cc.check_sequence_choices(c, "regimes", REGIMES)
    t_widths = tuple(int(w) for w in c.teacher.widths)
    s_widths = (tuple(int(w) for w in c.student.multi)
                if isinstance(c.student.multi, (tuple, list))
                else student_widths(t_widths, c.student.multi))
    self.teacher_widths, self.student_widths = t_widths, s_widths
    self.nets = Networks(
        teacher=MLP(t_widths, int(c.teacher.outputs), param_dtype=self.dtype),
        student=MLP(s_widths, int(c.teacher.outputs), init_std=c.student.init_std,
                    param_dtype=self.dtype))
    x_norm = float(c.data.sigma) * float(c.data.k) ** 0.5
    adv = ts_attack(c.adv.norm, c.adv.eps_frac * x_norm,
                    c.adv.step_frac * c.adv.eps_frac * x_norm, c.adv.steps)
    ev = {name: ts_attack(c.eval.norm, c.eval.eps_frac * x_norm,
                          c.eval.step_frac * c.eval.eps_frac * x_norm,
                          c.eval.steps, c.eval.restarts,
                          ATTACK_RESTRICTIONS[name])
          for name in cc.check_sequence_choices(c, "eval.attacks",
                                                tuple(ATTACK_RESTRICTIONS))}
    self.scales = Scales(x_norm=x_norm, adv=adv, eval=ev)
    self.optimizer = self._optimizer()
    self._steps = {r: make_train_step(self._loss(r), self.optimizer)
                   for r in self.regimes}

  # ----------------------------------------------------------------- pieces
  def _optimizer(self):
    t = self.config.train
    parts = []
    if t.weight_decay:
      parts.append(optax.add_decayed_weights(t.weight_decay))
    parts.append(optax.sgd(t.lr, momentum=t.momentum or None))
    return optax.chain(*parts)

  def _loss(self, regime):
    return REGISTRY[regime].make_loss(self)

  def train_cost(self, regime) -> float:
    """Relative time of one training step of ``regime`` (a standard step =
    1; ``Regime.step_cost``): used to balance regimes trained side by side
    over devices."""
    return REGISTRY[regime].step_cost(self.config)

  def problem(self, key) -> dict:
    """One seed's subspace, teacher, data sets and student initialisation."""
    c, dt = self.config, self.dtype
    ku, kt, kx, ke, kf, ks, kb, kr = jax.random.split(key, 8)
    U = synthetic.make_subspace(ku, c.data.d, c.data.k, dt)
    sample = lambda k, n: synthetic.sample_lowrank(
        k, U, n, c.data.sigma, noise_in=c.data.noise_in,
        noise_out=c.data.noise_out)
    x_train = sample(kx, c.data.n_train)
    x_eval = sample(ke, c.data.n_eval)
    teacher = synthetic.make_teacher(
        kt, c.data.d, self.teacher_widths, c.teacher.outputs,
        strength_decay=c.teacher.strength_decay, bias=c.teacher.bias,
        centre_bias=c.teacher.centre_bias,
        normalise_output=c.teacher.normalise_output, x_ref=x_train, dtype=dt)
    x_full = synthetic.sample_fullrank(kf, c.data.n_eval, c.data.d, c.data.k,
                                       c.data.sigma, dt)
    student0 = self.nets.student.init(ks, jnp.zeros((1, c.data.d), dt))["params"]
    y_mean = jnp.mean(self.nets.teacher.apply(teacher, x_train), axis=0)
    out = {"U": U, "teacher": teacher, "y_mean": y_mean, "x_train": x_train,
           "x_eval": x_eval, "x_full": x_full, "student0": student0,
           "batch_key": kb, "aux_key": kr}
    if not c.data.noise_out:
      # The training inputs in the basis U (x_train = z_train U^T up to
      # rounding): training gathers its batches from these k columns instead
      # of x_train's d (see ``train_data``).
      out["z_train"] = synthetic.sample_lowrank_latent(
          kx, U, c.data.n_train, c.data.sigma, noise_in=c.data.noise_in)
    return out

  @staticmethod
  def ctx(problem) -> dict:
    return {"teacher": problem["teacher"], "U": problem["U"],
            "y_mean": problem["y_mean"]}

  def init_state(self, problem) -> TrainState:
    return TrainState.create(problem["student0"], self.optimizer,
                             problem["batch_key"])

  @staticmethod
  def train_data(problem, x_train=None):
    """The training set as ``train`` samples it: ``x_train`` if given, else
    the problem's inputs, as ``LowRankData(z_train, U)`` when they are
    exactly low-rank (no ``data.noise_out``). Batches rebuilt from the
    coordinates equal rows of ``problem["x_train"]`` up to rounding (~1 ulp);
    the gather then reads k instead of d numbers per example. Works on
    seed-batched problems too."""
    if x_train is not None:
      return x_train
    if "z_train" in problem:
      return synthetic.LowRankData(z=problem["z_train"], U=problem["U"])
    return problem["x_train"]

  def train(self, regime, state, problem, num_steps, x_train=None):
    """``num_steps`` steps of a regime; ``x_train`` (an array or a
    ``train_data`` result) overrides the data set."""
    return train_steps(self._steps[regime], state,
                       self.train_data(problem, x_train), self.ctx(problem),
                       int(num_steps), int(self.config.train.batch_size))

  def robust_dataset(self, source_state, problem):
    """Ilyas et al. inputs re-synthesised from the source student's last
    hidden layer (``robust_features.source`` regime)."""
    c = self.config.robust_features
    params = source_state.params
    rep = lambda x: self.nets.student.apply({"params": params}, x,
                                            return_hidden=True)[1][-1]
    return robust_features.synthesize(
        rep, problem["x_train"], jax.random.fold_in(problem["aux_key"], 1),
        steps=int(c.steps), step_size=c.step_frac * self.scales.x_norm,
        init=c.init, init_std=synthetic.fullrank_std(
            self.config.data.sigma, self.config.data.d, self.config.data.k))

  def evaluate(self, state, problem, x_train=None) -> dict:
    """Every metric of a trained student (pure; vmap over seeds)."""
    c, nets = self.config, self.nets
    ctx = self.ctx(problem)
    params = state.params
    acts = lambda x: nets.hiddens(params, ctx, x)
    out = {}
    for name, xs in (("in", problem["x_eval"]), ("full", problem["x_full"])):
      stats = spec.streamed_correlations(acts, xs, int(c.eval.corr_batch))
      for li, st in enumerate(stats):
        summ = spec.specialization_summary(spec.corr_finalize(st),
                                           tuple(c.eval.thresholds),
                                           spec.active_nodes(st))
        for key_, val in summ.items():
          out[f"spec_{name}/layer{li}/{key_}"] = val
      out[f"spec_{name}/mean_best"] = jnp.mean(jnp.stack(
          [out[f"spec_{name}/layer{li}/mean_best"] for li in range(len(stats))]))
    w1 = params["hidden_0"]["kernel"]
    out["drift_perp"] = spec.perp_drift(w1, problem["student0"]["hidden_0"]["kernel"],
                                        problem["U"])
    out["drift_in"] = jnp.linalg.norm(
        problem["U"].T @ (w1 - problem["student0"]["hidden_0"]["kernel"])) / \
        jnp.linalg.norm(problem["student0"]["hidden_0"]["kernel"])
    for name, xs in (("in", problem["x_eval"]), ("full", problem["x_full"])):
      for key_, val in robustness.clean_errors(nets, params, ctx, xs).items():
        out[f"clean_{name}/{key_}"] = val
    key = jax.random.fold_in(problem["aux_key"], 2)
    tvar = out["clean_in/teacher_var"]
    for i, (name, att) in enumerate(self.scales.eval.items()):
      r = robustness.robust_regression_error(nets, params, ctx,
                                             problem["x_eval"],
                                             jax.random.fold_in(key, i), att)
      out[f"robust_{name}/mse"] = jnp.mean(r)
      out[f"robust_{name}/rel_mse"] = jnp.mean(r) / tvar
    if x_train is not None:
      out["train_in_span_residual"] = jnp.linalg.norm(
          synthetic.project_out(x_train, problem["U"])) / jnp.linalg.norm(x_train)
    return out

  def run(self, key) -> dict:
    """A whole study for one seed: every regime trained and evaluated."""
    problem = self.problem(key)
    states, results = {}, {}
    steps = int(self.config.train.steps)
    for regime in self.regimes:
      x_train = None
      if regime in TRAINED_ON_SYNTHESIZED:
        x_train = self.robust_dataset(
            states[self.config.robust_features.source], problem)
      state, stats = self.train(regime, self.init_state(problem), problem,
                                steps, x_train)
      states[regime] = state
      results[regime] = {**self.evaluate(state, problem, x_train),
                         "train_loss": stats["loss"],
                         "all_finite": stats["all_finite"]}
    return results


def run_seeds(config, keys, devices=None) -> dict:
  """Whole studies for a batch of seeds: ``keys`` [S] -> metrics with axis S."""
  study = TeacherStudent(config)
  return seed_sweep(study.run, devices=devices)(keys)

r"""Teacher–student robustness study (Yang et al., AISTATS 2021).

Trains over-parameterised students of low-rank-data ReLU teachers under every
configured regime (standard, PGD-AT, CCAT, off-subspace augmentation, training
on a robust-feature data set) for a batch of seeds at once, then measures
student specialization (in the data subspace and on full-rank data), the
first-layer weight drift off the subspace, and robust error.

  python -m experiments.teacher_student --config configs/teacher_student.py
  python -m experiments.teacher_student --config configs/teacher_student.py:smoke \
      --workdir /tmp/ts_smoke --config.num_seeds=3

Writes to the work dir: config.json, checkpoints/ (Orbax; a killed run resumes
where it stopped), results.jsonl (one row per regime x seed, every metric and
the config), summary.md and summary.json (table, Spearman correlations, checks
of the paper's claims), specialization_vs_robust_error.png and
success_per_teacher_node.png. Prints one line per phase: each round of
trained chunks (one chunk of every regime, side by side; steps and mean loss
of each, seconds, ETA of the training) and each evaluation.

Devices (``Placement``): on one process with several devices (by default one
XLA CPU device per core, ``distributed.cpu_devices``) the regimes train side
by side, one device each. Several processes (``--config.distributed.*``, see
docs/many_hosts.md): the seeds are sharded over all devices of all processes; every
process takes part in the
checkpoints, only process 0 writes files and prints.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import time

import jax
from matplotlib.figure import Figure
import numpy as np
from absl import logging
from tqdm import tqdm

from . import common
from tsjax.metrics.stats import bootstrap_ci, spearman, spearman_rows
from tsjax.train import CheckpointStore, distributed, seed_keys, seed_sweep
from tsjax.train import teacher_student as ts
from tsjax.train.fit import format_seconds
from tsjax.backend import cpu


def run(config, workdir: str, *, progress: bool = True,
        stop_after_chunks: int | None = None,
        devices=None) -> dict | None:
  """Runs (or resumes) the study; returns final states and metrics (global
  arrays; ``tsjax.train.distributed.to_host`` reads them on any process).

  ``stop_after_chunks`` stops at the first checkpoint after that many newly
  trained chunks, as a kill would; the result is then ``None``. ``devices``:
  the devices to use (default: all, see ``Placement``).
  """
  if config.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  study = ts.TeacherStudent(config)            # validates; nothing compiled yet
  distributed.initialize(config.get("distributed"))
  main = distributed.is_main_process()
  if main:
    common.prepare_workdir(workdir, config)
  seeds = list(range(config.seed, config.seed + config.num_seeds))
  say = (print if progress else logging.info) if main else (lambda *a: None)
  place = Placement(study, devices)
  say(f"teacher-student study: {len(seeds)} seeds x {len(study.regimes)} "
      f"regimes on {jax.device_count()} {jax.default_backend()} device(s) "
      f"({distributed.describe()}; {place.describe()}); work dir {workdir}")
  keys = seed_keys(config.seed, config.num_seeds)
  setup = seed_sweep(study.problem, place.setup,
                     compiler_options=cpu.compile_options("run_once"))
  trainers = training_programs(study, place)
  with concurrent.futures.ThreadPoolExecutor(1) as background:
    ready = compile_training_ahead(background, trainers, study, config,
                                   place, keys)
    problems = setup(keys)
    datasets = Datasets(study, config, problems, place)
    evaluate = seed_sweep(study.evaluate, place.setup, sequential=True,
                          compiler_options=cpu.compile_options("run_few"))
    eval_args = lambda regime, states: (
        place.put(states[regime], place.setup), problems,
        place.put(datasets.eval_inputs(regime, states), place.setup))
    ahead = []
    states = train_all(
        study, config, workdir, datasets, seeds, say, trainers, ready,
        progress=progress and main, stop_after_chunks=stop_after_chunks,
        on_dispatched=lambda st: ahead.extend(compile_ahead(
            background, evaluate, eval_args, study, place, st)))
    for unused in ready.values():            # e.g. resumed after training
      unused.cancel()
    for done in ahead:
      done.result()                          # re-raises a failed compile
  if states is None:
    return None
  metrics = {}
  for regime in study.regimes:
    t_eval = time.time()
    metrics[regime] = distributed.to_host(evaluate(*eval_args(regime, states)))
    say(f"evaluation | {regime} | {time.time() - t_eval:.1f} s")
  if main:
    report(config, workdir, seeds, metrics)
  return {"states": states, "metrics": metrics}


def compile_ahead(pool, evaluate, eval_args, study, place, states) -> list:
  """Compiles the evaluation in ``pool`` (a background thread) while the last
  training round runs, from its still-pending final states; the evaluation
  then reuses the program. Regimes side by side only: there the devices of
  the lighter regimes finish early and a core idles until the heaviest is
  done (measured: the 3-regime protocol ~0.7 s faster on 2 cores). Regimes
  evaluated on a synthesised data set are left to compile when evaluated.
  """
  plain = [r for r in study.regimes if r not in ts.TRAINED_ON_SYNTHESIZED]
  if not (place.side_by_side and plain):
    return []
  args = eval_args(plain[0], states)
  return [pool.submit(lambda: evaluate.lower(*args).compile())]


def training_programs(study, place) -> dict:
  """Each regime's training chunk as a seed sweep on its devices."""
  return {r: seed_sweep(
      lambda st, pb, x, steps, r=r: study.train(r, st, pb, steps, x),
      place.regime[r], static_argnums=(3,)) for r in study.regimes}


def compile_training_ahead(pool, trainers, study, config, place,
                           keys) -> dict:
  """Compiles the first training chunk of every regime trained on the
  problems' data in ``pool`` (a background thread), from the shapes alone,
  while the set-up compiles and runs; ``{regime: future}``. Regimes side by
  side only: there the set-up leaves a core idle (measured: the 3-regime
  protocol 0.7 s faster on 2 cores, on average over 12 interleaved pairs).
  ``train_all`` waits for a regime's future before its first chunk, so
  nothing compiles twice."""
  if not place.side_by_side:
    return {}
  steps = min(int(config.checkpoint_every or config.train.steps),
              int(config.train.steps))

  def shapes():
    problems = jax.eval_shape(jax.vmap(study.problem), keys)
    return problems, jax.eval_shape(jax.vmap(study.init_state), problems)

  def compile_for(regime, shaped):
    problems, states = shaped.result()
    on = jax.sharding.SingleDeviceSharding(place.regime[regime][0])
    spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=on, weak_type=a.weak_type), t)
    return trainers[regime].lower(
        spec(states), spec(problems), spec(study.train_data(problems)),
        steps).compile()

  shaped = pool.submit(shapes)
  return {r: pool.submit(compile_for, r, shaped)
          for r in sorted(study.regimes, key=study.train_cost, reverse=True)
          if r not in ts.TRAINED_ON_SYNTHESIZED}


class Placement:
  """Which devices run what.

  One process with several devices (``distributed.cpu_devices``: one XLA
  CPU device per core by default) and several regimes: the regimes train
  side by side, each on one device with all its seeds vmapped there; the
  heaviest regime (``TeacherStudent.train_cost``) goes first onto the least
  loaded device. A training loop of tiny operations runs fastest on one
  core, so this is what uses a multi-core CPU (measured on 2 cores: the
  three-regime protocol trains in ~0.55x the time of one device). Set-up
  and evaluation (large batched operations, which XLA spreads over the
  cores itself) run on the first device. Results are bitwise those of a
  one-device run. Otherwise (several processes, one device, one regime)
  every step runs on all devices with the seeds sharded over them
  (``tsjax.train.sweep``).
  """

  def __init__(self, study, devices=None):
    devices = list(devices) if devices is not None else jax.devices()
    self.side_by_side = (jax.process_count() == 1 and len(devices) > 1
                         and len(study.regimes) > 1)
    if not self.side_by_side:
      self.setup = devices
      self.regime = {r: devices for r in study.regimes}
      return
    self.setup = devices[:1]
    load = {d: 0.0 for d in devices[:len(study.regimes)]}
    self.regime = {}
    for r in sorted(study.regimes, key=study.train_cost, reverse=True):
      d = min(load, key=load.get)
      load[d] += study.train_cost(r)
      self.regime[r] = [d]

  def put(self, tree, devices):
    """``tree`` on ``devices`` (a no-op unless regimes run side by side)."""
    return jax.device_put(tree, devices[0]) if self.side_by_side else tree

  def describe(self) -> str:
    if not self.side_by_side:
      return "seeds vmapped" + (" and sharded over the devices"
                                if len(self.setup) > 1 else "")
    return "regimes side by side: " + ", ".join(
        f"{r} on device {d[0].id}" for r, d in self.regime.items())


class Datasets:
  """Each regime's problems and training inputs on its devices: the
  problems' own inputs (trained from their low-rank form, ``train_data``),
  or the robust-feature set synthesised once from the source regime's
  trained students."""

  def __init__(self, study, config, problems, place):
    self.study, self.config, self.problems, self.place = (
        study, config, problems, place)
    self._synth, self._copies = {}, {}

  def problems_for(self, regime):
    devices = self.place.regime[regime]
    key = tuple(d.id for d in devices)
    if key not in self._copies:
      self._copies[key] = self.place.put(self.problems, devices)
    return self._copies[key]

  def eval_inputs(self, regime, states):
    if regime not in ts.TRAINED_ON_SYNTHESIZED:
      return self.problems["x_train"]
    if regime not in self._synth:
      src = self.config.robust_features.source
      self._synth[regime] = seed_sweep(
          self.study.robust_dataset, self.place.regime[src])(
              states[src], self.problems_for(src))
    return self._synth[regime]

  def train_inputs(self, regime, states):
    if regime in ts.TRAINED_ON_SYNTHESIZED:
      return self.place.put(self.eval_inputs(regime, states),
                            self.place.regime[regime])
    return self.study.train_data(self.problems_for(regime))


def chunk_rounds(study, config) -> list[list[tuple[str, int, int]]]:
  """Training chunks ``(regime, first step, steps)`` in rounds: one chunk of
  every regime per round (run side by side, then one checkpoint), first the
  regimes trained on the problems' data, then those trained on a data set
  synthesised from another regime's final students."""
  total = int(config.train.steps)
  every = int(config.checkpoint_every) if config.checkpoint_every else total
  phases = ([r for r in study.regimes if r not in ts.TRAINED_ON_SYNTHESIZED],
            [r for r in study.regimes if r in ts.TRAINED_ON_SYNTHESIZED])
  return [[(r, s, min(every, total - s)) for r in phase]
          for phase in phases if phase for s in range(0, total, max(every, 1))]


def train_all(study, config, workdir, datasets, seeds, say, trainers, ready,
              *, progress: bool, stop_after_chunks: int | None,
              on_dispatched=None):
  """Every regime's training in checkpointed rounds of chunks (resuming
  after the last saved round); the final states, or None when stopped
  early.

  Round i + 1 is dispatched before round i is checked (finite losses) and
  saved, so the devices never wait for the host; within a round the
  heaviest regime is dispatched (and compiled) first. ``trainers``: each
  regime's program (``training_programs``); ``ready``: ``{regime: future}``
  of programs compiling ahead (``compile_training_ahead``), each waited for
  before its regime's first chunk. ``on_dispatched`` is called with the
  final (still pending) states once the last round is dispatched.
  """
  place = datasets.place
  states = {r: place.put(seed_sweep(study.init_state, place.regime[r])(
      datasets.problems_for(r)), place.regime[r]) for r in study.regimes}
  rounds = chunk_rounds(study, config)
  log = RoundLog(config, rounds, say, progress)
  store = CheckpointStore(os.path.join(workdir, "checkpoints"))
  restored = store.restore_latest({"states": states})
  if restored is not None:
    states = restored[1]["states"]
    log.resume(restored[0], workdir)
  pending = None
  for i in range(log.first, len(rounds)):
    stats = {}
    for regime, _, n in sorted(rounds[i], key=lambda c: -study.train_cost(c[0])):
      if regime in ready:
        ready.pop(regime).result()
      states[regime], stats[regime] = trainers[regime](
          states[regime], datasets.problems_for(regime),
          datasets.train_inputs(regime, states), n)
    if pending is not None and not log.finish(*pending, store, seeds, workdir,
                                              stop_after_chunks):
      store.close()
      return None
    pending = (i, stats, dict(states))
    if i == len(rounds) - 1 and on_dispatched is not None:
      on_dispatched(dict(states))
  if pending is not None:
    log.finish(*pending, store, seeds, workdir, None)
  log.close()
  store.close()
  return states


class RoundLog:
  """Bookkeeping of ``train_all``'s rounds: resume point, the finite-loss
  check, the checkpoint, the progress line and bar."""

  def __init__(self, config, rounds, say, progress):
    self.rounds, self.say, self.steps = rounds, say, int(config.train.steps)
    self.ends = list(itertools.accumulate(len(r) for r in rounds))
    self.done, self.first = 0, 0
    self.bar = tqdm(total=sum(n for rd in rounds for _, _, n in rd),
                    unit="step", disable=None if progress else True,
                    leave=False, dynamic_ncols=True, desc="training")
    self.t_start = self.t_last = time.time()
    self.trained = 0

  def resume(self, done, workdir):
    if done not in self.ends:
      raise ValueError(f"checkpoint {done} in {workdir} does not end a round "
                       f"of training chunks ({self.ends}); it was written by "
                       "another version of this study: start a new work dir")
    self.done, self.first = done, self.ends.index(done) + 1
    self.bar.update(sum(n for rd in self.rounds[:self.first] for _, _, n in rd))
    self.say(f"resumed from checkpoint after {done} of {self.ends[-1]} chunks")

  def finish(self, i, stats, states, store, seeds, workdir,
             stop_after_chunks) -> bool:
    """Checks and saves round ``i``; False when the run should stop here."""
    cells = []
    for regime, start, n in self.rounds[i]:
      st = distributed.to_host(stats[regime])
      bad = [s for s, ok in zip(seeds, st["all_finite"]) if not ok]
      if bad:
        raise FloatingPointError(
            f"non-finite loss or gradient in regime {regime!r}, seeds {bad}, "
            f"steps {start}..{start + n}; the last good checkpoint (after "
            f"{self.ends[i - 1] if i else 0} chunks) in {workdir} is intact. "
            f"Lower config.train.lr or the attack radii.")
      cells.append(f"{regime} {start + n}/{self.steps} loss "
                   f"{float(np.mean(st['loss'])):.4g}")
      self.trained += n
      self.bar.update(n)
    store.save(self.ends[i], {"states": states})
    now = time.time()
    left = sum(n for rd in self.rounds[i + 1:] for _, _, n in rd)
    eta = (now - self.t_start) / self.trained * left
    self.bar.clear()
    self.say(f"round {i + 1}/{len(self.rounds)} | {now - self.t_last:.1f} s | "
             + " | ".join(cells) + f" | ETA training {format_seconds(eta)}")
    self.t_last = now
    stop = (stop_after_chunks is not None and i + 1 < len(self.rounds)
            and self.ends[i] - self.done >= stop_after_chunks)
    if stop:
      self.close()
    return not stop

  def close(self):
    self.bar.close()


# ------------------------------------------------------------------ reporting
SUMMARY_KEYS = (
    ("spec_in/mean_best", "spec in", "{:.3f}"),
    ("spec_full/mean_best", "spec full", "{:.3f}"),
    ("drift_perp", "P_perp drift", "{:.2e}"),
    ("clean_in/mse", "clean MSE", "{:.2e}"),
    ("robust_full/rel_mse", "robust rel-MSE", "{:.3g}"),
    ("robust_in/rel_mse", "robust-in rel-MSE", "{:.3g}"),
    ("robust_orth/rel_mse", "robust-orth rel-MSE", "{:.3g}"),
)


def _threshold_index(config, value=0.95):
  th = list(config.eval.thresholds)
  return th.index(value) if value in th else len(th) - 1


def report(config, workdir, seeds, metrics) -> dict:
  """Writes results.jsonl, summary.{md,json} and the plots; prints the table."""
  cfg = common.config_dict(config)
  rows = []
  for regime, m in metrics.items():
    for i, seed in enumerate(seeds):
      row = {"regime": regime, "seed": seed,
             "eval_restarts": int(config.eval.restarts),
             **{k: common.to_jsonable(v[i]) for k, v in m.items()},
             "config": cfg}
      rows.append(row)
  common.atomic_write(os.path.join(workdir, "results.jsonl"),
                      "".join(json.dumps(r) + "\n" for r in rows))

  present = [k for k in SUMMARY_KEYS if k[0] in next(iter(metrics.values()))]
  lines = ["| regime | " + " | ".join(h for _, h, _ in present) + " |",
           "|---" * (len(present) + 1) + "|"]
  table = {}
  for regime, m in metrics.items():
    cells, table[regime] = [], {}
    for key, _, fmt in present:
      v = np.asarray(m[key], np.float64)
      table[regime][key] = {"mean": float(v.mean()), "std": float(v.std()),
                            "values": v.tolist()}
      cells.append(f"{fmt.format(v.mean())} ± {fmt.format(v.std())}")
    lines.append(f"| {regime} | " + " | ".join(cells) + " |")

  stats = spearman_stats(config, metrics)
  corr = stats["spearman"]
  checks = claims(config, metrics, corr, stats["spearman_ci"])
  n_runs = len(seeds) * len(metrics)
  text = [f"# Teacher–student study: {len(seeds)} seeds x {len(metrics)} "
          f"regimes ({n_runs} runs)", "",
          f"Robust error: l{config.eval.norm[1:]} PGD, eps = "
          f"{config.eval.eps_frac} x sigma sqrt(k), {config.eval.steps} steps, "
          f"{config.eval.restarts} restarts (keep-best); rel-MSE = MSE / teacher"
          " output variance. Mean ± std over seeds.", "", *lines, "",
          *spearman_markdown(stats, len(seeds), n_runs), "",
          "Checks of the paper's claims (computed, not tuned):", ""]
  text += [f"- {c['name']}: {c['detail']} -> {'PASS' if c['ok'] else 'FAIL'}"
           for c in checks]
  summary = "\n".join(text) + "\n"
  common.atomic_write(os.path.join(workdir, "summary.md"), summary)
  common.atomic_write(os.path.join(workdir, "summary.json"), json.dumps(
      {"table": table, **stats, "checks": checks, "seeds": seeds,
       "config": cfg, "provenance": common.provenance()}, indent=2))
  print(summary)
  plots(config, workdir, metrics)
  return {"table": table, **stats, "checks": checks}


# Bootstrap of the Spearman correlations: percentile intervals from this many
# resamples of the runs (seeds resampled within each regime), fixed seed.
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_ALPHA = 0.05
BOOTSTRAP_SEED = 0


def spearman_stats(config, metrics, n_boot: int = BOOTSTRAP_SAMPLES,
                   alpha: float = BOOTSTRAP_ALPHA,
                   seed: int = BOOTSTRAP_SEED) -> dict:
  """Spearman correlations between specialization (``spec_{full,in}``) and
  robust error (``robust_{att}/mse`` for every ``config.eval.attacks``):

  * ``spearman``: across all runs (every regime x seed), ``{key: rho}``;
  * ``spearman_ci``: its ``1 - alpha`` percentile bootstrap interval,
    resampling seeds within each regime (stratified: every resample keeps
    each regime's number of runs, so the pooled correlation is not moved by
    resamples that drop a regime), ``{key: [low, high]}``;
  * ``spearman_within``: per regime, across its seeds only, ``{regime: {key:
    {"rho", "ci"}}}``; this separates "the regimes that specialise are the
    robust ones" (the across-run correlation, which regime differences alone
    can produce) from "within one training method, the seeds that
    specialise more are more robust".
  """
  regimes = list(metrics)
  strata = np.concatenate([np.full(len(np.asarray(metrics[r][
      "spec_full/mean_best"])), i) for i, r in enumerate(regimes)])

  def across(key):
    return np.concatenate([np.asarray(metrics[r][key], np.float64)
                           for r in regimes])

  pairs = {f"spec_{where} vs robust_{att}/mse":
           (f"spec_{where}/mean_best", f"robust_{att}/mse")
           for att in config.eval.attacks for where in ("full", "in")}
  corr, ci, within = {}, {}, {r: {} for r in regimes}
  for name, (ks, kr) in pairs.items():
    x, y = across(ks), across(kr)
    corr[name] = spearman(x, y)
    ci[name] = list(bootstrap_ci(spearman_rows, x, y, n_boot=n_boot,
                                 alpha=alpha, seed=seed, strata=strata,
                                 batched=True))
    for r in regimes:
      xr = np.asarray(metrics[r][ks], np.float64)
      yr = np.asarray(metrics[r][kr], np.float64)
      within[r][name] = {"rho": spearman(xr, yr), "ci": list(bootstrap_ci(
          spearman_rows, xr, yr, n_boot=n_boot, alpha=alpha, seed=seed,
          batched=True))}
  return {"spearman": corr, "spearman_ci": ci, "spearman_within": within,
          "bootstrap": {"samples": n_boot, "alpha": alpha, "seed": seed}}


def spearman_markdown(stats, n_seeds: int, n_runs: int) -> list[str]:
  """The Spearman section of summary.md: across all runs, then within each
  regime (rho [low, high])."""
  b = stats["bootstrap"]
  level = f"{100 * (1 - b['alpha']):g}%"
  fmt = lambda rho, ci: f"{rho:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"
  lines = [f"Spearman rank correlation across all {n_runs} runs, with {level} "
           f"percentile bootstrap intervals ({b['samples']} resamples of the "
           f"seeds within each regime):", ""]
  lines += [f"- {k}: {fmt(v, stats['spearman_ci'][k])}"
            for k, v in stats["spearman"].items()]
  within = stats["spearman_within"]
  regimes = list(within)
  lines += ["", f"Within each regime (across its {n_seeds} seeds; {level} "
            f"bootstrap intervals; NaN where a metric is constant over the "
            f"seeds):", "", "| pair | " + " | ".join(regimes) + " |",
            "|---" * (len(regimes) + 1) + "|"]
  for k in stats["spearman"]:
    lines.append(f"| {k} | " + " | ".join(
        fmt(within[r][k]["rho"], within[r][k]["ci"]) for r in regimes) + " |")
  return lines


def claims(config, metrics, corr, ci=None) -> list[dict]:
  """The issue's C1–C3, evaluated on whatever regimes were run: a list of
  ``{"name", "detail", "ok"}``. ``corr`` maps ``"spec_full vs
  robust_full/mse"`` (and others) to Spearman correlations across runs;
  ``ci`` (optional) their bootstrap intervals ``[low, high]``, which adds
  the check that the interval lies below 0."""
  mean = lambda r, k: float(np.mean(metrics[r][k]))
  out = []
  if "standard" in metrics:
    v = mean("standard", "spec_in/mean_best")
    out.append({"name": "C1 standard, in-subspace mean best corr >= 0.9",
                "detail": f"{v:.3f} (multi={config.student.multi})",
                "ok": bool(v >= 0.9)})
    if not config.train.weight_decay:
      v = float(np.max(metrics["standard"]["drift_perp"]))
      out.append({"name": "C2 standard, max P_perp drift <= 1e-5",
                  "detail": f"{v:.2e}", "ok": bool(v <= 1e-5)})
    for r in ("pgd_at", "offsubspace"):
      if r in metrics:
        v = float(np.min(metrics[r]["drift_perp"]))
        out.append({"name": f"C2 {r}, min P_perp drift clearly > 0 (> 1e-3)",
                    "detail": f"{v:.2e}", "ok": bool(v > 1e-3)})
    full = mean("standard", "spec_full/mean_best")
    inn = mean("standard", "spec_in/mean_best")
    out.append({"name": "C3 standard, full-rank spec < in-subspace spec",
                "detail": f"{full:.3f} < {inn:.3f}", "ok": bool(full < inn)})
    for r in ("offsubspace", "pgd_at"):
      if r in metrics:
        v = mean(r, "spec_full/mean_best")
        out.append({"name": f"C3 {r} full-rank spec > standard's",
                    "detail": f"{v:.3f} > {full:.3f}", "ok": bool(v > full)})
  key = "spec_full vs robust_full/mse"
  if key in corr:
    out.append({"name": "C3 Spearman(full-rank spec, robust error) < 0 "
                        "(paper: strongly negative)",
                "detail": f"{corr[key]:+.3f}", "ok": bool(corr[key] < 0)})
    if ci is not None and key in ci:
      hi = ci[key][1]
      out.append({"name": "C3 Spearman(full-rank spec, robust error): "
                          "bootstrap interval below 0",
                  "detail": f"[{ci[key][0]:+.3f}, {hi:+.3f}]",
                  "ok": bool(hi < 0)})   # NaN -> False
  return out


def plots(config, workdir, metrics) -> None:
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2, sharey=True)
  for ax, where, title in ((axes[0], "full", "full-rank eval data"),
                           (axes[1], "in", "in-subspace eval data")):
    for regime, m in metrics.items():
      ax.scatter(m[f"spec_{where}/mean_best"], m["robust_full/rel_mse"],
                 label=regime, s=28, alpha=0.8)
    ax.set_xlabel(f"mean best teacher–student correlation ({title})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("robust error (worst-case MSE / teacher var.)")
  axes[1].legend(fontsize=8)
  fig.suptitle("Student specialization vs robust error (each point: one run)")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "specialization_vs_robust_error.png"),
              dpi=120)

  ti = _threshold_index(config)
  thr = list(config.eval.thresholds)[ti]
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2, sharey=True)
  for ax, where, title in ((axes[0], "in", "in-subspace eval data"),
                           (axes[1], "full", "full-rank eval data")):
    for regime, m in metrics.items():
      rate = np.asarray(m[f"spec_{where}/layer0/success"])[:, ti, :].mean(0)
      ax.plot(np.arange(len(rate)), rate, marker="o", label=regime)
    ax.set_xlabel("teacher node index (strong -> weak)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"success rate (best corr > {thr}) over seeds")
  axes[1].legend(fontsize=8)
  fig.suptitle("Specialization success per teacher node (first hidden layer)")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "success_per_teacher_node.png"), dpi=120)


if __name__ == "__main__":
  common.launch("teacher_student", run, "configs/teacher_student.py",
                "Experiment config (ml_collections file, optional ':variant').",
                default_variant="")

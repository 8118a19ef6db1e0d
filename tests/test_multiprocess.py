"""Several processes for real: 2 processes x 2 CPU devices on one machine
(``jax.distributed`` with a localhost coordinator, gloo collectives) against
1 process x 4 devices (this pytest process, see conftest.py) with the same
global batch.

The fast tests check the library pieces in one pair of processes (start-up
from a config section, masked evaluation over sharded batches, seed sweeps
over all devices, Orbax checkpoints, main-process-only files, AutoAttack split
between the processes) and that chained seed sweeps which pad their seeds do
not deadlock across processes. The slow ones run ``experiments.train`` (and a
resume), ``experiments.evaluate`` and the teacher–student study end to end.

This file is also the worker: ``python tests/test_multiprocess.py TASK
ADDRESS PROCESS_ID NUM_PROCESSES ARGS...``.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.path.isdir("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")


# ------------------------------------------------------------------ launcher
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(task: str, logdir, *args, num_processes: int = 2,
           timeout: float = 900, slurm: bool = False) -> list[str]:
  """Runs ``task`` in ``num_processes`` processes of 2 CPU devices each;
  returns their logs. Fails (killing the others) as soon as one fails.
  ``slurm``: the environment ``srun`` gives its tasks (what
  ``jax.distributed.initialize()`` auto-detects), coordinator on this host."""
  port = _free_port()
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1",
         "PYTHONPATH": os.pathsep.join(
             [ROOT, os.path.join(ROOT, "tests"),
              os.environ.get("PYTHONPATH", "")])}
  paths = [os.path.join(str(logdir), f"{task}_{i}_{port}.log")
           for i in range(num_processes)]
  files = [open(p, "w") for p in paths]
  def env_of(i):
    if not slurm:
      return env
    return {**env, "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(num_processes), "SLURM_PROCID": str(i),
            "SLURM_LOCALID": str(i), "JAX_COORDINATOR_PORT": str(port)}
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), task, f"localhost:{port}",
       str(i), str(num_processes), *map(str, args)],
      cwd=ROOT, env=env_of(i), stdout=f, stderr=subprocess.STDOUT)
      for i, f in enumerate(files)]
  deadline = time.time() + timeout
  failed = None
  try:
    while any(p.poll() is None for p in procs):
      failed = next((i for i, p in enumerate(procs)
                     if p.poll() not in (None, 0)), None)
      if failed is not None or time.time() > deadline:
        break
      time.sleep(0.2)
    failed = next((i for i, p in enumerate(procs)
                   if p.poll() not in (None, 0)), failed)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in files:
      f.close()
  logs = [open(p).read() for p in paths]
  if failed is not None or any(p.returncode for p in procs):
    i = failed if failed is not None else 0
    raise AssertionError(f"process {i} of task {task!r} failed "
                         f"(return codes {[p.returncode for p in procs]}):\n"
                         + logs[i][-6000:])
  return logs


# -------------------------------------------------------------------- tests
def test_distributed_settings_name_the_field():
  from tsjax.configs.adv_train import get_config
  from tsjax import config_checks as cc
  from tsjax.train import distributed as D
  c = get_config("fashion_mnist,pgd_at,smoke")
  assert D.settings(None) is None and D.settings(c.distributed) is None
  assert not D.initialize(c.distributed)        # one process: nothing starts
  c.distributed.auto = True
  assert D.settings(c.distributed) == {}        # jax.distributed.initialize()
  c.distributed.coordinator_address = "10.0.0.1:1234"
  c.distributed.num_processes, c.distributed.process_id = 4, 3
  assert D.settings(c.distributed) == {"coordinator_address": "10.0.0.1:1234",
                                       "num_processes": 4, "process_id": 3}
  for field, value, words in (
      ("coordinator_address", "10.0.0.1", "'distributed.coordinator_address'"),
      ("process_id", 4, "'distributed.process_id' must be an integer in [0"),
      ("num_processes", 0, "'distributed.num_processes' must be a positive"),
      ("auto", "yes", "'distributed.auto' must be True or False")):
    bad = {**c.distributed.to_dict(), field: value}
    with pytest.raises(cc.ConfigError, match=words.replace("[", r"\[")):
      D.settings(bad)


def test_cpu_devices_field(tmp_path):
  """``distributed.cpu_devices``: checked early (naming the field); applied
  before JAX starts (a fresh interpreter: "cores" gives one device per core
  this process may use, an integer that many), and an explicit
  ``--xla_force_host_platform_device_count`` wins."""
  from tsjax import config_checks as cc
  from tsjax.train import distributed as D
  assert D.cpu_devices(None) is None and D.cpu_devices({}) is None
  assert D.cpu_devices({"cpu_devices": 3}) == 3
  assert D.cpu_devices({"cpu_devices": "3"}) == 3          # command line
  assert D.cpu_devices({"cpu_devices": "cores"}) == len(os.sched_getaffinity(0))
  for bad in (0, -1, "all", 2.5, True):
    with pytest.raises(cc.ConfigError, match="'distributed.cpu_devices'"):
      D.cpu_devices({"cpu_devices": bad})
  # In this process JAX already runs (4 devices, conftest): nothing changes.
  assert not D.set_cpu_devices(3)
  code = ("import sys, jax; from tsjax.train import distributed as D; "
          "D.initialize({'cpu_devices': sys.argv[1]}); "
          "print(jax.device_count())")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  def devices(value, flags=None):
    e = env if flags is None else {**env, "XLA_FLAGS": flags}
    p = subprocess.run([sys.executable, "-c", code, value], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split()[-1])
  assert devices("cores") == len(os.sched_getaffinity(0))
  assert devices("3") == 3
  assert devices("3", "--xla_force_host_platform_device_count=5") == 5


def test_two_processes_library_pieces(tmp_path):
  """One pair of processes, started as under SLURM's srun and joined by
  auto-detection (``distributed.auto``): evaluation counted on device, seed
  sweeps, Orbax, fit's files, AutoAttack split."""
  logs = launch("fast", tmp_path, tmp_path, slurm=True)
  reps = [json.load(open(tmp_path / f"fast_{i}.json")) for i in range(2)]
  for i, r in enumerate(reps):
    assert (r["process_count"], r["device_count"], r["local_device_count"],
            r["main"]) == (2, 4, 2, i == 0)
    # every one of the 37 examples counted once, on both processes
    ev = r["eval"]
    assert ev["num_examples"] == 37 and ev["per_example_ok"]
    assert ev["acc"] == ev["ref_acc"]
    # the sweep's seeds (3, padded to 4 devices) equal seed-by-seed runs
    np.testing.assert_allclose(r["sweep_v"], r["sweep_ref"], rtol=1e-12)
    np.testing.assert_allclose(r["sweep_again"], r["sweep_again_ref"],
                               rtol=1e-12)
    ck = r["ckpt"]
    assert ck["a"] == ck["raw_a"] == list(range(8)) and ck["s"] == 2.5
    assert ck["a_sharding_kept"] and ck["key_equal"]
  assert reps[0]["fit_params"] == reps[1]["fit_params"]
  assert reps[0]["fit_last"] == reps[1]["fit_last"]
  assert reps[0]["fit_last"]["num_examples"] == 37
  # AutoAttack: each process attacked its half; the totals are the sums.
  a0, a1 = reps[0]["aa"], reps[1]["aa"]
  assert a0["span"] == [0, 5] and a1["span"] == [5, 10]
  assert a0["split"] == a1["split"]
  assert a0["split"]["robust_acc"] == (a0["mine_robust"] + a1["mine_robust"]) / 10
  assert a0["split"]["clean_acc"] == (a0["mine_clean"] + a1["mine_clean"]) / 10
  # fit's files come from process 0 alone; one line per epoch.
  fit = tmp_path / "fit"
  assert len(os.listdir(fit / "tb")) == 1
  lines = [json.loads(l) for l in open(fit / "metrics.jsonl")]
  assert len(lines) == 2 * 2 + 2          # 4 steps (log_every=1), 2 epochs
  text = open(fit / "log.txt").read().splitlines()
  assert [l.split(" | ")[0] for l in text] == ["epoch 1/2", "epoch 2/2"]
  assert "train loss" in text[0] and "val clean" in text[0] and "ETA" in text[0]
  assert "epoch 2/2 | train loss" in logs[0]
  assert "epoch 1/2" not in logs[1]


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
  """experiments.train smoke: 1 process x 4 devices (here) and 2 processes
  x 2 devices, the same global batch."""
  from experiments import train as exp
  tmp = tmp_path_factory.mktemp("mp_train")
  ref = exp.run(_train_config(None, 0, 1), str(tmp / "ref"), progress=False)
  launch("train", tmp, tmp, tmp / "mp", 0)
  return tmp, ref


def _params(path):
  with np.load(path) as d:
    return {k: d[k] for k in d.files}


@pytest.mark.slow
@needs_fmnist
def test_train_two_processes_equals_one_process(train_runs):
  import jax
  tmp, ref = train_runs
  mp = tmp / "mp"
  a, b = _params(tmp / "params_0.npz"), _params(tmp / "params_1.npz")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  ref_params = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                jax.tree_util.tree_leaves_with_path(
                    ref["fit"]["state"].params)}
  assert set(ref_params) == set(a)
  for k in a:
    np.testing.assert_allclose(a[k], ref_params[k], rtol=1e-4, atol=1e-6)
  got = json.load(open(mp / "results.json"))
  want = json.load(open(tmp / "ref" / "results.json"))
  assert set(got["results"]) == set(want["results"])
  for name, row in want["results"].items():
    assert got["results"][name]["num_test"] == row["num_test"] == 50
    for k, v in row.items():
      if isinstance(v, float):
        assert got["results"][name][k] == pytest.approx(v, abs=1e-6), (name, k)
  assert got["best_epoch"] == want["best_epoch"]
  for g, w in zip(got["history"], want["history"]):
    assert g.keys() == w.keys()
    for k in w:
      assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
  # process 0 alone wrote the files: one of each, no duplicated log lines
  assert sorted(f for f in os.listdir(mp) if f.startswith("results")) == [
      "results.json", "results.md"]
  assert len(os.listdir(mp / "tb")) == 1
  assert len(open(mp / "metrics.jsonl").readlines()) == len(
      open(tmp / "ref" / "metrics.jsonl").readlines())
  assert [l.split(" | ")[0] for l in open(mp / "log.txt")] == [
      "epoch 1/3", "epoch 2/3", "epoch 3/3"]


@pytest.mark.slow
@needs_fmnist
def test_train_two_processes_resume_equals_uninterrupted(train_runs, tmp_path):
  tmp, _ = train_runs
  out = tmp_path / "out"
  out.mkdir()
  launch("train", tmp_path, out, tmp_path / "run", 1)   # stops as a kill would
  assert not (tmp_path / "run" / "results.json").exists()
  assert not list(out.iterdir())
  logs = launch("train", tmp_path, out, tmp_path / "run", 0)
  assert "resumed after epoch 1" in logs[0]
  resumed, full = _params(out / "params_0.npz"), _params(tmp / "params_0.npz")
  for k in full:
    np.testing.assert_array_equal(resumed[k], full[k])
  assert [l.split(" | ")[0] for l in open(tmp_path / "run" / "log.txt")
          if l.startswith("epoch")] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]


@pytest.mark.slow
@needs_fmnist
def test_evaluate_two_processes_equals_one_process(train_runs, tmp_path):
  from tsjax.configs.evaluate import get_config
  from experiments import evaluate
  tmp, _ = train_runs
  launch("evaluate", tmp_path, tmp_path, tmp / "mp", tmp_path / "mp_eval")
  c = get_config("smoke")
  c.checkpoint, c.which, c.autoattack = str(tmp / "mp"), "last", False
  c.subset = 50
  want = evaluate.run(c, str(tmp_path / "ref_eval"), progress=False)["results"]
  for i in range(2):
    got = json.load(open(tmp_path / f"eval_{i}.json"))
    assert got["num_examples"] == want["num_examples"] == 50
    for k, v in want.items():
      if k.endswith("/acc"):
        assert got[k] == v, k
  assert sorted(os.listdir(tmp_path / "mp_eval")) == [
      "config.json", "eval.json", "eval.md", "provenance.jsonl"]
  with open(tmp_path / "mp_eval" / "provenance.jsonl") as f:   # process 0 only
    assert [json.loads(l)["process_count"] for l in f] == [2]


@pytest.mark.slow
def test_teacher_student_sweep_two_processes_equals_one(make_small_config,
                                                        tmp_path):
  from experiments import teacher_student as exp
  ref = exp.run(make_small_config(), str(tmp_path / "ref"), progress=False)
  launch("teacher_student", tmp_path, tmp_path, tmp_path / "mp")
  got = _params(tmp_path / "ts_0.npz")
  other = _params(tmp_path / "ts_1.npz")
  import jax
  from tsjax.train import distributed
  want = {f"{r}{jax.tree_util.keystr(k)}": v for r, m in ref["metrics"].items()
          for k, v in jax.tree_util.tree_leaves_with_path(m)}
  states = distributed.to_host(ref["states"])
  want.update({f"state_{r}{jax.tree_util.keystr(k)}": v
               for r, s in states.items()
               for k, v in jax.tree_util.tree_leaves_with_path(s.params)})
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], other[k])
    np.testing.assert_allclose(got[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
  files = sorted(os.listdir(tmp_path / "mp"))
  assert files == sorted(os.listdir(tmp_path / "ref"))
  assert files.count("results.jsonl") == 1
  rows = [json.loads(l) for l in open(tmp_path / "mp" / "results.jsonl")]
  assert len(rows) == len(ref["metrics"]) * 2   # regimes x seeds, once each



def _padding_sweeps():
  """Two seed sweeps whose seeds (2) do not fill the devices (4), chained so
  that every call pads its inputs and un-pads 16 outputs."""
  import jax
  from tsjax.train import seed_sweep
  make = seed_sweep(lambda k: {f"l{i}": jax.random.normal(
      jax.random.fold_in(k, i), (64, 3 + i)) for i in range(16)})
  step = seed_sweep(lambda t: jax.tree.map(lambda a: a * 2 + 1, t))
  return make, step


def test_seed_sweep_padding_across_processes(tmp_path):
  """Across processes, padding and un-padding the seeds must not deadlock:
  before ``seed_sweep`` waited for each, the un-padding slices of many
  leaves ran concurrently and paired their collectives wrongly (this
  task hung in 2 of 4 runs with 20 rounds). Both processes see the
  closed form of the chained sweeps. The pytest worker itself runs no JAX:
  an earlier version that computed the reference in the worker saw that
  worker abort twice under pytest-xdist in the full suite; this one passed
  the full suite and three xdist runs of this file next to another."""
  launch("padding", tmp_path, tmp_path, timeout=120, slurm=True)
  runs = [np.load(tmp_path / f"padding_{pid}.npz") for pid in range(2)]
  scale = 2.0 ** PADDING_ROUNDS          # x -> 2 x + 1, PADDING_ROUNDS times
  for k in runs[0].files:
    if k.startswith("start_"):
      continue
    want = scale * runs[0]["start_" + k] + (scale - 1.0)
    for got in runs:
      np.testing.assert_allclose(got[k], want, rtol=1e-12)
      np.testing.assert_array_equal(got["start_" + k], runs[0]["start_" + k])

# --------------------------------------------------------------- the workers
def _fast(out_dir):
  """Library pieces across the processes; each writes what it saw."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from tsjax.train.classifier import autoattack_split
  from tsjax import models
  from tsjax.attacks.autoattack import autoattack
  from tsjax.data import images
  from tsjax.methods.common import ModelLogits
  from tsjax.train import CheckpointStore, TrainState, classifier as clf
  from tsjax.train import distributed, seed_keys, seed_sweep
  from tsjax.train.fit import fit

  pid = jax.process_index()
  report = {"process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "main": distributed.is_main_process()}
  mesh = images.data_mesh()
  rep = NamedSharding(mesh, P())

  # Masked evaluation over batches sharded across both processes: 37
  # examples in 3 batches of 16 (11 padded), counted on device.
  model = models.get_model("small_cnn", num_classes=3, features=(4,), hidden=8)
  params, ms = clf.init_model(model, jax.random.key(0), (8, 8, 1))
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (37, 8, 8, 1), dtype=np.uint8)
  y = rng.integers(0, 3, 37).astype(np.int32)
  pred = np.argmax(np.asarray(model.apply({"params": params},
                                          x.astype(np.float32) / 255.0)), -1)
  g_params, g_ms = distributed.to_global((params, ms), rep)
  r = clf.evaluate(clf.make_eval_step(model, {}), g_params, g_ms,
                   images.eval_batches(x, y, 16), jax.random.key(0))
  report["eval"] = {"num_examples": r["num_examples"],
                    "acc": r["clean/acc"], "ref_acc": float(np.mean(pred == y)),
                    "per_example_ok": bool(np.array_equal(
                        r["per_example"]["clean/correct"], pred == y))}

  # A seed sweep over all 4 devices: 3 seeds (padded to 4), then a second
  # sweep fed with the first one's global outputs.
  def one(key, scale):
    return {"v": scale * jnp.sum(jax.random.normal(key, (5,))),
            "key": jax.random.fold_in(key, 1)}
  scales = jnp.arange(1.0, 4.0)
  out = seed_sweep(one)(seed_keys(3, 3), scales)
  again = seed_sweep(lambda k, v: jax.random.normal(k, ()) + v)(out["key"],
                                                                 out["v"])
  ref = [one(jax.random.key(3 + i), scales[i]) for i in range(3)]
  report["sweep_v"] = distributed.to_host(out["v"]).tolist()
  report["sweep_ref"] = [float(o["v"]) for o in ref]
  report["sweep_again"] = distributed.to_host(again).tolist()
  report["sweep_again_ref"] = [
      float(jax.random.normal(o["key"], ()) + o["v"]) for o in ref]

  # Orbax across the processes: a batch-sharded array, a replicated typed
  # key and a scalar; restored with the template's shardings, and raw.
  tree = {"a": distributed.to_global(np.arange(8.0),
                                     NamedSharding(mesh, P("data"))),
          "key": distributed.to_global(jax.random.key(7), rep),
          "s": distributed.to_global(np.float32(2.5), rep)}
  store = CheckpointStore(os.path.join(out_dir, "ckpt"))
  store.save(1, tree)
  back = store.restore(1, tree)
  raw = store.restore_raw()
  store.close()
  report["ckpt"] = {
      "a": distributed.to_host(back["a"]).tolist(),
      "a_sharding_kept": back["a"].sharding == tree["a"].sharding,
      "key_equal": bool(np.array_equal(distributed.to_host(back["key"]),
                                       distributed.to_host(tree["key"]))),
      "s": float(back["s"]), "raw_a": distributed.to_host(raw["a"]).tolist()}

  # fit: 2 epochs of a tiny classifier; process 0 alone writes the logs.
  opt, _ = clf.make_optimizer(_tiny_train_config(), 2)
  state = TrainState.create(params, opt, jax.random.key(1), ms)
  step = clf.jit_train_step(_cross_entropy(model), opt)
  work = os.path.join(out_dir, "fit")
  res = fit(workdir=work, state=state, step_fn=step,
            train_batches=lambda e: images.train_batches(
                x, y, 8, seed=0, start_step=2 * e),
            epochs=2, steps_per_epoch=2, state_sharding=rep,
            evaluate_fn=lambda p, m: {k: v for k, v in clf.evaluate(
                clf.make_eval_step(model, {}), p, m,
                images.eval_batches(x, y, 16), jax.random.key(0),
                per_example=False).items()},
            select_metric="clean/acc", progress=True, log_every=1)
  report["fit_params"] = [float(np.sum(a)) for a in jax.tree.leaves(
      distributed.to_host(res["state"].params))]
  report["fit_last"] = res["last"]

  # AutoAttack split between the processes: the sum of each process's share.
  xa, ya = x[:10], y[:10]
  aa = autoattack_split(model, g_params, g_ms, xa, ya, jax.random.key(5),
                        norm="linf", eps=0.1, attacks=("apgd-ce",), steps=3,
                        batch_size=8)
  lo, hi = distributed.split_points(len(xa))
  mine = autoattack(ModelLogits(model, "eval"),
                    xa[lo:hi].astype(np.float32) / 255.0, ya[lo:hi],
                    jax.random.key(5), norm="linf", eps=0.1,
                    attacks=("apgd-ce",), steps=3, batch_size=8,
                    params=(params, ms))
  report["aa"] = {"split": aa, "mine_robust": int(np.sum(mine["robust"])),
                  "mine_clean": round(mine["clean_acc"] * (hi - lo)),
                  "span": [lo, hi]}
  with open(os.path.join(out_dir, f"fast_{pid}.json"), "w") as f:
    json.dump(report, f)


def _tiny_train_config():
  import ml_collections
  c = ml_collections.ConfigDict()
  c.lr, c.momentum, c.weight_decay, c.schedule = 0.1, 0.9, 0.0, "constant"
  c.epochs = 2
  return c


def _cross_entropy(model):
  """A method loss: mean cross-entropy on uint8 images scaled to [0, 1]."""
  import optax

  def loss_fn(params, model_state, batch, key, ctx):
    del key, ctx
    logits = model.apply({"params": params, **model_state},
                         batch["image"] / 255.0, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]).mean()
    return loss, ({}, model_state)
  return loss_fn


def _train_config(address, pid, num_processes):
  from tsjax.configs.adv_train import get_config
  c = get_config("fashion_mnist,pgd_at,smoke")
  c.data.train_subset = 192
  c.data.num_val = 64
  c.data.test_subset = 50      # one padded test batch of 64: 14 masked rows
  c.train.batch_size = 32
  c.train.epochs = 3
  c.train.boundaries = (2,)
  c.eval.val_subset = 64
  if address:
    c.distributed.coordinator_address = address
    c.distributed.num_processes = num_processes
    c.distributed.process_id = pid
  return c


def _train(out_dir, workdir, stop_after_epochs):
  """experiments.train across the processes (its run starts
  jax.distributed from the config section)."""
  import jax
  from experiments import train as exp
  from tsjax.train import distributed
  address, pid, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  stop = int(stop_after_epochs) or None
  out = exp.run(_train_config(address, pid, n), workdir, progress=True,
                stop_after_epochs=stop)
  if out is None:
    return
  params = distributed.to_host(out["fit"]["state"].params)
  flat = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_leaves_with_path(params)}
  np.savez(os.path.join(out_dir, f"params_{jax.process_index()}.npz"), **flat)


def _evaluate(out_dir, run_dir, eval_dir):
  """experiments.evaluate across the processes."""
  import jax
  import ml_collections
  from tsjax.configs.evaluate import get_config
  from experiments import evaluate
  c = get_config("smoke")
  c.checkpoint = run_dir
  c.which = "last"
  c.autoattack = False
  c.subset = 50               # 2 batches of 32: 14 padded, masked rows
  c.distributed = ml_collections.ConfigDict(
      {"coordinator_address": sys.argv[2], "num_processes": int(sys.argv[4]),
       "process_id": int(sys.argv[3])})
  out = evaluate.run(c, eval_dir, progress=False)
  with open(os.path.join(out_dir, f"eval_{jax.process_index()}.json"),
            "w") as f:
    json.dump(out["results"], f)


def _teacher_student(out_dir, workdir):
  """The teacher–student smoke study (shrunk as in conftest) across the
  processes: its seeds sharded over all 4 devices."""
  import jax
  from conftest import shrink
  from tsjax.configs import teacher_student as ts_configs
  from experiments import teacher_student as exp
  from tsjax.train import distributed
  c = shrink(ts_configs.get_config("smoke"))
  c.distributed.coordinator_address = sys.argv[2]
  c.distributed.num_processes = int(sys.argv[4])
  c.distributed.process_id = int(sys.argv[3])
  out = exp.run(c, workdir, progress=True)
  flat = {f"{r}{jax.tree_util.keystr(k)}": v for r, m in out["metrics"].items()
          for k, v in jax.tree_util.tree_leaves_with_path(m)}
  states = distributed.to_host(out["states"])
  flat.update({f"state_{r}{jax.tree_util.keystr(k)}": v
               for r, s in states.items()
               for k, v in jax.tree_util.tree_leaves_with_path(s.params)})
  np.savez(os.path.join(out_dir, f"ts_{jax.process_index()}.npz"), **flat)


PADDING_ROUNDS = 40


def _padding(out_dir):
  import jax
  from tsjax.train import distributed, seed_keys
  assert jax.process_count() == 2 and jax.device_count() == 4
  make, step = _padding_sweeps()
  x = start = make(seed_keys(0, 2))
  for _ in range(PADDING_ROUNDS):
    x = step(x)
  start = {f"start_{k}": v for k, v in distributed.to_host(start).items()}
  np.savez(os.path.join(out_dir, f"padding_{jax.process_index()}.npz"),
           **distributed.to_host(x), **start)


TASKS = {"fast": _fast, "train": _train, "evaluate": _evaluate,
         "teacher_student": _teacher_student, "padding": _padding}


def _worker(task, address, pid, num_processes, *args):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if task in ("fast", "padding"):   # the experiments start it from their config
    from tsjax.train import distributed
    assert distributed.initialize({"auto": True})   # SLURM variables
    assert jax.process_index() == int(pid)
  TASKS[task](*args)


if __name__ == "__main__":
  sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
  _worker(*sys.argv[1:])

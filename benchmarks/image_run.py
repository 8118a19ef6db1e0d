"""An image run end to end on real Fashion-MNIST: tsjax vs eager PyTorch.

What a user runs, timed from the outside (each side a subprocess, wall time
from launch to exit):

* **tsjax**: ``python -m experiments.train --config
  configs/adv_train.py:fashion_mnist,METHOD --config.train.epochs=E
  --config.train.boundaries=() --workdir <fresh dir>`` for METHOD in
  ``standard`` and ``pgd_at``: load the IDX files, train E epochs (55 000
  examples after the seeded 5 000-example validation split, batch 128,
  checkpoints every epoch), validate after each epoch (clean + PGD-10 on the
  first 1 000 validation examples, batch 500), then evaluate the last and
  the best parameters on the 10 000 test images (clean + PGD-20, batch 500)
  and write the results. ``JAX_COMPILATION_CACHE_DIR`` is set to a fresh,
  empty directory per launch (a first run: everything compiles).
* **PyTorch**: the same run as an eager script written here
  (``--torch-worker`` mode of this file; imports numpy and torch only):
  the same IDX files read with numpy (gzip, no torchvision), the same
  validation split (numpy ``SeedSequence([seed, 0x7A11D])`` permutation, as
  ``tsjax.data.images.split_validation``), the small CNN of
  ``tests/torch_nets.py`` (``TorchSmallCNN``, layer for layer tsjax's
  ``SmallCNN``: 3x3 conv 32 - ReLU - max-pool, 3x3 conv 64 - ReLU -
  max-pool, dense 128 - ReLU, dense 10; Fashion-MNIST mean / std inside the
  model; PyTorch's default initialisation), ``torch.optim.SGD`` with the
  config's lr / momentum / Nesterov / coupled weight decay, the config's
  piecewise schedule per epoch, a fresh permutation per epoch and
  ``len(train) // batch`` steps per epoch; PGD-AT: L-inf PGD (uniform start,
  ``method.attack.steps`` sign steps of ``step_size``, eps ball and [0, 1]
  box, last iterate, network in eval mode, gradient w.r.t. the input only),
  then the train-mode cross-entropy step; validation and test exactly as the
  tsjax run does them (clean + PGD-``eval.val_pgd_steps`` / PGD-
  ``eval.pgd_steps`` with step ``eval.pgd_step_size`` or ``2.5 eps /
  steps``, uniform start, last iterate, batch ``eval.batch_size``), best
  epoch by validation PGD accuracy, ``torch.save`` of a checkpoint every
  epoch and of the best weights, test of the last and the best weights.
  ``torch.set_num_threads(os.cpu_count())``; run once per memory layout
  (``channels_last`` and NCHW, ``--layouts``); the faster whole run is the
  reference.

Every setting both sides use is read from ``configs/adv_train.py`` with the
same ``--config`` overrides (``--set``); the PyTorch script refuses settings
it does not implement (augmentation, other models, optimizers, attacks).

Phases: PyTorch times its own (data, train, validation, checkpoints, test).
For tsjax they come from the run's own output, timestamped as it appears:
the per-epoch lines (``N s/epoch``), and ``metrics.jsonl``, which the loop
appends (flushed) after the last training step of an epoch and again after
its validation; so train = epoch start to the last training metrics line
(compilation of the train step included in epoch 1), validation = from there
to the epoch record, checkpoint = from there to the epoch line, test = the
last epoch line to exit (restore of the best checkpoint, test evaluation of
last and best, results files).

The two runs start from different initial weights and random draws, so
accuracies differ slightly; they are printed side by side as a sanity check.

Run from the repository root::

  python benchmarks/image_run.py                  # 3 epochs, standard + pgd_at
  python benchmarks/image_run.py --methods pgd_at --epochs 1
  python benchmarks/image_run.py --quick          # subsets, 1 epoch

Results: a table on stdout, ``benchmarks/results/image_run_<backend>.json``
(one row per method, per epoch count) and a section appended to
``benchmarks/RESULTS.md`` (``--no-results-md`` skips it). ``--quick`` (1
epoch on 512 training / 256 validation / 250 test images) writes
``image_run_<backend>_quick.json`` and never touches RESULTS.md.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gzip
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
  if _p not in sys.path:
    sys.path.insert(0, _p)

METHODS = ("standard", "pgd_at")
LAYOUTS = ("channels_last", "nchw")
DATA_DIR = "/usr/share/datasets/fashion-mnist"
QUICK_SET = {"data.train_subset": 768, "data.num_val": 256,
             "data.test_subset": 250, "eval.val_subset": 256}
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) \|.*\| ([0-9.]+) s/epoch")
FASHION_STATS = ((0.2860406,), (0.3530242,))   # tsjax.data.images._STATS


# ===================================================================== torch
def _read_idx(path: str):
  import numpy as np
  raw = open(path, "rb").read()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  assert raw[2] == 0x08, f"{path}: expected uint8 IDX data"
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_path(data_dir, stem):
  for name in (stem + ".gz", stem):
    p = os.path.join(data_dir, name)
    if os.path.isfile(p):
      return p
  raise SystemExit(f"Fashion-MNIST file {stem}[.gz] not in {data_dir}")


def check_torch_config(cfg: dict) -> None:
  """What the PyTorch script implements; anything else stops it."""
  bad = []
  want = {("model", "name"): "small_cnn", ("model", "normalize"): True,
          ("augment",): "", ("train", "optimizer"): "sgd",
          ("train", "weight_decay_style"): "l2",
          ("train", "weight_decay_on"): "all", ("train", "grad_clip"): 0.0,
          ("train", "schedule"): "piecewise", ("train", "ema_decay"): 0.0,
          ("train", "swa_start_epoch"): None, ("eval", "select_on"): "val",
          ("eval", "select_metric"): "pgd/acc",
          ("eval", "autoattack_subset"): 0}
  for path, v in want.items():
    node = cfg
    for q in path:
      node = node[q]
    if node != v:
      bad.append(f"{'.'.join(path)}={node!r} (needs {v!r})")
  if cfg["method"]["name"] not in METHODS:
    bad.append(f"method.name={cfg['method']['name']!r} (needs one of "
               f"{METHODS})")
  att = cfg["method"]["attack"]
  if cfg["method"]["name"] == "pgd_at":
    for k, v in (("norm", "linf"), ("start", "uniform"), ("restarts", 1),
                 ("keep_best", False), ("optimizer", "pgd"),
                 ("bn_mode", "eval")):
      if att[k] != v:
        bad.append(f"method.attack.{k}={att[k]!r} (needs {v!r})")
  if cfg.get("offsubspace"):
    bad.append("offsubspace section")
  if bad:
    raise SystemExit("the PyTorch script does not implement: " + ", ".join(bad))


def torch_worker(args) -> None:
  """``--torch-worker CONFIG.json --layout L``: the whole run in PyTorch;
  writes its phase times and accuracies to ``--worker-out``."""
  t_launch_side = time.time()
  import numpy as np
  import torch
  import torch.nn.functional as F
  from tests.torch_nets import TorchSmallCNN
  t_imported = time.time()
  torch.set_num_threads(int(args.threads))
  cfg = json.loads(pathlib.Path(args.torch_worker).read_text())
  check_torch_config(cfg)
  cl = args.layout == "channels_last"
  fmt = torch.channels_last if cl else torch.contiguous_format
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  seed = int(cfg["seed"])
  torch.manual_seed(seed)
  phases = {"data_s": 0.0, "train_s": [], "val_s": [], "ckpt_s": [],
            "test_s": {}}

  # ---- data (uint8 NCHW tensors)
  t0 = time.perf_counter()
  data_dir = cfg["data"]["data_dir"] or DATA_DIR
  xtr = _read_idx(_idx_path(data_dir, "train-images-idx3-ubyte"))
  ytr = _read_idx(_idx_path(data_dir, "train-labels-idx1-ubyte"))
  xte = _read_idx(_idx_path(data_dir, "t10k-images-idx3-ubyte"))
  yte = _read_idx(_idx_path(data_dir, "t10k-labels-idx1-ubyte"))
  d = cfg["data"]
  if d["train_subset"]:
    xtr, ytr = xtr[:d["train_subset"]], ytr[:d["train_subset"]]
  if d["test_subset"]:
    xte, yte = xte[:d["test_subset"]], yte[:d["test_subset"]]
  n = len(ytr)
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A11D]))
  is_val = np.zeros(n, bool)
  is_val[rng.permutation(n)[:int(d["num_val"])]] = True
  as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  x_train = as_t(xtr[~is_val])[:, None]
  y_train = as_t(ytr[~is_val].astype(np.int64))
  ev = cfg["eval"]
  n_val = int(ev["val_subset"]) or None
  x_val = as_t(xtr[is_val][:n_val])[:, None]
  y_val = as_t(ytr[is_val][:n_val].astype(np.int64))
  x_test, y_test = as_t(xte)[:, None], as_t(yte.astype(np.int64))
  phases["data_s"] = time.perf_counter() - t0

  # ---- model, optimizer
  kw = cfg["model"]["kwargs"]
  model = TorchSmallCNN(10, in_channels=1, hw=(28, 28),
                        features=tuple(kw.get("features", (32, 64))),
                        hidden=int(kw.get("hidden", 128)),
                        mean=FASHION_STATS[0], std=FASHION_STATS[1])
  model = model.to(memory_format=fmt)
  t = cfg["train"]
  opt = torch.optim.SGD(model.parameters(), lr=float(t["lr"]),
                        momentum=float(t["momentum"]),
                        nesterov=bool(t["nesterov"]),
                        weight_decay=float(t["weight_decay"]))
  bs, epochs = int(t["batch_size"]), int(t["epochs"])
  steps_per_epoch = len(y_train) // bs
  method = cfg["method"]["name"]
  att = cfg["method"]["attack"]

  def to_input(xu8):
    return xu8.float().div_(255.0).contiguous(memory_format=fmt)

  def pgd(x, y, eps, step, steps):
    """L-inf PGD on the summed CE: uniform start, sign steps, eps ball and
    [0, 1] box, the last iterate (model mode as set by the caller)."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp_(0.0, 1.0) - x
    for _ in range(steps):
      delta.requires_grad_(True)
      loss = F.cross_entropy(model(x + delta), y, reduction="sum")
      grad, = torch.autograd.grad(loss, delta)
      with torch.no_grad():
        delta = (delta + step * grad.sign()).clamp_(-eps, eps)
        delta = (x + delta).clamp_(0.0, 1.0) - x
    return (x + delta).detach()

  def evaluate(x_all, y_all, steps):
    """Clean and PGD-``steps`` accuracy, eval mode, batch eval.batch_size."""
    eps = float(ev["eps"])
    step = (float(ev["pgd_step_size"]) if ev["pgd_step_size"] is not None
            else 2.5 * eps / steps)
    model.eval()
    clean = robust = 0
    b = int(ev["batch_size"])
    for i in range(0, len(y_all), b):
      x, y = to_input(x_all[i:i + b]), y_all[i:i + b]
      with torch.no_grad():
        clean += int((model(x).argmax(1) == y).sum())
      xa = pgd(x, y, eps, step, steps)
      with torch.no_grad():
        robust += int((model(xa).argmax(1) == y).sum())
    return {"clean/acc": clean / len(y_all), "pgd/acc": robust / len(y_all)}

  best_metric, best_epoch, history = -1.0, 0, []
  lr0, factor = float(t["lr"]), float(t["lr_factor"])
  for epoch in range(epochs):
    # ---- train
    t0 = time.perf_counter()
    lr = lr0 * factor ** sum(epoch >= int(b) for b in t["boundaries"])
    for group in opt.param_groups:
      group["lr"] = lr
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(y_train), generator=g)
    loss_sum = 0.0
    model.train()
    for i in range(steps_per_epoch):
      idx = perm[i * bs:(i + 1) * bs]
      x, y = to_input(x_train[idx]), y_train[idx]
      if method == "pgd_at":
        model.eval()
        x = pgd(x, y, float(att["eps"]), float(att["step_size"]),
                int(att["steps"]))
        model.train()
      loss = F.cross_entropy(model(x), y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      loss_sum += loss.item()
    phases["train_s"].append(time.perf_counter() - t0)
    # ---- validate
    t0 = time.perf_counter()
    val = evaluate(x_val, y_val, int(ev["val_pgd_steps"])) if len(y_val) else {}
    phases["val_s"].append(time.perf_counter() - t0)
    # ---- checkpoints
    t0 = time.perf_counter()
    if val and val["pgd/acc"] > best_metric:
      best_metric, best_epoch = val["pgd/acc"], epoch + 1
      torch.save(model.state_dict(), workdir / "best.pt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "epoch": epoch + 1}, workdir / "checkpoint.pt")
    phases["ckpt_s"].append(time.perf_counter() - t0)
    history.append({"epoch": epoch + 1, "train_loss": loss_sum /
                    steps_per_epoch, **{f"val/{k}": v for k, v in val.items()}})
    print(f"epoch {epoch + 1}/{epochs} | train loss "
          f"{loss_sum / steps_per_epoch:.4f} | val clean "
          f"{val.get('clean/acc', float('nan')):.4f} pgd "
          f"{val.get('pgd/acc', float('nan')):.4f} | train "
          f"{phases['train_s'][-1]:.1f} s, val {phases['val_s'][-1]:.1f} s",
          flush=True)

  # ---- test: last and best
  results = {}
  t0 = time.perf_counter()
  results["last"] = evaluate(x_test, y_test, int(ev["pgd_steps"]))
  phases["test_s"]["last"] = time.perf_counter() - t0
  if best_epoch:
    t0 = time.perf_counter()
    model.load_state_dict(torch.load(workdir / "best.pt"))
    results["best"] = evaluate(x_test, y_test, int(ev["pgd_steps"]))
    phases["test_s"]["best"] = time.perf_counter() - t0
  (workdir / "results.json").write_text(json.dumps(
      {"results": results, "history": history, "best_epoch": best_epoch}))
  out = {"layout": args.layout, "threads": torch.get_num_threads(),
         "imported": t_imported, "started": t_launch_side,
         "steps_per_epoch": steps_per_epoch, "num_train": len(y_train),
         "num_val": len(y_val), "num_test": len(y_test),
         "phases": phases, "results": results, "history": history,
         "best_epoch": best_epoch, "end": time.time()}
  pathlib.Path(args.worker_out).write_text(json.dumps(out))
  print(f"test last: clean {results['last']['clean/acc']:.4f} pgd "
        f"{results['last']['pgd/acc']:.4f}; phases " + json.dumps(
            {k: v for k, v in phases.items()}), flush=True)


# ==================================================================== driver
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated, from {METHODS}")
  p.add_argument("--epochs", type=int, default=None,
                 help="training epochs (default 3; 1 with --quick)")
  p.add_argument("--layouts", default=",".join(LAYOUTS),
                 help=f"PyTorch memory layouts to run, from {LAYOUTS}; the "
                      "faster is the reference")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default os.cpu_count())")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override for both sides (repeatable), e.g. "
                      "--set data.train_subset=20000")
  p.add_argument("--quick", action="store_true",
                 help=f"sanity run: 1 epoch, {QUICK_SET}")
  p.add_argument("--keep-workdirs", action="store_true")
  p.add_argument("--no-results-md", action="store_true",
                 help="do not append a section to benchmarks/RESULTS.md")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/"
                      "image_run_<backend>[_quick].json)")
  p.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--layout", default="nchw", help=argparse.SUPPRESS)
  p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
  p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  a.argv = list(sys.argv[1:] if argv is None else argv)
  if a.torch_worker:
    return a
  a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
  a.layouts = [m.strip() for m in a.layouts.split(",") if m.strip()]
  if not a.methods or any(m not in METHODS for m in a.methods):
    p.error(f"--methods takes names from {METHODS}")
  if not a.layouts or any(m not in LAYOUTS for m in a.layouts):
    p.error(f"--layouts takes names from {LAYOUTS}")
  if a.epochs is None:
    a.epochs = 1 if a.quick else 3
  if a.epochs < 1:
    p.error("--epochs must be >= 1")
  a.torch_threads = a.torch_threads or os.cpu_count()
  overrides = dict(QUICK_SET) if a.quick else {}
  for item in a.set:
    if "=" not in item:
      p.error(f"--set takes FIELD=VALUE, got {item!r}")
    k, v = item.split("=", 1)
    overrides[k.strip()] = v.strip()
  overrides["train.epochs"] = str(a.epochs)
  overrides["train.boundaries"] = "()"
  a.overrides = overrides
  return a


def build_config(method: str, overrides: dict):
  """``configs/adv_train.py:fashion_mnist,METHOD`` with the overrides (the
  strings given to ``--config.FIELD=VALUE``, converted to the field's type:
  tuples as Python literals), validated as experiments.train validates it;
  the PyTorch script reads this config."""
  from tsjax.configs.adv_train import get_config
  from experiments.train import validate
  c = get_config(f"fashion_mnist,{method}")
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = c
    for q in parents:
      node = node[q]
    old = node[leaf]
    if old is None:
      try:
        node[leaf] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        node[leaf] = value
    elif isinstance(old, (tuple, list)):
      node[leaf] = tuple(ast.literal_eval(value))
    elif isinstance(old, bool):
      node[leaf] = value in ("True", "true", "1")
    elif isinstance(old, int):
      node[leaf] = int(value)
    elif isinstance(old, float):
      node[leaf] = float(value)
    else:
      node[leaf] = value
  validate(c)
  return c


def tsjax_command(method: str, overrides: dict, workdir: str) -> list[str]:
  return ([sys.executable, "-m", "experiments.train", "--config",
           f"configs/adv_train.py:fashion_mnist,{method}"] +
          [f"--config.{k}={v}" for k, v in overrides.items()] +
          ["--workdir", workdir])


class _Tail(threading.Thread):
  """Polls a growing file; records ``(t since launch, line)`` per new line."""

  def __init__(self, path, t0, every=0.05):
    super().__init__(daemon=True)
    self.path, self.t0, self.every = pathlib.Path(path), t0, every
    self.lines, self._pos, self._buf = [], 0, ""
    self._halt = threading.Event()

  def poll(self):
    try:
      with self.path.open() as f:
        f.seek(self._pos)
        chunk = f.read()
        self._pos = f.tell()
    except FileNotFoundError:
      return
    if chunk:
      now = time.perf_counter() - self.t0
      self._buf += chunk
      *done, self._buf = self._buf.split("\n")
      self.lines += [(now, l) for l in done if l.strip()]

  def run(self):
    while not self._halt.is_set():
      self.poll()
      time.sleep(self.every)

  def stop(self):
    self._halt.set()
    self.join()
    self.poll()


def run_tsjax(method: str, overrides: dict, keep: bool) -> dict:
  workdir = tempfile.mkdtemp(prefix=f"image_run_{method}_")
  cache = tempfile.mkdtemp(prefix="image_run_jaxcache_")
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
         "PYTHONUNBUFFERED": "1"}
  cmd = tsjax_command(method, overrides, workdir)
  print(f"  tsjax {method}: {' '.join(cmd[1:])}", flush=True)
  t0 = time.perf_counter()
  tail = _Tail(os.path.join(workdir, "metrics.jsonl"), t0)
  tail.start()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)
  lines = []
  for line in proc.stdout:
    line = line.rstrip("\n")
    lines.append((time.perf_counter() - t0, line))
    if line.startswith(("epoch ", "done in", "Traceback", "config error")) \
        or "Error" in line:
      print(f"    [tsjax {method}] {line}", flush=True)
  rc = proc.wait()
  wall = time.perf_counter() - t0
  tail.stop()
  if rc:
    raise SystemExit(f"tsjax {method} failed (exit {rc}):\n" + "\n".join(
        l for _, l in lines[-40:]))
  epochs = []
  for t, line in lines:
    m = EPOCH_LINE.match(line)
    if m:
      epochs.append({"epoch": int(m.group(1)), "line_t": t,
                     "epoch_s": float(m.group(3))})
  metrics = [(t, json.loads(l)) for t, l in tail.lines]
  phases = {"train_s": [], "val_s": [], "ckpt_s": []}
  for e in epochs:
    start = e["line_t"] - e["epoch_s"]
    rec = next((t for t, m in metrics if m.get("epoch") == e["epoch"]), None)
    trains = [t for t, m in metrics if "epoch" not in m and
              any(k.startswith("train/") for k in m) and
              (rec is None or t <= rec) and t >= start - 0.2]
    t_train_end = trains[-1] if trains else rec
    if rec is None or t_train_end is None:
      phases = None
      break
    phases["train_s"].append(t_train_end - start)
    phases["val_s"].append(rec - t_train_end)
    phases["ckpt_s"].append(e["line_t"] - rec)
  startup = epochs[0]["line_t"] - epochs[0]["epoch_s"] if epochs else None
  res = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  out = {"wall_s": wall, "startup_s": startup,
         "epoch_s": [e["epoch_s"] for e in epochs], "phases": phases,
         "test_s": wall - epochs[-1]["line_t"] if epochs else None,
         "results": {k: {"clean/acc": v["clean_acc"], "pgd/acc": v["pgd_acc"]}
                     for k, v in res["results"].items()},
         "best_epoch": res.get("best_epoch"), "history": res.get("history"),
         "command": " ".join(cmd[1:-2]),
         "workdir": workdir if keep else None}
  if not keep:
    shutil.rmtree(workdir, ignore_errors=True)
  shutil.rmtree(cache, ignore_errors=True)
  ph = phases or {}
  print(f"  tsjax {method}: {wall:.1f} s (start-up {startup:.1f} s, train "
        f"{sum(ph.get('train_s', [0])):.1f} s, validation "
        f"{sum(ph.get('val_s', [0])):.1f} s, checkpoints "
        f"{sum(ph.get('ckpt_s', [0])):.1f} s, test {out['test_s']:.1f} s)",
        flush=True)
  return out


def run_torch(method: str, cfg_path: str, layout: str, threads: int,
              keep: bool) -> dict:
  workdir = tempfile.mkdtemp(prefix=f"image_run_torch_{method}_{layout}_")
  fd, out_path = tempfile.mkstemp(prefix="image_run_torch_", suffix=".json")
  os.close(fd)
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()),
         "--torch-worker", cfg_path, "--layout", layout, "--threads",
         str(threads), "--workdir", workdir, "--worker-out", out_path]
  print(f"  PyTorch {method}, {layout}, {threads} thread(s)", flush=True)
  launch = time.time()
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ,
                                             "PYTHONUNBUFFERED": "1"},
                        capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f"PyTorch {method} ({layout}) failed (exit "
                     f"{proc.returncode}):\n{proc.stdout[-3000:]}\n"
                     f"{proc.stderr[-3000:]}")
  for line in proc.stdout.splitlines():
    print(f"    [torch {layout}] {line}", flush=True)
  w = json.loads(pathlib.Path(out_path).read_text())
  os.unlink(out_path)
  if not keep:
    shutil.rmtree(workdir, ignore_errors=True)
  ph = w["phases"]
  w["wall_s"] = wall
  w["startup_s"] = w["imported"] - launch
  w["exit_s"] = wall - (w["end"] - launch)
  print(f"  PyTorch {method}, {layout}: {wall:.1f} s (data "
        f"{ph['data_s']:.1f} s, train {sum(ph['train_s']):.1f} s, validation "
        f"{sum(ph['val_s']):.1f} s, checkpoints {sum(ph['ckpt_s']):.1f} s, "
        f"test {sum(ph['test_s'].values()):.1f} s)", flush=True)
  return w


def _load(avg) -> str:
  return "n/a" if avg is None else " / ".join(f"{v:.1f}" for v in avg)


def results_md_lines(result, machine, command) -> list:
  lines = [
      "", f"## Image run end to end on Fashion-MNIST (benchmarks/image_run.py),"
      f" {result['timestamp']}", "",
      f"Command: `{command}` (commit {machine['git_commit'][:7]}). Machine: "
      f"{machine['cpu_model']}, {machine['cpu_count']} cores, jax "
      f"{machine['jax']}, torch {machine.get('torch', '?')} on "
      f"{result['torch_threads']} threads; load average "
      f"{_load(machine['loadavg_before'])} before, "
      f"{_load(machine['loadavg_after'])} after."
      f" `experiments.train --config configs/adv_train.py:fashion_mnist,METHOD"
      f"` with {result['epochs']} epochs, constant lr; train + validation "
      f"after each epoch + test (last and best, clean + PGD-20 on "
      f"{result['rows'][0]['num_test']} images). PyTorch: the faster of "
      f"{', '.join(result['layouts'])}.", "",
      "| method | tsjax s | PyTorch s (layout) | speed-up | tsjax train s | "
      "PyTorch train s | tsjax eval s | PyTorch eval s |",
      "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    lines.append(
        f"| {r['method']} | {r['tsjax_s']:.1f} | {r['torch_s']:.1f} "
        f"({r['torch_layout']}) | **{r['speedup']:.2f}×** | "
        f"{_fmt(r['tsjax_train_s'])} | {r['torch_train_s']:.1f} | "
        f"{_fmt(r['tsjax_eval_s'])} | {r['torch_eval_s']:.1f} |")
  lines.append("")
  lines.append("Train = training epochs (tsjax: compilation of the step "
               "included); eval = validation after every epoch + test "
               "evaluation. Accuracies (test, last parameters, clean / "
               "PGD-20): " + "; ".join(
                   f"{r['method']} tsjax {r['tsjax_acc']['clean/acc']:.4f} / "
                   f"{r['tsjax_acc']['pgd/acc']:.4f}, PyTorch "
                   f"{r['torch_acc']['clean/acc']:.4f} / "
                   f"{r['torch_acc']['pgd/acc']:.4f}" for r in result["rows"])
               + ".")
  return lines


def _fmt(v):
  return "–" if v is None else f"{v:.1f}"


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.torch_worker:
    torch_worker(args)
    return
  import jax
  from _common import (append_to_results_md, installed_version, loadavg,
                       machine_info, merge_rows, open_results, write_results)
  machine = machine_info()
  machine["torch"] = installed_version("torch")
  machine["loadavg_before"] = loadavg()
  print(f"image run: Fashion-MNIST, methods {args.methods}, {args.epochs} "
        f"epoch(s), overrides {args.overrides}; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {machine['torch']} "
        f"({args.torch_threads} threads, layouts {args.layouts}), "
        f"{os.cpu_count()} cores, load average {machine['loadavg_before']}",
        flush=True)
  t_all = time.perf_counter()
  rows = []
  for method in args.methods:
    config = build_config(method, args.overrides)
    cfg = json.loads(config.to_json())
    check_torch_config(cfg)
    fd, cfg_path = tempfile.mkstemp(prefix="image_run_cfg_", suffix=".json")
    os.close(fd)
    pathlib.Path(cfg_path).write_text(json.dumps(cfg))
    tj = run_tsjax(method, args.overrides, args.keep_workdirs)
    tt = {lay: run_torch(method, cfg_path, lay, args.torch_threads,
                         args.keep_workdirs) for lay in args.layouts}
    os.unlink(cfg_path)
    ref = min(tt, key=lambda k: tt[k]["wall_s"])
    r = tt[ref]
    ph = tj["phases"]
    t_train = sum(ph["train_s"]) if ph else None
    t_eval = (sum(ph["val_s"]) + tj["test_s"]) if ph else None
    row = {
        "method": method, "epochs": args.epochs,
        "tsjax_s": tj["wall_s"], "torch_s": r["wall_s"],
        "torch_layout": ref, "speedup": r["wall_s"] / tj["wall_s"],
        "torch_by_layout_s": {k: v["wall_s"] for k, v in tt.items()},
        "tsjax_train_s": t_train, "tsjax_eval_s": t_eval,
        "torch_train_s": sum(r["phases"]["train_s"]),
        "torch_eval_s": sum(r["phases"]["val_s"]) + sum(
            r["phases"]["test_s"].values()),
        "steps_per_epoch": r["steps_per_epoch"], "num_train": r["num_train"],
        "num_test": r["num_test"],
        "tsjax_acc": tj["results"]["last"], "torch_acc": r["results"]["last"],
        "tsjax": tj, "torch": tt,
    }
    if t_train:
      row["speedup_train"] = row["torch_train_s"] / t_train
    if t_eval:
      row["speedup_eval"] = row["torch_eval_s"] / t_eval
    rows.append(row)

  machine["loadavg_after"] = loadavg()
  print(f"\nEnd to end, wall time ({args.epochs} epoch(s); PyTorch: the faster "
        f"of {args.layouts}, {args.torch_threads} threads):")
  hdr = (f"{'method':<9} | {'tsjax s':>8} | {'PyTorch s (layout)':>23} | "
         f"{'speed-up':>8} | {'train tsjax/torch s':>19} | "
         f"{'eval tsjax/torch s':>18}")
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    print(f"{r['method']:<9} | {r['tsjax_s']:>8.1f} | {r['torch_s']:>7.1f} "
          f"({r['torch_layout']:>13}) | {r['speedup']:>7.2f}x | "
          f"{_fmt(r['tsjax_train_s']):>9} / {r['torch_train_s']:<7.1f} | "
          f"{_fmt(r['tsjax_eval_s']):>8} / {r['torch_eval_s']:<7.1f}")
  print("\nTest accuracy of the last parameters (clean / PGD), different "
        "initial weights per framework:")
  for r in rows:
    print(f"  {r['method']:<9} tsjax {r['tsjax_acc']['clean/acc']:.4f} / "
          f"{r['tsjax_acc']['pgd/acc']:.4f}   PyTorch "
          f"{r['torch_acc']['clean/acc']:.4f} / "
          f"{r['torch_acc']['pgd/acc']:.4f}   (PyTorch by layout: " +
          ", ".join(f"{k} {v:.1f} s" for k, v in
                    r["torch_by_layout_s"].items()) + ")")
  result = {
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "epochs": args.epochs, "overrides": args.overrides, "quick": args.quick,
      "layouts": args.layouts, "torch_threads": args.torch_threads,
      "timing": "wall time of each launch (subprocess), start to exit",
      "total_s": time.perf_counter() - t_all, "rows": rows,
  }
  path, data, command = open_results("image_run", machine, args)
  run_key = f"epochs{args.epochs}"
  merge_rows(data, run_key, result, machine, command, "method", METHODS)
  write_results(path, data)
  print(f"\nsaved {path} (total {result['total_s']:.0f} s; load average "
        f"before/after {machine['loadavg_before']} / "
        f"{machine['loadavg_after']})")
  if not args.quick and not args.no_results_md:
    append_to_results_md(results_md_lines(result, machine, command))


if __name__ == "__main__":
  main()

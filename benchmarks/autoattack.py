"""Standard AutoAttack: tsjax vs torchattacks on the same model and points.

Times ``tsjax.attacks.autoattack.autoattack(..., version="standard")``
(APGD-CE -> APGD-T -> FAB-T -> Square, each on the points still robust)
against ``torchattacks.AutoAttack(model, norm="Linf", eps=eps,
version="standard", n_classes=10, seed=0)`` on the same network weights and
the same test points, in one process, and reports both robust accuracies.

Iterations: torchattacks' "standard" builds its sub-attacks with their
constructor defaults, i.e. **10** iterations for APGD-CE, APGD-T and FAB-T
(the reference, fra31/auto-attack, and tsjax use 100; Square has 5000
queries in all three). ``--steps 100`` (the default) sets the torchattacks
sub-attacks' ``steps`` attribute to 100 so that both run the reference's
standard AutoAttack; ``--steps 10`` runs torchattacks as shipped and tsjax
with ``steps=10``. Both run L-inf, 9 target classes, 1 restart.

Models (``--models``):

* ``mlp``: the Fashion-MNIST MLP 784-128-64-10 of ``tests/reference_models.py``
  (trained in JAX on real data; the same weights copied into PyTorch);
* ``small_cnn``: ``tsjax.models.SmallCNN`` (conv32-conv64-fc128-fc, no input
  normalisation) and the same network in PyTorch, trained in PyTorch for
  ``--train-steps`` SGD steps on the training split (1 thread, seeded), its
  weights converted to tsjax with ``tsjax.models.convert_state_dict`` (fc1
  rows permuted to NHWC);
* ``resnet18``: ``tsjax.models.ResNet18`` (CIFAR stem, kuangliu layout) and the
  kuangliu ResNet-18 in PyTorch (in_channels from the data), trained and
  converted the same way; meant for ``--device gpu``.

Data: Fashion-MNIST test points (``--dataset``; ``small_cnn`` / ``resnet18``
also take ``cifar10`` where ``tsjax.data.images.load_dataset`` can read it).
Before timing, the two networks' logits must agree (max abs difference <= 1e-4
of the largest logit, float32; on a GPU TF32 is switched off in PyTorch and
JAX's default matmul precision set to "highest", so both compute in float32).

Timing (wall clock):

* torchattacks: one call (``--torch-calls``), after a forward/backward
  warm-up; ``torch.set_num_threads(os.cpu_count())`` (or ``--torch-threads``);
  on a GPU followed by ``torch.cuda.synchronize()``.
* tsjax: ``--tsjax-calls`` calls (default 2) of ``autoattack`` in the form
  experiments use, ``autoattack(ModelLogits(model), ..., params=...)``. The
  first call includes compiling every attack; a repeat call reuses the
  compiled attacks (parameters are an argument), compiling only a batch
  bucket it has not seen. (Before this form, every call traced and compiled
  again.) The compile overhead inside each call is measured from JAX's own
  compile events (``jax.monitoring``: ``/jax/core/compile/*`` durations --
  tracing, lowering to MLIR, XLA compilation -- merged as time intervals so
  nested traces count once), and the steady-state figure is the wall time of
  a repeat call minus that overhead (best over repeat calls), i.e. what a call
  costs once compiled. Per-attack times come from timestamps taken when
  ``autoattack`` starts each attack (tsjax) and from wrapping each
  sub-attack's ``forward`` (torchattacks).

Ratios: ``speedup = torch_s / tsjax_steady_s``; also against the repeat-call
wall time (``speedup_call``, what a later call costs a user) and against the
first call (``speedup_first``).

``autoattack`` runs each attack in batches of the smallest power of two
(>= 8) holding the points still robust, capped at ``--batch-size`` (default:
the number of points, i.e. one batch, as torchattacks uses), the last batch
padded; with 500 points and ~280 left after APGD-CE that is one batch padded
to 500. The padding is part of the tsjax figure (``--batch-size 100`` pads
less).

Run from the repository root::

  python benchmarks/autoattack.py                        # CPU: mlp, small_cnn
  python benchmarks/autoattack.py --models mlp --n 500 --eps 0.035
  python benchmarks/autoattack.py --steps 10             # torchattacks as shipped
  python benchmarks/autoattack.py --device gpu           # ResNet-18 on a GPU
  python benchmarks/autoattack.py --quick                # sanity run (mlp, 64 points)

Results: a table on stdout and ``benchmarks/results/autoattack_<backend>.json``
(one entry per model / steps / torch threads; ``--quick`` writes
``autoattack_<backend>_quick.json``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import time
import warnings

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE), str(ROOT / "tests")):
  if _p not in sys.path:
    sys.path.insert(0, _p)

MODELS = ("mlp", "small_cnn", "resnet18")
DEFAULTS = {  # per model: points, eps, training steps (torch-trained models)
    "mlp": dict(n=500, eps=0.035, train_steps=0),
    "small_cnn": dict(n=200, eps=0.05, train_steps=400),
    # Not calibrated (no GPU here): pick --eps from the printed accuracies.
    "resnet18": dict(n=1000, eps=0.03, train_steps=1000),
}
QUICK = dict(models="mlp", n=64, steps=10)
NUM_CLASSES = 10
CHECK_RTOL = 1e-4


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                 help="cpu (JAX_PLATFORMS=cpu, torch on cpu) or gpu (jax's "
                      "GPU backend and torch on cuda)")
  p.add_argument("--models", default=None,
                 help=f"comma-separated from {MODELS} (default: mlp,small_cnn "
                      "on cpu, resnet18 on gpu)")
  p.add_argument("--n", type=int, default=None,
                 help="test points (default per model: " + ", ".join(
                     f"{m} {d['n']}" for m, d in DEFAULTS.items()) + ")")
  p.add_argument("--eps", type=float, default=None,
                 help="L-inf radius (default per model: " + ", ".join(
                     f"{m} {d['eps']}" for m, d in DEFAULTS.items()) + ")")
  p.add_argument("--steps", type=int, default=None,
                 help="iterations of APGD-CE / APGD-T / FAB-T in both (default "
                      "100, the reference standard; 10 = torchattacks' "
                      "defaults)")
  p.add_argument("--batch-size", type=int, default=None,
                 help="tsjax autoattack batch size (default: n, one batch)")
  p.add_argument("--dataset", default="fashion_mnist",
                 help="for small_cnn / resnet18 (mlp is Fashion-MNIST only)")
  p.add_argument("--train-steps", type=int, default=None,
                 help="SGD steps training small_cnn / resnet18 in torch")
  p.add_argument("--tsjax-calls", type=int, default=2,
                 help="autoattack calls (the first compiles; default 2)")
  p.add_argument("--torch-calls", type=int, default=1)
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads (default os.cpu_count())")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true",
                 help="sanity run: mlp, 64 points, 10 steps")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/results/"
                      "autoattack_<backend>[_quick].json)")
  a = p.parse_args(argv)
  a.argv = list(sys.argv[1:] if argv is None else argv)
  if a.quick:
    a.models = a.models or QUICK["models"]
    a.n = a.n or QUICK["n"]
    a.steps = a.steps or QUICK["steps"]
  if a.models is None:
    a.models = "resnet18" if a.device == "gpu" else "mlp,small_cnn"
  a.models = [m.strip() for m in a.models.split(",") if m.strip()]
  bad = [m for m in a.models if m not in MODELS]
  if bad or not a.models:
    p.error(f"--models takes names from {MODELS}, got {bad or a.models}")
  a.steps = 100 if a.steps is None else a.steps
  if a.steps < 1 or a.tsjax_calls < 1 or a.torch_calls < 1 or (
      a.n is not None and a.n < 1):
    p.error("--steps, --n, --tsjax-calls, --torch-calls must be >= 1")
  return a


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
  os.environ["JAX_PLATFORMS"] = "cpu"
# On a GPU both frameworks share the device: keep JAX from preallocating 75%
# of its memory (an explicit setting in the environment wins).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import (loadavg, machine_info, open_results,  # noqa: E402
                     uptime, write_results)
from tests.torch_nets import TorchResNet18, TorchSmallCNN  # noqa: E402
from tsjax import models  # noqa: E402
from tsjax.attacks import autoattack as aa  # noqa: E402
from tsjax.data import images  # noqa: E402
from tsjax.methods.common import ModelLogits  # noqa: E402

STAGES = aa.VERSIONS["standard"]          # apgd-ce, apgd-t, fab-t, square


# ------------------------------------------------------- compile accounting
class CompileClock:
  """Wall-clock intervals JAX spends tracing, lowering and compiling, from
  ``jax.monitoring`` duration events (reported when each phase ends)."""

  PREFIX = "/jax/core/compile/"

  def __init__(self):
    self.intervals = []
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event.startswith(self.PREFIX):
      now = time.perf_counter()
      self.intervals.append((now - duration, now))

  def within(self, t0: float, t1: float) -> float:
    """Seconds of [t0, t1] covered by compile intervals (overlaps once)."""
    spans = sorted((max(a, t0), min(b, t1)) for a, b in self.intervals
                   if b > t0 and a < t1)
    total, end = 0.0, -float("inf")
    for a, b in spans:
      if b <= end:
        continue
      total += b - max(a, end)
      end = b
    return total


CLOCK = CompileClock()


def to_nchw(x, device):
  return torch.from_numpy(np.ascontiguousarray(
      np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2)))).to(device)


def train_torch(net, x, y, steps, device, seed, batch=128, lr=0.05):
  """Clean SGD training (momentum 0.9, cosine lr) on NHWC uint8 ``x``."""
  g = torch.Generator().manual_seed(seed)
  opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9,
                        weight_decay=5e-4)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
  net.train()
  for _ in range(steps):
    idx = torch.randint(0, len(x), (batch,), generator=g).numpy()
    xb = to_nchw(x[idx].astype(np.float32) / 255.0, device)
    yb = torch.from_numpy(y[idx].astype(np.int64)).to(device)
    loss = F.cross_entropy(net(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
  return net.eval()


def build(name, args, device):
  """((tsjax model_fn, its params), torch net in eval mode, x [N,H,W,C]
  float32, y, info); ``model_fn(params, x) -> logits``, the form
  ``autoattack(..., params=...)`` reuses compiled attacks for."""
  n = args.n or DEFAULTS[name]["n"]
  if name == "mlp":
    from reference_models import fmnist_reference, torch_model
    model, params, x, y = fmnist_reference(n_test=max(n, 500))
    return ((ModelLogits(model), (params, {})),
            torch_model(params).to(device), x[:n], np.asarray(y[:n]),
            {"trained": "JAX, tests/reference_models.fmnist_reference "
                        "(600 SGD steps on 10k training images)"})
  train = images.load_dataset(args.dataset, "train")
  test = images.load_dataset(args.dataset, "test")
  h, w, c = train.images.shape[1:]
  steps = (args.train_steps if args.train_steps is not None
           else DEFAULTS[name]["train_steps"])
  torch.manual_seed(args.seed)
  net = (TorchSmallCNN(NUM_CLASSES, in_channels=c, hw=(h, w))
         if name == "small_cnn"
         else TorchResNet18(NUM_CLASSES, in_channels=c)).to(device)
  t0 = time.perf_counter()
  threads = torch.get_num_threads()
  torch.set_num_threads(1)   # same weights whatever --torch-threads is (and
  try:                       # 1 thread is ~4x faster on a busy 2-core CPU)
    train_torch(net, train.images, np.asarray(train.labels), steps, device,
                args.seed)
  finally:
    torch.set_num_threads(threads)
  train_s = time.perf_counter() - t0
  sd = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
  params, state = models.convert_state_dict(sd, name, input_shape=(h, w, c),
                                            num_classes=NUM_CLASSES)
  model = models.get_model(name, num_classes=NUM_CLASSES)
  x = test.images[:n].astype(np.float32) / 255.0
  return (ModelLogits(model), (params, state)), net, x, np.asarray(test.labels[:n]), {
      "trained": f"PyTorch, {steps} SGD steps (batch 128, lr 0.05 cosine, "
                 f"momentum 0.9, wd 5e-4) on {args.dataset} train, "
                 f"{train_s:.0f} s; converted with "
                 f"tsjax.models.convert_state_dict"}


def check_agreement(tm, net, x, device) -> dict:
  m = min(len(x), 256)
  lj = np.asarray(jax.jit(tm[0])(tm[1], jnp.asarray(x[:m])))
  with torch.no_grad():
    lt = net(to_nchw(x[:m], device)).cpu().numpy()
  err = float(np.abs(lj - lt).max() / np.abs(lt).max())
  same = float(np.mean(lj.argmax(1) == lt.argmax(1)))
  return {"points": m, "logits_rel_err": err, "same_prediction": same,
          "ok": err <= CHECK_RTOL and same == 1.0}


# ------------------------------------------------------------ the two runs
def run_tsjax(tm, x, y, eps, steps, batch_size, seed):
  """One autoattack call: (result, wall s, compile s, per-stage dict)."""
  marks = []
  orig = aa._attack_fn

  def spy(name, *a, **k):          # autoattack starts attack `name` now
    marks.append((name, time.perf_counter()))
    return orig(name, *a, **k)

  aa._attack_fn = spy
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", aa.AutoAttackWarning)
      t0 = time.perf_counter()
      out = aa.autoattack(tm[0], x, y, jax.random.key(seed), norm="linf",
                          eps=eps, version="standard", steps=steps,
                          batch_size=batch_size, params=tm[1])
      t1 = time.perf_counter()
  finally:
    aa._attack_fn = orig
  bounds = [("setup", t0)] + marks + [("end", t1)]
  stages = {}
  for (name, a), (_, b) in zip(bounds, bounds[1:]):
    comp = CLOCK.within(a, b)
    stages[name] = {"wall_s": b - a, "compile_s": comp, "run_s": b - a - comp}
  return out, t1 - t0, CLOCK.within(t0, t1), stages


def sync(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def run_torch(torchattacks, net, xt, yt, eps, steps, seed, device):
  atk = torchattacks.AutoAttack(net, norm="Linf", eps=eps, version="standard",
                                n_classes=NUM_CLASSES, seed=seed)
  multi = atk._autoattack
  names = dict(zip(map(id, multi.attacks), STAGES))
  times = {s: 0.0 for s in STAGES}
  for sub in multi.attacks:
    if sub is not multi.attacks[-1]:          # APGD, APGDT, FAB: 10 by default
      sub.steps = steps

    def timed(images_, labels, _orig=sub.forward, _name=names[id(sub)]):
      t = time.perf_counter()
      out = _orig(images_, labels)
      sync(device)
      times[_name] += time.perf_counter() - t
      return out
    sub.forward = timed
  # MultiAttack's per-attack counts (what its save(return_verbose=True)
  # reports); not otherwise exposed.
  multi._accumulate_multi_atk_records = True
  multi._multi_atk_records = [0.0] * (1 + len(multi.attacks))
  t0 = time.perf_counter()
  xa = atk(xt, yt)
  sync(device)
  wall = time.perf_counter() - t0
  rec = multi._multi_atk_records
  with torch.no_grad():
    robust = (net(xa).argmax(1) == yt).cpu().numpy()
  return {"x_adv": xa.detach().cpu().numpy(), "robust": robust,
          "robust_acc": float(robust.mean()),
          "robust_acc_after": {s: r / len(yt) for s, r in zip(STAGES, rec[1:])}
          }, wall, times


def bench_model(name, args, device) -> dict:
  import torchattacks
  eps = args.eps if args.eps is not None else DEFAULTS[name]["eps"]
  t0 = time.perf_counter()
  tm, net, x, y, info = build(name, args, device)
  n = len(y)
  batch_size = args.batch_size or n
  check = check_agreement(tm, net, x, device)
  print(f"\n{name}: {n} points, eps {eps}, {args.steps} iterations; model "
        f"{info['trained']}; logits agree to {check['logits_rel_err']:.1e} "
        f"(same prediction on {100 * check['same_prediction']:.0f}% of "
        f"{check['points']}) -> {'ok' if check['ok'] else 'MISMATCH'}",
        flush=True)
  if not check["ok"]:
    raise SystemExit(f"{name}: tsjax and torch models disagree; not timing "
                     "different networks")
  setup_s = time.perf_counter() - t0
  xt = to_nchw(x, device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  # torch warm-up: one forward / backward on the points.
  xw = xt[:64].clone().requires_grad_(True)
  F.cross_entropy(net(xw), yt[:64]).backward()
  sync(device)

  load = [loadavg()]
  j_calls = []
  for i in range(args.tsjax_calls):
    out_j, wall, comp, stages = run_tsjax(tm, x, y, eps, args.steps,
                                          batch_size, args.seed)
    j_calls.append({"wall_s": wall, "compile_s": comp, "run_s": wall - comp,
                    "stages": stages})
    print(f"  tsjax call {i + 1}: {wall:7.1f} s wall, of which {comp:5.1f} s "
          f"tracing/compiling -> {wall - comp:7.1f} s running; robust acc "
          f"{out_j['robust_acc']:.4f}\n    per stage (wall / compile s): "
          + ", ".join(f"{k} {v['wall_s']:.1f}/{v['compile_s']:.1f}"
                      for k, v in stages.items()), flush=True)
  load.append(loadavg())
  t_calls = []
  for i in range(args.torch_calls):
    out_t, wall, times = run_torch(torchattacks, net, xt, yt, eps, args.steps,
                                   args.seed, device)
    t_calls.append({"wall_s": wall, "stages": times})
    print(f"  torchattacks call {i + 1}: {wall:7.1f} s; robust acc "
          f"{out_t['robust_acc']:.4f}\n    per stage (s): " + ", ".join(
              f"{k} {v:.1f}" for k, v in times.items()), flush=True)
  load.append(loadavg())
  d_t = np.abs(out_t["x_adv"].reshape(n, -1) - to_nchw(x, "cpu").numpy()
               .reshape(n, -1)).max(1)
  d_j = np.abs(out_j["x_adv"].reshape(n, -1) - x.reshape(n, -1)).max(1)
  tol = max(0.005, 2 / n)
  first = j_calls[0]["wall_s"]
  repeat = j_calls[1:] or j_calls
  steady = min(c["run_s"] for c in repeat)
  call = min(c["wall_s"] for c in repeat)
  torch_s = min(c["wall_s"] for c in t_calls)
  row = {
      "model": name, "n": n, "eps": eps, "steps": args.steps,
      "batch_size": batch_size, "dataset": "fashion_mnist" if name == "mlp"
      else args.dataset, "model_info": info, "check": check,
      "clean_acc": out_j["clean_acc"],
      "tsjax_robust_acc": out_j["robust_acc"],
      "torch_robust_acc": out_t["robust_acc"],
      "tsjax_robust_acc_after": out_j["robust_acc_after"],
      "torch_robust_acc_after": out_t["robust_acc_after"],
      "robust_acc_diff": out_j["robust_acc"] - out_t["robust_acc"],
      "examples_differing": int(np.sum(out_j["robust"] != out_t["robust"])),
      "robust_acc_agree": abs(out_j["robust_acc"] - out_t["robust_acc"])
      <= tol + 1e-9, "tolerance": tol,
      "max_linf_tsjax": float(d_j.max()), "max_linf_torch": float(d_t.max()),
      "tsjax_first_call_s": first,
      "tsjax_first_call_compile_s": j_calls[0]["compile_s"],
      "tsjax_call_s": call,
      "tsjax_steady_s": steady,
      "torch_s": torch_s,
      "speedup": torch_s / steady,
      "speedup_call": torch_s / call,
      "speedup_first": torch_s / first,
      "tsjax_calls": j_calls, "torch_calls": t_calls,
      "torch_threads": torch.get_num_threads(),
      "loadavg_tsjax_before_after_torch_after": load,
      "setup_s": setup_s,
  }
  return row


# -------------------------------------------------------------- reporting
def print_table(result: dict) -> None:
  print(f"\nStandard AutoAttack (L-inf, APGD-CE/APGD-T/FAB-T "
        f"{result['steps']} iterations, Square 5000 queries), backend "
        f"{result['backend']}, torch {result['torch_threads']} threads:")
  hdr = (f"{'model':<10} | {'n':>4} | {'eps':>6} | {'clean':>5} | "
         f"{'robust tsjax':>12} | {'robust torch':>12} | {'tsjax 1st s':>11} |"
         f" {'(compile s)':>11} | {'tsjax call s':>12} | {'tsjax steady s':>14}"
         f" | {'torch s':>8} | {'torch/steady':>12} | {'torch/call':>10}")
  print(hdr)
  print("-" * len(hdr))
  for r in result["rows"]:
    print(f"{r['model']:<10} | {r['n']:>4} | {r['eps']:>6} | "
          f"{r['clean_acc']:>5.3f} | {r['tsjax_robust_acc']:>12.4f} | "
          f"{r['torch_robust_acc']:>12.4f} | {r['tsjax_first_call_s']:>11.1f} |"
          f" {r['tsjax_first_call_compile_s']:>11.1f} | "
          f"{r['tsjax_call_s']:>12.1f} | {r['tsjax_steady_s']:>14.1f} | "
          f"{r['torch_s']:>8.1f} | {r['speedup']:>11.2f}x | "
          f"{r['speedup_call']:>9.2f}x")
  print("\nper attack, s (tsjax running excl. compile, last call | torch):")
  for r in result["rows"]:
    js = r["tsjax_calls"][-1]["stages"]
    ts = r["torch_calls"][-1]["stages"]
    print(f"  {r['model']:<10} " + "  ".join(
        f"{s} {js.get(s, {}).get('run_s', 0.0):.1f} | {ts.get(s, 0.0):.1f}"
        for s in STAGES) + f"  (tsjax setup: clean pass + checks "
        f"{js['setup']['wall_s']:.1f})")


def save(result: dict, machine: dict, args) -> pathlib.Path:
  path, data, command = open_results("autoattack", machine, args)
  for r in result["rows"]:
    key = f"{r['model']}_steps{r['steps']}_torch{r['torch_threads']}threads"
    data["runs"][key] = {
        **{k: v for k, v in result.items() if k != "rows"},
        "command": command, "machine": machine, **r}
  return write_results(path, data)


def main(args) -> None:
  if args.device == "gpu":
    if jax.default_backend() != "gpu" or not torch.cuda.is_available():
      raise SystemExit(f"--device gpu needs jax's GPU backend (have "
                       f"{jax.default_backend()}) and torch.cuda (available: "
                       f"{torch.cuda.is_available()})")
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
  device = torch.device("cuda" if args.device == "gpu" else "cpu")
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  machine = machine_info(device)
  machine["loadavg_before"] = loadavg()
  machine["uptime_before"] = uptime()
  print(f"jax {jax.__version__} ({jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}), torch {torch.__version__} ({device},"
        f" {torch.get_num_threads()} threads), cpu: {machine['cpu_model']} x "
        f"{os.cpu_count()}; {machine['uptime_before']}", flush=True)
  t0 = time.perf_counter()
  rows = []
  for m in args.models:
    rows.append(bench_model(m, args, device))
    machine["loadavg_after"] = loadavg()
    machine["uptime_after"] = uptime()
    result = summary(args, rows, time.perf_counter() - t0)
    path = save(result, machine, args)      # after every model
  print_table(result)
  print(f"\nsaved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
        f" (total {result['total_s']:.0f} s; load average before/after "
        f"{machine['loadavg_before']} / {machine['loadavg_after']})")
  for r in rows:
    if not r["robust_acc_agree"]:
      print(f"WARNING: {r['model']}: robust accuracies differ by "
            f"{100 * r['robust_acc_diff']:+.2f} pp (> {100 * r['tolerance']:.2f})")


def summary(args, rows, total_s) -> dict:
  return {
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "backend": jax.default_backend(), "steps": args.steps,
      "torch_threads": torch.get_num_threads(),
      "attack": "standard AutoAttack, L-inf: APGD-CE (1 restart) -> APGD-T "
                "(9 targets) -> FAB-T (9 targets) -> Square (5000 queries), "
                "each on the points still robust; seed 0",
      "timing": "wall clock; tsjax_first_call_s includes compilation; "
                "tsjax_call_s: best repeat call (the first with --tsjax-calls "
                "1; autoattack re-traces and "
                "re-compiles on every call); tsjax_steady_s: best repeat call "
                "minus its JAX trace/lower/compile time; torch_s: best call; "
                "speedup = torch_s / tsjax_steady_s",
      "total_s": total_s,
      "rows": rows,
  }


if __name__ == "__main__":
  main(ARGS)

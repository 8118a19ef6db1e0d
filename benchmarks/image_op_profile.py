"""Where the time of the small CNN's Fashion-MNIST steps goes, op by op:
tsjax (XLA:CPU, from a ``jax.profiler`` trace) next to PyTorch (oneDNN, from
``torch.profiler``).

The pieces ``benchmarks/image_run.py`` spends its time in, built as
``benchmarks/adv_train_step.py`` builds them (batch 128 of 28x28x1, the
small CNN of ``configs/adv_train.py:fashion_mnist``, float32, the same
weights in both frameworks):

* ``attack_iter``: one PGD iteration of the evaluation / training attack
  (eval-mode forward and the gradient of the summed cross-entropy with
  respect to the input);
* ``train_fwd_bwd``: the training forward and backward pass (gradients of
  the parameters, no optimizer update).

For each, the wall time per call (median of ``--repeats``) and the ops that
make it up, tsjax with XLA:CPU's default fusions (convolutions by YNNPACK)
and with the flags the image experiments set (``IMAGE_XLA_FLAGS`` in
``experiments/common.py``: convolutions by XLA's own kernels): XLA's executed ops (thunks: fusions, library convolutions and
matrix products) with their result shapes and the source op they come from,
and PyTorch's ATen ops (self CPU time). Shares are of the summed op time;
XLA runs independent ops concurrently on its thread pool, so its op times
can add up to more than the wall time.

  python benchmarks/image_op_profile.py [--repeats 20] [--top 12]

Writes ``benchmarks/results/image_op_profile_<backend>.json``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
  if p not in sys.path:
    sys.path.insert(0, p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import adv_train_step as bench  # noqa: E402
from _common import machine_info  # noqa: E402
from tsjax import losses  # noqa: E402
from tsjax.data import images  # noqa: E402
from tsjax.methods.common import forward  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)\{?[\d,]*\}? "
                    r"(\w[\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


# The XLA settings profiled: XLA:CPU's defaults (convolutions by YNNPACK) and
# what the image experiments run with (experiments.common.IMAGE_XLA_FLAGS:
# convolutions by XLA's own kernels), as per-program compile options.
XLA_SETTINGS = {
    "tsjax_xla_default": None,
    "tsjax_experiments": {"xla_cpu_experimental_ynn_fusion_type":
                          "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def hlo_ops(compiled_text: str) -> dict:
  """Instruction name -> (result shape, opcode, source op name) of the
  entry computation's executed instructions."""
  out = {}
  for line in compiled_text.splitlines():
    m = _INSTR.match(line)
    if m:
      name, shape, opcode = m.groups()
      src = _OP_NAME.search(line)
      out[name] = (shape, opcode, src.group(1).split("/")[-2:] if src else [])
  return out


def xla_profile(fn, args, repeats: int, compiler_options=None) -> dict:
  """Wall ms per call and the per-op table of a jitted ``fn``."""
  jfn = jax.jit(fn, compiler_options=compiler_options)
  ops = hlo_ops(jfn.lower(*args).compile().as_text())
  for _ in range(3):
    jax.block_until_ready(jfn(*args))
  walls = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(jfn(*args))
    walls.append(time.perf_counter() - t)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(repeats):
        jax.block_until_ready(jfn(*args))
    trace = glob.glob(os.path.join(d, "**", "*.trace.json.gz"),
                      recursive=True)[0]
    events = json.load(gzip.open(trace))["traceEvents"]
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in ops:
      per_op[e["name"]] += e["dur"] / 1e3 / repeats
  rows = [{"op": k, "ms": v, "shape": ops[k][0], "kind": ops[k][1],
           "source": "/".join(ops[k][2])} for k, v in per_op.most_common()]
  return {"wall_ms": 1e3 * statistics.median(walls), "ops": rows}


def torch_profile(fn, repeats: int) -> dict:
  for _ in range(3):
    fn()
  walls = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    walls.append(time.perf_counter() - t)
  with torch.profiler.profile(activities=[
      torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(repeats):
      fn()
  rows = [{"op": a.key, "ms": a.self_cpu_time_total / 1e3 / repeats,
           "calls": a.count // repeats}
          for a in prof.key_averages() if a.self_cpu_time_total > 0]
  rows.sort(key=lambda r: -r["ms"])
  return {"wall_ms": 1e3 * statistics.median(walls), "ops": rows}


def build(seed: int):
  image_shape = bench.SHAPES["fmnist"][0]
  mean, std = images._STATS["fashion_mnist"]
  _, model, params, model_state, _, _ = bench.build_tsjax(
      "small_cnn", mean, std, "float32", jax.random.key(seed), "fmnist")
  rng = np.random.default_rng(seed)
  x = rng.random((bench.BATCH, *image_shape), dtype=np.float32)
  y = rng.integers(0, bench.NUM_CLASSES, bench.BATCH).astype(np.int32)
  tmodel = bench.torch_model("small_cnn", mean, std, image_shape)
  tmodel.load_state_dict(bench.torch_state_dict("small_cnn", params,
                                                model_state))
  return model, params, model_state, x, y, tmodel


def jax_pieces(model, params, model_state, y):
  variables = {"params": params, **model_state}

  def attack_iter(x):
    def loss(xa):
      return losses.cross_entropy(model.apply(variables, xa, train=False), y)
    vals, vjp = jax.vjp(loss, x)
    return vjp(jnp.ones_like(vals))[0]

  def train_fwd_bwd(x):
    def loss(p):
      logits, ms = forward(model, p, model_state, x, train=True)
      return jnp.mean(losses.cross_entropy(logits, y)), ms
    return jax.grad(loss, has_aux=True)(params)

  return {"attack_iter": attack_iter, "train_fwd_bwd": train_fwd_bwd}


def torch_pieces(tmodel, x, y):
  def attack_iter():
    tmodel.eval()
    d = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(tmodel(d), y, reduction="sum"),
                               d)[0]

  def train_fwd_bwd():
    tmodel.train()
    tmodel.zero_grad(set_to_none=True)
    F.cross_entropy(tmodel(x), y).backward()

  return {"attack_iter": attack_iter, "train_fwd_bwd": train_fwd_bwd}


def print_piece(name, res, top):
  print(f"\n== {name}: " + ", ".join(f"{k} {v['wall_ms']:.1f} ms"
                                     for k, v in res.items()))
  for side, r in res.items():
    total = sum(o["ms"] for o in r["ops"]) or 1.0
    print(f"  {side} (ops sum {total:.1f} ms):")
    for o in r["ops"][:top]:
      what = (f"x{o['calls']}" if side.startswith("torch") else
              f"{o['kind']} {o['shape']} <- {o['source']}")
      print(f"    {o['ms']:7.2f} ms {100 * o['ms'] / total:5.1f}%  "
            f"{o['op'][:28]:<28} {what}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--top", type=int, default=12)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  torch.set_num_threads(os.cpu_count())
  model, params, model_state, x, y, tmodel = build(args.seed)
  jfns = jax_pieces(model, params, model_state, jnp.asarray(y))
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(y.astype(np.int64))
  layouts = {"torch_nchw": (tmodel, xt)}
  cl = bench.torch_model("small_cnn", *images._STATS["fashion_mnist"],
                         bench.SHAPES["fmnist"][0])
  cl.load_state_dict(tmodel.state_dict())
  layouts["torch_channels_last"] = (
      cl.to(memory_format=torch.channels_last),
      xt.contiguous(memory_format=torch.channels_last))
  results = {}
  for piece, fn in jfns.items():
    res = {side: xla_profile(fn, (jnp.asarray(x),), args.repeats, opts)
           for side, opts in XLA_SETTINGS.items()}
    for layout, (net, xin) in layouts.items():
      res[layout] = torch_profile(torch_pieces(net, xin, yt)[piece],
                                  args.repeats)
    results[piece] = res
    print_piece(piece, res, args.top)
  out = pathlib.Path(args.out) if args.out else (
      HERE / "results" / f"image_op_profile_{jax.default_backend()}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "machine": machine_info(), "batch": bench.BATCH,
      "shape": list(bench.SHAPES["fmnist"][0]), "repeats": args.repeats,
      "torch_threads": torch.get_num_threads(), "pieces": results}, indent=1))
  print(f"\nsaved {out}")


if __name__ == "__main__":
  main()

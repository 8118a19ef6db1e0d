"""The unrolled threefry lowering (``tsjax.backend.cpu``) gives JAX's bits.

Checked three ways: the Random123 known answers of Threefry-2x32-20, an
independent NumPy implementation, and whole ``jax.random`` streams (draws,
splits, fold-ins, vmapped) against a fresh process that keeps JAX's own
rolled-loop lowering.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p

from tsjax.backend import cpu as xla_cpu

# Random123's kat_vectors, threefry2x32_20: (key, counter) -> output.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6b200159, 0x99ba4efe)),
    ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x1cb996fc, 0xbb002be7)),
    ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3),
     (0xc4923a9c, 0x483df7a0)),
]


def numpy_threefry(key, x1, x2):
  """Threefry-2x32, 20 rounds (Salmon et al. 2011), in NumPy uint64
  arithmetic masked to 32 bits."""
  m = np.uint64(0xFFFFFFFF)
  k = [np.uint64(key[0]), np.uint64(key[1])]
  k.append(k[0] ^ k[1] ^ np.uint64(0x1BD11BDA))
  a = (np.asarray(x1, np.uint64) + k[0]) & m
  b = (np.asarray(x2, np.uint64) + k[1]) & m
  rotations = [(13, 15, 26, 6), (17, 29, 16, 24)] * 3
  for i in range(5):
    for r in rotations[i]:
      a = (a + b) & m
      b = ((b << np.uint64(r)) | (b >> np.uint64(32 - r))) & m
      b = a ^ b
    a = (a + k[(i + 1) % 3]) & m
    b = (b + k[(i + 2) % 3] + np.uint64(i + 1)) & m
  return a.astype(np.uint32), b.astype(np.uint32)


def test_unrolled_threefry_known_answers_and_numpy():
  xla_cpu.use_unrolled_threefry()
  xla_cpu.use_unrolled_threefry()                  # idempotent
  hash_ = jax.jit(lambda *a: threefry2x32_p.bind(*a))
  for key, ctr, want in KNOWN_ANSWERS:
    args = [jnp.uint32(v) for v in (*key, *ctr)]
    got = tuple(int(v) for v in hash_(*args))
    assert got == want, (key, ctr, [hex(v) for v in got])
    assert tuple(int(v) for v in xla_cpu.threefry2x32(*args)) == want
  rng = np.random.default_rng(0)
  x1, x2 = (rng.integers(0, 2 ** 32, (3, 257), dtype=np.uint32)
            for _ in range(2))
  for key in [(0x9E3779B9, 0x7F4A7C15), (1, 2)]:
    got = hash_(np.uint32(key[0]), np.uint32(key[1]), x1, x2)
    want = numpy_threefry(key, x1, x2)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), w)
  # the lowered program draws without a loop
  text = jax.jit(lambda k: jax.random.normal(k, (8,))).lower(
      jax.random.key(0)).as_text()
  assert "stablehlo.while" not in text


STREAMS = """
import json, jax, jax.numpy as jnp, numpy as np
def draws():
  k = jax.random.key(7)
  ks = jax.random.split(k, 3)
  return {
      "split": jax.random.key_data(ks),
      "fold_in": jax.random.key_data(jax.random.fold_in(k, 12345)),
      "bits": jax.random.bits(ks[0], (5, 7)),
      "normal": jax.random.normal(ks[1], (4, 33)),
      "uniform": jax.random.uniform(ks[2], (100,)),
      "randint": jax.random.randint(k, (64,), 0, 10000),
      "vmapped": jax.vmap(lambda kk: jax.random.normal(kk, (16, 50)))(ks),
      "in_loop": jax.lax.fori_loop(0, 5, lambda i, x: x + jax.random.normal(
          jax.random.fold_in(k, i), (3,)), jnp.zeros(3)),
  }
def streams():
  return {n: np.asarray(v).view(np.uint32).tolist()
          for n, v in jax.jit(draws)().items()}
"""


def test_unrolled_threefry_same_random_streams_as_jax():
  """Jitted draws here (unrolled lowering) equal those of a fresh process
  with JAX's default CPU lowering, bit for bit."""
  ns = {}
  exec(STREAMS, ns)                               # noqa: S102 (test code)
  xla_cpu.use_unrolled_threefry()
  mine = ns["streams"]()
  proc = subprocess.run(
      [sys.executable, "-c", STREAMS + "print(json.dumps(streams()))"],
      capture_output=True, text=True, check=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu",   # same dtypes as here
           "JAX_ENABLE_X64": str(bool(jax.config.jax_enable_x64))})
  theirs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(theirs) == set(mine) and len(mine) == 8
  for name in theirs:
    assert mine[name] == theirs[name], name


def test_compile_presets_only_on_the_cpu_backend(monkeypatch):
  assert xla_cpu.compile_options("run_once") == {
      "xla_backend_optimization_level": 0}
  assert xla_cpu.compile_options("run_few") == {
      "xla_backend_optimization_level": 1}
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert xla_cpu.compile_options("run_once") == {}
  with pytest.raises(ValueError, match="run_twice"):
    xla_cpu.compile_options("run_twice")

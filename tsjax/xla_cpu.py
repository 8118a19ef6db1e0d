"""Threefry random bits on XLA:CPU as straight-line code.

JAX lowers its threefry2x32 hash (every ``jax.random`` draw, key split and
fold-in under the default PRNG) to a rolled ``while`` loop of 5 iterations
on the CPU backend (less code to compile) and to the unrolled 20 rounds on
other backends. Inside a training loop of tiny operations, as in the
teacher-student study, a rolled draw costs dozens of executed XLA thunks
(loop control and carry copies around each iteration's kernels) where the
unrolled one fuses into one elementwise kernel. ``use_unrolled_threefry()``
registers the unrolled lowering for the CPU platform too. The bits are those
of the rolled loop (the same hash, round for round; ``tests/test_xla_cpu.py``
checks the Random123 answers, a NumPy implementation and whole random
streams against JAX's own lowering in a fresh process), so results do not
change.

Measured on a 2-core Intel Xeon (3 seeds vmapped, 5000 steps, float32;
``benchmarks/RESULTS.md``): the PGD-AT regime's training program runs in
0.89 s instead of 1.10 s and compiles in 1.1 s instead of 1.7 s; the
off-subspace one runs in 0.37 s instead of 0.58 s; the study protocol end
to end 14% faster.

The experiments (``experiments.common.launch``) turn it on; library code
and tests run either way with the same results.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir

# Rotation constants of Threefry-2x32 (Salmon et al. 2011), alternating by
# group of four rounds, and the key-schedule parity constant.
ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
KEY_PARITY = 0x1BD11BDA


def threefry2x32(key1, key2, x1, x2):
  """Threefry-2x32 with 20 rounds, unrolled: ``(key1, key2)`` the key,
  ``(x1, x2)`` the counter words (uint32 arrays, broadcast together);
  returns the two output words."""
  shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in (key1, key2, x1, x2)))
  key1, key2, x1, x2 = (jnp.broadcast_to(a, shape)
                        for a in (key1, key2, x1, x2))
  ks = (key1, key2, key1 ^ key2 ^ np.uint32(KEY_PARITY))
  x = [x1 + ks[0], x2 + ks[1]]
  for group in range(5):
    for r in ROTATIONS[group % 2]:
      x[0] = x[0] + x[1]
      x[1] = (x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r))
      x[1] = x[0] ^ x[1]
    x[0] = x[0] + ks[(group + 1) % 3]
    x[1] = x[1] + ks[(group + 2) % 3] + np.uint32(group + 1)
  return tuple(x)


_RULE = mlir.lower_fun(threefry2x32, multiple_results=True)
_registered = False


def use_unrolled_threefry() -> None:
  """Lower threefry2x32 on the CPU backend to the unrolled rounds (for every
  program traced from now on in this process; idempotent)."""
  global _registered
  if not _registered:
    mlir.register_lowering(threefry2x32_p, _RULE, platform="cpu",
                           inline=False)
    _registered = True

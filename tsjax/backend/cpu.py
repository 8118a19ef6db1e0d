"""The CPU backend's settings: the one place tsjax knows it runs on XLA:CPU.

Everything here is inactive on GPUs and TPUs; ``experiments.common`` applies
it when an experiment starts (``prepare_backend``), the library's modules do
not use it, and results do not depend on it beyond the last bits where noted.

* **Threefry random bits as straight-line code.** JAX lowers its threefry2x32
  hash (every ``jax.random`` draw, key split and fold-in) to a rolled
  ``while`` loop of 5 iterations on the CPU backend and to the unrolled 20
  rounds elsewhere. Inside a training loop of tiny operations, as in the
  teacher-student study, a rolled draw costs dozens of executed XLA thunks
  where the unrolled one fuses into one kernel. ``use_unrolled_threefry()``
  registers the unrolled lowering for the CPU platform too; the bits are
  those of the rolled loop, round for round (``tests/test_backend_cpu.py``
  checks the Random123 answers, a NumPy implementation and whole streams).
* **LLVM optimisation levels** for programs that run once (``RUN_ONCE``: a
  study's set-up; optimising costs seconds of compiling and buys
  milliseconds) or a few times on large batches (``RUN_FEW``: its
  evaluation); ``compile_options(name)`` gives them on the CPU backend and
  nothing elsewhere.
* **XLA:CPU flags of the image experiments** (``IMAGE_XLA_FLAGS``):
  convolutions by XLA's own kernels instead of YNNPACK's (2-4x faster on the
  small CNN's 28x28 layers); forward values bitwise the same, gradients
  within ~1e-7 relative in float32. Ignored by other backends.

Measurements: ``docs/performance.md`` and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import jax
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


IMAGE_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)

# XLA compile options (as ``jax.jit(compiler_options=...)`` takes them). Float
# results may differ from the fully optimised program's in the last bits.
RUN_ONCE = {"xla_backend_optimization_level": 0}
RUN_FEW = {"xla_backend_optimization_level": 1}
_COMPILE = {"run_once": RUN_ONCE, "run_few": RUN_FEW}


def compile_options(name: str) -> dict:
  """``RUN_ONCE`` / ``RUN_FEW`` (``name`` "run_once" / "run_few") on the CPU
  backend; ``{}`` on the others."""
  if name not in _COMPILE:
    raise ValueError(f"unknown compile preset {name!r}; expected one of "
                     f"{sorted(_COMPILE)}")
  return dict(_COMPILE[name]) if jax.default_backend() == "cpu" else {}

"""ReLU MLP for teachers and students (Flax linen).

``MLP(widths=(m,), outputs=c)`` is the two-layer network of Tian / Yang et al.;
more widths give the multi-layer variant. ``apply(..., return_hidden=True)``
returns ``(outputs, hiddens)`` where ``hiddens`` is a tuple with every hidden
layer's post-ReLU activations, which the specialization metric consumes. The
parameter tree is ``{"hidden_0": {"kernel", "bias"}, ..., "out": {...}}`` with
kernels stored ``[fan_in, fan_out]``, the same layout the synthetic teacher
builder produces, so a teacher is just an MLP with hand-made parameters.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  widths: Sequence[int]
  outputs: int
  init_std: float = 0.005
  zero_bias: bool = True
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, return_hidden: bool = False):
    kinit = nn.initializers.normal(self.init_std)
    binit = (nn.initializers.zeros if self.zero_bias
             else nn.initializers.normal(self.init_std))
    hiddens = []
    h = x
    for i, w in enumerate(self.widths):
      h = nn.relu(nn.Dense(w, kernel_init=kinit, bias_init=binit,
                           param_dtype=self.param_dtype, dtype=self.param_dtype,
                           name=f"hidden_{i}")(h))
      hiddens.append(h)
    out = nn.Dense(self.outputs, kernel_init=kinit, bias_init=binit,
                   param_dtype=self.param_dtype, dtype=self.param_dtype,
                   name="out")(h)
    if return_hidden:
      return out, tuple(hiddens)
    return out


def student_widths(teacher_widths: Sequence[int], multi: int) -> tuple[int, ...]:
  """Over-realised student: every hidden layer ``multi`` times the teacher's."""
  if int(multi) != multi or multi < 1:
    raise ValueError(f"student multiple must be a positive integer, got {multi!r}")
  return tuple(int(multi) * int(w) for w in teacher_widths)


def check_student_widths(teacher_widths: Sequence[int],
                         widths: Sequence[int]) -> None:
  """Raises ValueError unless every student width is a multiple of the teacher's."""
  if len(teacher_widths) != len(widths):
    raise ValueError(f"student has {len(widths)} hidden layers, teacher "
                     f"{len(teacher_widths)}; they must match")
  for i, (t, s) in enumerate(zip(teacher_widths, widths)):
    if isinstance(s, bool) or not isinstance(s, int) or s < t or s % t:
      raise ValueError(f"student width {s!r} of hidden layer {i} must be a "
                       f"positive integer multiple of the teacher width {t}")


def init_mlp(module: MLP, key: jax.Array, d: int, dtype=jnp.float32):
  return module.init(key, jnp.zeros((1, d), dtype))

"""ReLU MLP for teachers and students (Flax linen).

``MLP(widths=(m,), outputs=c)`` is the two-layer network of Tian / Yang et al.;
more widths give the multi-layer variant. ``apply(..., return_hidden=True)``
returns ``(outputs, hiddens)`` where ``hiddens`` is a tuple with every hidden
layer's post-ReLU activations, which the specialization metric consumes. The
parameter tree is ``{"hidden_0": {"kernel", "bias"}, ..., "out": {...}}`` with
kernels stored ``[fan_in, fan_out]``, the same layout the synthetic teacher
builder produces, so a teacher is just an MLP with hand-made parameters.

``dense_pair`` and ``mlp_tail`` evaluate two MLPs on one input with their
first layers as one matrix product (the teacher–student study's networks,
``tsjax.methods.teacher_student.Networks.outputs``).
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


@jax.custom_vjp
def dense_pair(x, kernel, bias, fixed_kernel, fixed_bias):
  """Two dense layers on one input ``x [..., d]`` as one matrix product:
  ``(x @ kernel + bias, x @ fixed_kernel + fixed_bias)``.

  The second output is held fixed under differentiation (no cotangent flows
  from it, as under ``lax.stop_gradient``: ``fixed_*`` get zero gradients);
  the first is differentiated as usual with respect to ``x``, ``kernel`` and
  ``bias``. Why: for the study's small networks XLA:CPU's cost is per
  operation, so one [.., d] x [d, m + n] product runs faster than two, and
  the custom gradient leaves the fixed half out of the backward products.
  """
  return _dense_pair(x, kernel, bias, fixed_kernel, fixed_bias)


def _dense_pair(x, kernel, bias, fixed_kernel, fixed_bias):
  m = kernel.shape[-1]
  out = (x @ jnp.concatenate([kernel, fixed_kernel], -1)
         + jnp.concatenate([bias, fixed_bias], -1))
  return out[..., :m], out[..., m:]


def _dense_pair_fwd(x, kernel, bias, fixed_kernel, fixed_bias):
  return (_dense_pair(x, kernel, bias, fixed_kernel, fixed_bias),
          (x, kernel, fixed_kernel, fixed_bias))


def _dense_pair_bwd(res, cotangents):
  x, kernel, fixed_kernel, fixed_bias = res
  g = cotangents[0]
  return (g @ kernel.T, jnp.einsum("...i,...j->ij", x, g),
          jnp.sum(g.reshape(-1, g.shape[-1]), axis=0),
          jnp.zeros_like(fixed_kernel), jnp.zeros_like(fixed_bias))


dense_pair.defvjp(_dense_pair_fwd, _dense_pair_bwd)


def mlp_tail(params, h, depth: int):
  """The rest of an ``MLP`` after its first layer: ``h`` = the first hidden
  layer's pre-activation, ``params`` its parameter tree, ``depth`` its number
  of hidden layers; the same products as ``MLP.__call__``."""
  h = nn.relu(h)
  for i in range(1, depth):
    layer = params[f"hidden_{i}"]
    h = nn.relu(h @ layer["kernel"] + layer["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


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

"""Student specialization between two image models of ``tsjax.models``.

The per-neuron teacher–student correlation of the synthetic study
(``tsjax.metrics.specialization``) for image classifiers: every hidden layer
the models expose with ``apply(..., return_hidden=True)`` (post-activation
conv maps ``[N, H, W, C]`` and the pooled / dense penultimate features
``[N, D]``; see each model's docstring for which layers those are), matched
by index between teacher and student. The student may be wider (an
over-realised student, width a multiple of the teacher's): for every teacher
unit the summary takes its best-correlated student unit
(``specialization_summary``).

Units and samples:

* dense layers: one unit per feature, one sample per image;
* conv layers: one unit per channel; ``conv_samples`` says what a sample is.

  - ``"positions"`` (default): every (image, y, x) is a sample, so the
    correlation compares the two channels' *local* responses position by
    position. A conv channel is one feature detector applied at every
    location; its response at a location is the analogue of a dense unit's
    response to an input, and two channels match only if they fire at the
    same places of the same images. It also gives ``H * W`` times more
    samples per image (tighter estimates). It needs the two layers to have
    the same spatial size (true for a teacher and a wider student of the
    same architecture, the setting of Tian and Yang et al.).
  - ``"pooled"``: each channel is global-average-pooled per image (one
    sample per image). Works across architectures with different
    resolutions, but two different detectors whose image-level averages
    co-vary (both track the object's size or ink) look alike, so pooled
    correlations overstate specialization.

  In both modes the zeros of post-ReLU maps count: two channels silent on
  the same background are correlated through it. Compare against a
  reference (an untrained or independently trained student) rather than
  reading the absolute value alone.

Everything is streamed over batches of images (``streamed_correlations``:
running means and centred second moments, each image counted once) inside
one jitted ``lax.scan``, and vmapped over several students at once: the
students' variables are stacked on a leading axis (``stack_variables``), the
teacher's forward pass is computed once per batch and shared. Models run in
eval mode (``train=False``: batch-norm running statistics).

  stats = image_correlations(teacher, t_vars, student, stack_variables(vs),
                             x_test, batch_size=256)       # per layer
  layers = image_specialization(teacher, t_vars, student, stacked, x_test)
  layers[0]["mean_best"]    # [S] one value per student
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from tsjax.metrics.specialization import (DEFAULT_THRESHOLDS, CorrStats,
                                          active_nodes, corr_finalize,
                                          specialization_summary,
                                          streamed_correlations)

CONV_SAMPLES = ("positions", "pooled")


def stack_variables(variables: Sequence[Any]) -> Any:
  """Stacks several networks' variable trees (same structure) on a new
  leading axis, the layout ``image_correlations`` vmaps over."""
  return jax.tree.map(lambda *a: jnp.stack(a), *variables)


def hiddens(model, variables, x) -> tuple:
  """The hidden layers ``model`` exposes at ``x`` (eval mode)."""
  return tuple(model.apply(variables, x, train=False, return_hidden=True)[1])


def layer_samples(h: jax.Array, conv_samples: str = "positions") -> jax.Array:
  """A layer's activations as ``[samples, units]``: dense ``[B, D]`` as is;
  a conv map ``[B, H, W, C]`` as ``[B * H * W, C]`` (example-major,
  ``"positions"``) or its global average ``[B, C]`` (``"pooled"``)."""
  if conv_samples not in CONV_SAMPLES:
    raise ValueError(f"conv_samples must be one of {CONV_SAMPLES}, got "
                     f"{conv_samples!r}")
  if h.ndim == 2:
    return h
  if conv_samples == "pooled":
    return jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
  return h.reshape(-1, h.shape[-1])


def _as_float(x, dtype):
  return x.astype(dtype) / 255.0 if x.dtype == jnp.uint8 else x


def layer_pairs(teacher_shapes: Sequence[tuple], student_shapes: Sequence[tuple],
                conv_samples: str = "positions",
                layers: Sequence[int | tuple[int, int]] | None = None
                ) -> tuple[tuple[int, int], ...]:
  """The (teacher layer, student layer) index pairs to compare, checked.

  ``layers``: None = every layer, matched by index (the two models must
  expose the same number); a list of indices (the same index in both); or
  a list of ``(teacher_index, student_index)`` pairs. Each pair must be of
  one kind (both conv maps or both dense); with ``"positions"`` the conv
  maps must have the same spatial size. Errors name the layer and the fix.
  """
  nt, ns = len(teacher_shapes), len(student_shapes)
  if layers is None:
    if nt != ns:
      raise ValueError(f"the teacher exposes {nt} hidden layers and the "
                       f"student {ns}; pass layers=[(teacher_index, "
                       f"student_index), ...] to say which to compare")
    layers = range(nt)
  pairs = []
  for entry in layers:
    i, j = (entry, entry) if isinstance(entry, int) else tuple(entry)
    if not (-nt <= i < nt and -ns <= j < ns):
      raise ValueError(f"layer pair ({i}, {j}) out of range: the teacher has "
                       f"{nt} hidden layers, the student {ns}")
    i, j = i % nt, j % ns
    ts, ss = tuple(teacher_shapes[i]), tuple(student_shapes[j])
    if len(ts) != len(ss):
      raise ValueError(f"layer pair ({i}, {j}): teacher {ts} and student "
                       f"{ss} are not of one kind (conv map vs dense)")
    if (len(ts) > 2 and conv_samples == "positions"
        and ts[1:-1] != ss[1:-1]):
      raise ValueError(f"layer pair ({i}, {j}): spatial sizes {ts[1:-1]} "
                       f"(teacher) and {ss[1:-1]} (student) differ; positions "
                       f"as samples need equal sizes; use conv_samples="
                       f"'pooled'")
    pairs.append((i, j))
  return tuple(pairs)


def _correlations_impl(teacher_variables, student_variables, images, *,
                       teacher, student, pairs, batch_size, conv_samples,
                       dtype, per_student_images):
  def one(s_vars, xs):
    def acts(xb):
      xb = _as_float(xb, dtype)
      ht = hiddens(teacher, teacher_variables, xb)
      hs = hiddens(student, s_vars, xb)
      return ([layer_samples(ht[i], conv_samples) for i, _ in pairs],
              [layer_samples(hs[j], conv_samples) for _, j in pairs])
    return streamed_correlations(acts, xs, batch_size, dtype=dtype)

  return jax.vmap(one, in_axes=(0, 0 if per_student_images else None))(
      student_variables, images)


_STATIC = ("teacher", "student", "pairs", "batch_size", "conv_samples",
           "dtype", "per_student_images")
_correlations_cached = jax.jit(_correlations_impl, static_argnames=_STATIC)


def _correlations(teacher_variables, student_variables, images, **static):
  """The jitted streamed statistics; compiled once per models / shapes when
  the models hash (tuples as fields), else jitted afresh for this call
  (a model built with list fields, e.g. from a command-line override)."""
  try:
    hash((static["teacher"], static["student"]))
  except TypeError:
    return jax.jit(functools.partial(_correlations_impl, **static))(
        teacher_variables, student_variables, images)
  return _correlations_cached(teacher_variables, student_variables, images,
                              **static)


def _shapes(model, variables, x):
  out = jax.eval_shape(lambda v, xx: hiddens(model, v, xx), variables, x)
  return [tuple(o.shape) for o in out]


def _plan(teacher, teacher_variables, student, student_variables, images,
          batch_size, conv_samples, layers, per_student_images):
  """Checks the arguments; ``(pairs, teacher layer shapes, batch size)``."""
  if conv_samples not in CONV_SAMPLES:
    raise ValueError(f"conv_samples must be one of {CONV_SAMPLES}, got "
                     f"{conv_samples!r}")
  n = images.shape[1 if per_student_images else 0]
  if n < 1:
    raise ValueError("image_correlations needs at least one image")
  s = {int(l.shape[0]) for l in jax.tree.leaves(student_variables)}
  if len(s) != 1:
    raise ValueError(f"student_variables must be stacked on one leading "
                     f"axis (stack_variables); leading sizes {sorted(s)}")
  if per_student_images and images.shape[0] != s.pop():
    raise ValueError(f"per_student_images needs images [S, N, ...] with S = "
                     f"the number of students; got {images.shape}")
  bs = int(min(batch_size, n))
  one_x = jax.ShapeDtypeStruct((bs,) + images.shape[2 if per_student_images
                                                     else 1:], jnp.float32)
  one_s = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                       student_variables)
  t_shapes = _shapes(teacher, teacher_variables, one_x)
  pairs = layer_pairs(t_shapes, _shapes(student, one_s, one_x), conv_samples,
                      layers)
  return pairs, t_shapes, bs


def image_correlations(teacher, teacher_variables, student, student_variables,
                       images, *, batch_size: int = 256,
                       conv_samples: str = "positions",
                       layers: Sequence[int | tuple[int, int]] | None = None,
                       dtype=jnp.float32, per_student_images: bool = False
                       ) -> list[CorrStats]:
  """Streamed teacher–student correlation statistics, one ``CorrStats``
  per compared layer, every leaf with a leading student axis ``[S, ...]``.

  Args:
    teacher, student: Flax image models (``tsjax.models``) that take
      ``return_hidden=True``.
    teacher_variables: the teacher's Flax variables (``{"params": ...,
      "batch_stats": ...}``).
    student_variables: S students' variables stacked on a leading axis
      (``stack_variables``); S = 1 for one student.
    images: ``[N, H, W, C]`` uint8 (0..255) or floats in [0, 1] (any float:
      off-subspace or adversarial images may leave the box); with
      ``per_student_images`` ``[S, N, H, W, C]`` (e.g. each student's own
      adversarial examples), the teacher then runs on each set.
    batch_size: images per streamed batch (memory: ``S x batch_size x H x W
      x C_student`` activations with ``"positions"``).
    conv_samples: ``"positions"`` (default) or ``"pooled"``; see the module
      docstring.
    layers: which layers to compare (``layer_pairs``); None = all, by index.
    dtype: accumulation dtype of the statistics.
  """
  images = jnp.asarray(images)
  pairs, _, bs = _plan(teacher, teacher_variables, student, student_variables,
                       images, batch_size, conv_samples, layers,
                       per_student_images)
  return _correlations(teacher_variables, student_variables, images,
                       teacher=teacher, student=student, pairs=pairs,
                       batch_size=bs, conv_samples=conv_samples,
                       dtype=jnp.dtype(dtype),
                       per_student_images=bool(per_student_images))


def summarize(stats: CorrStats, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
              min_var: float = 1e-12, return_corr: bool = False) -> dict:
  """``specialization_summary`` of one layer's stacked statistics, vmapped
  over students (every entry with a leading ``[S]`` axis); teacher units
  whose activation never varies (dead channels) are left out of the means
  and counts (``active_nodes``)."""
  def one(st):
    C = corr_finalize(st)
    out = specialization_summary(C, tuple(thresholds),
                                 active_nodes(st, min_var))
    return {**out, "corr": C} if return_corr else out
  return jax.vmap(one)(stats)


def image_specialization(teacher, teacher_variables, student,
                         student_variables, images, *, batch_size: int = 256,
                         conv_samples: str = "positions",
                         layers: Sequence[int | tuple[int, int]] | None = None,
                         dtype=jnp.float32, per_student_images: bool = False,
                         thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                         min_var: float = 1e-12, return_corr: bool = False
                         ) -> list[dict]:
  """Per-layer specialization summaries of S stacked students against the
  teacher (the first arguments as ``image_correlations``; ``thresholds``,
  ``min_var`` as ``summarize``).

  Returns one dict per compared layer: ``teacher_layer``, ``student_layer``,
  ``kind`` ("conv" / "dense"), ``teacher_units``, ``student_units``,
  ``samples`` (samples per student: images, or images x positions for conv
  layers with "positions"), and ``specialization_summary``'s entries with a
  leading student axis: ``mean_best [S]``, ``best_corr [S, m]``,
  ``best_index [S, m]``, ``count_above [S, T]``, ``success [S, T, m]``,
  ``num_active [S]`` (plus ``corr [S, m, n]`` with ``return_corr``).
  """
  images = jnp.asarray(images)
  pairs, t_shapes, bs = _plan(teacher, teacher_variables, student,
                              student_variables, images, batch_size,
                              conv_samples, layers, per_student_images)
  stats = _correlations(teacher_variables, student_variables, images,
                        teacher=teacher, student=student, pairs=pairs,
                        batch_size=bs, conv_samples=conv_samples,
                        dtype=jnp.dtype(dtype),
                        per_student_images=bool(per_student_images))
  out = []
  for (i, j), st in zip(pairs, stats):
    m, n = st.cross.shape[-2:]
    summary = summarize(st, thresholds, min_var, return_corr)
    out.append({"teacher_layer": i, "student_layer": j,
                "kind": "conv" if len(t_shapes[i]) > 2 else "dense",
                "teacher_units": int(m), "student_units": int(n),
                "samples": int(st.count[0]), **summary})
  return out

"""The method registry: one ``Method`` record per training method.

A method module (``tsjax/methods/NAME.py``) defines a frozen ``Options``
dataclass (defaults = the paper's, ``__post_init__`` checks ranges with
``tsjax.config_checks.require``) and one factory with the signature every
method shares::

    loss_fn = make_loss(model, *, teacher, attack, options)
    loss, (metrics, new_model_state) = loss_fn(params, model_state, batch, key, ctx)

and registers ``METHOD = Method(...)``. ``tsjax.methods.REGISTRY`` maps
names to records; experiments look a method up and never branch on its name.
Adding a method is one module plus one ``register`` (and a config entry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from tsjax import config_checks as cc


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """For methods without options."""


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method as the experiments see it.

  * ``make_loss(model, *, teacher, attack, options) -> loss_fn``: ``teacher``
    is the frozen teacher module (``None`` unless ``needs_teacher``; its
    variables travel in ``ctx``, see ``tsjax.methods.distill``); ``attack``
    an ``AttackSpec`` (``None`` unless ``uses_attack``).
  * ``init(init_one, key) -> (params, model_state)``: the trained tree from
    ``init_one(key) -> (params, model_state)`` of one network (default: one
    network); ``view(params, model_state)``: the evaluated network's
    variables out of that tree (PeerAiD trains student and peer together).
  * ``test_attacks(eval_attack, train_attack, options) -> ({name:
    (objective, AttackSpec)}, n)``: extra attacks on the first ``n`` test
    examples (CCAT's confidence attacks);
    ``report(per_example, options) -> dict``: extra result fields from the
    per-example test arrays (CCAT's confidence-thresholded error).
  * ``init_ctx(train_images, options) -> dict``: entries added to the
    step's ``ctx``, computed once before training from the training split's
    images (uint8 ``[N, H, W, C]``); the image off-subspace method's PCA
    basis.
  * ``reference``: the code whose executed behaviour the defaults follow.
  """
  name: str
  make_loss: Callable
  options: type = NoOptions
  needs_teacher: bool = False
  uses_attack: bool = True
  init: Callable | None = None
  view: Callable | None = None
  test_attacks: Callable | None = None
  report: Callable | None = None
  init_ctx: Callable | None = None
  reference: str = ""

  def build_options(self, values: Any = None, prefix: str = "method.options"):
    """``options(**values)``, errors naming ``prefix.FIELD``."""
    return cc.build(self.options, values, prefix)

  def default_options(self) -> dict:
    return dataclasses.asdict(self.options())


REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
  """Adds ``method`` to ``REGISTRY`` (``replace=True`` to redefine a name)."""
  if not replace and method.name in REGISTRY:
    raise ValueError(f"method {method.name!r} is registered already")
  REGISTRY[method.name] = method
  return method


def get(name: str, path: str = "method.name") -> Method:
  """The registered method ``name``; ConfigError naming ``path`` if none."""
  if name not in REGISTRY:
    raise cc.ConfigError(f"config field '{path}' must be one of "
                         f"{sorted(REGISTRY)}, got {name!r}")
  return REGISTRY[name]

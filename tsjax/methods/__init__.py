"""Training methods: one module per method, each a pure loss factory with one
signature, ``make_loss(model, *, teacher, attack, options) -> loss_fn`` and
``loss_fn(params, model_state, batch, key, ctx)``, a frozen ``Options``
dataclass and a ``METHOD`` record in ``REGISTRY`` (see
``tsjax.methods.registry``).

Image classification from scratch: ``standard``, ``pgd_at``, ``trades``,
``ccat``, ``offsubspace`` (half of each batch moved off the training images'
PCA subspace; ``offsubspace.with_offsubspace`` does the same before any
method's loss). Distillation (frozen teacher in ``ctx``, see ``distill``):
``kd``, ``ard``, ``rslad``, ``iad``, ``funmatch``, ``advfunmatch``; and
``peeraid`` (student and peer trained jointly, no fixed teacher).

Teacher–student regimes of the synthetic study (``make_ts_loss`` in
``standard``, ``pgd_at``, ``ccat``, ``offsubspace``; ``robust_features`` is
``standard`` on a re-synthesised data set, see ``tsjax.data.robust_features``).
"""

from tsjax.methods import (advfunmatch, ard, ccat, funmatch, iad, kd,
                           offsubspace, peeraid, pgd_at, rslad, standard,
                           trades)
from tsjax.methods.registry import (REGISTRY, Method, NoOptions, get,  # noqa: F401
                                   register)

for _module in (standard, pgd_at, trades, ccat, offsubspace, kd, ard, rslad,
                iad, funmatch, advfunmatch, peeraid):
  register(_module.METHOD, replace=True)
del _module

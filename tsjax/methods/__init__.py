"""Training methods: one module per method, each a pure loss factory
``make_loss(...) -> loss_fn(params, model_state, batch, key, ctx)``.

Teacher–student regimes (synthetic study): ``standard``, ``pgd_at``, ``ccat``,
``offsubspace`` (and ``robust_features``: ``standard`` on a re-synthesised data
set, see ``tsjax.data.robust_features``).

Image classification from scratch: ``standard``, ``pgd_at``, ``trades``,
``ccat``. Distillation (frozen teacher in ``ctx``, see ``distill``): ``kd``,
``ard``, ``rslad``, ``iad``, ``funmatch``, ``advfunmatch``; and ``peeraid``
(student and peer trained jointly, no fixed teacher).
"""

"""Training methods: one module per method, each a pure loss factory.

Teacher–student regimes (synthetic study): ``standard``, ``pgd_at``, ``ccat``,
``offsubspace`` (and ``robust_features``: ``standard`` on a re-synthesised data
set, see ``tsjax.data.robust_features``).
"""

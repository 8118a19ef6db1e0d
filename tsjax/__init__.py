"""tsjax: teacher–student adversarial robustness research in JAX/Flax.

The library holds pure functions only (models, data generators, attacks,
losses, metrics, training-method losses, train/sweep/checkpoint utilities).
Experiments live in ``experiments/`` and their configs in ``configs/``.
"""

__version__ = "0.2.0"

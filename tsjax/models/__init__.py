"""Flax linen models and a name -> constructor registry."""

from tsjax.models.mlp import MLP, student_widths, check_student_widths

REGISTRY = {"mlp": MLP}


def get_model(name: str, **kwargs):
  """Builds a model by registry name; unknown names raise ValueError."""
  if name not in REGISTRY:
    raise ValueError(f"unknown model {name!r}; known models: {sorted(REGISTRY)}")
  return REGISTRY[name](**kwargs)

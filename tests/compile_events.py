"""``compile_events()``: the JAX compile events (trace, lowering, backend
compile) that happen inside a ``with`` block, from JAX's own monitoring
hooks. The config-error tests use it to show that bad input fails *before*
anything compiles. Test helper, not part of tsjax."""

import contextlib

import jax

# jax/_src/dispatch.py: JAXPR_TRACE_EVENT, JAXPR_TO_MLIR_MODULE_EVENT and
# BACKEND_COMPILE_EVENT all live under this prefix.
COMPILE_PREFIX = "/jax/core/compile"
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compile_events():
  """Yields a list that collects the names of the compile events."""
  events = []

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event.startswith(COMPILE_PREFIX):
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)

"""Backend-specific settings (``tsjax.backend.cpu``), applied by the
experiments at start-up and inactive on other backends."""

"""Data: synthetic low-rank teacher–student problems (``synthetic``), robust-
feature re-synthesis (``robust_features``), real image data sets and batch
iterators (``images``) and on-device augmentation (``augment``)."""

"""Data: synthetic low-rank teacher–student problems (``synthetic``), robust-
feature re-synthesis (``robust_features``), real image data sets and batch
iterators (``images``), on-device augmentation (``augment``) and the PCA data
subspace of an image data set with off-subspace noise (``subspace``)."""

"""Metrics: student specialization and robustness summaries."""

from tsjax.metrics.specialization import (DEFAULT_THRESHOLDS, CorrStats,
                                          active_nodes, corr_finalize,
                                          corr_init, corr_update, perp_drift,
                                          specialization_summary,
                                          streamed_correlations)

"""Data: synthetic low-rank teacher–student problems (and, later, images)."""

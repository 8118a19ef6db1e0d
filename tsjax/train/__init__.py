"""Training: TrainState, train steps, fori-loop runs, seed sweeps, checkpoints."""

from tsjax.train.checkpoint import CheckpointStore
from tsjax.train.loop import sample_batch, train_steps
from tsjax.train.state import TrainState, make_train_step
from tsjax.train.sweep import seed_keys, seed_sweep

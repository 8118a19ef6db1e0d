"""Evaluate any tsjax image-classifier checkpoint.

  python -m experiments.evaluate --config configs/evaluate.py \
      --config.checkpoint=runs/fmnist_table/pgd_at --workdir runs/eval_pgdat

``checkpoint`` is the work dir of ``experiments.train`` (it holds config.json,
best/ and checkpoints/). Reports clean, FGSM, PGD-20, CW-inf (PGD on the CW
margin) and AutoAttack accuracy on the test split, every example counted once.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.checkpoint = ml_collections.FieldReference(None, field_type=str)
  c.which = "best"            # "best" (validation-selected) or "last"
  c.seed = 0
  c.subset = 0                # > 0: first N test examples only
  c.batch_size = 500
  c.norm = "linf"
  c.eps = -1.0                # < 0: the eps of the training config's eval
  c.pgd_steps = 20
  c.cw_steps = 30
  c.autoattack = True
  c.aa_version = "standard"   # "standard", "plus" or "rand"
  c.aa_subset = 0             # > 0: AutoAttack on the first N examples only
  if arg == "smoke":
    c.subset = 64
    c.batch_size = 32
    c.pgd_steps = 3
    c.cw_steps = 3
    c.aa_version = "standard"
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/evaluate.py; known: smoke")
  c.distributed = ml_collections.ConfigDict()   # multi-host (jax.distributed)
  c.distributed.auto = False
  c.distributed.coordinator_address = ml_collections.FieldReference(
      None, field_type=str)
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  return c

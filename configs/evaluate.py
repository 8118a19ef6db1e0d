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
  # The first N test examples only (None: all of them).
  c.subset = ml_collections.FieldReference(None, field_type=int)
  c.batch_size = 500
  c.norm = "linf"
  # None: the eps of the training config's eval section; a fraction such as
  # 8/255 parses on the command line.
  c.eps = ml_collections.FieldReference(None, field_type=float)
  c.pgd_steps = 20
  c.cw_steps = 30
  c.autoattack = True
  c.aa_version = "standard"   # "standard", "plus" or "rand"
  # AutoAttack on the first N examples only (None: every evaluated example).
  c.aa_subset = ml_collections.FieldReference(None, field_type=int)
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

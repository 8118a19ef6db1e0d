"""Attacks as pure functions of a per-example loss of the input."""

from tsjax.attacks.norms import (NORMS, RESTRICTIONS, ascent_direction,
                                 feasible, per_example_norm, project_ball,
                                 random_in_ball, restrict_subspace)
from tsjax.attacks.pgd import fgsm, pgd
from tsjax.attacks.apgd import apgd, apgd_checkpoints, apgd_targeted
from tsjax.attacks.spec import AttackSpec, backtracking_pgd

r"""Adversarial distillation: the distillation variants of
``configs/adv_train.py`` (the same file serves every registered method; this
one only changes the default variant and the order of the variant string).

  python -m experiments.distill --config configs/distill.py:rslad,fashion_mnist \
      --config.teacher.checkpoint=runs/fmnist_teacher
  python -m experiments.distill --config configs/distill.py:peeraid,fashion_mnist,smoke
  python -m experiments.distill --config configs/distill.py:peeraid,cifar10 \
      --config.data.data_dir=~/tensorflow_datasets

Methods: kd | ard | rslad | iad | funmatch | peeraid | advfunmatch (any
method of ``tsjax.methods.REGISTRY``); data sets and recipes as in
``configs/adv_train.py``.
"""

import ml_collections

from tsjax.configs import adv_train


def get_config(arg: str = "rslad,fashion_mnist") -> ml_collections.ConfigDict:
  return adv_train.get_config(arg, default_method="rslad")

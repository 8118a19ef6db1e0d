r"""Adversarial distillation: ``experiments.train`` with the distillation
variants of ``configs/distill.py`` (KD, ARD, RSLAD, IAD, FunMatch,
AdvFunMatch from a frozen teacher; PeerAiD with a jointly trained peer).

  python -m experiments.distill --config configs/distill.py:rslad,fashion_mnist \
      --config.teacher.checkpoint=runs/fmnist_teacher --workdir runs/rslad
  python -m experiments.distill --config configs/distill.py:peeraid,fashion_mnist,smoke

Every method runs through the one training run of ``experiments.train``
(validation model selection, EMA / SWA with batch-norm re-estimation, Orbax
resume, JSONL + TensorBoard); the method's loss, its teacher and its trained
tree come from ``tsjax.methods.REGISTRY``. ``experiments.evaluate
--config.checkpoint=WORKDIR`` evaluates the student.
"""

from . import common
from .train import run  # noqa: F401  (the same run)

if __name__ == "__main__":
  common.launch("distill", run, "configs/distill.py",
                "Experiment config (ml_collections file with "
                "':method,dataset[,smoke]').",
                default_variant="rslad,fashion_mnist",
                xla_flags=common.IMAGE_XLA_FLAGS)

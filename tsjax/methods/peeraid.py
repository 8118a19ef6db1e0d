"""PeerAiD (Jung et al., CVPR 2024): adversarial distillation from a peer
tutor trained jointly with the student on the student's adversarial examples,
spec §2.

``params = {"student": ..., "peer": ...}`` (likewise ``model_state``): one
jitted step updates both networks from ``L = L_peer + L_student`` (one
optimizer over the joint tree, as the reference steps both SGD optimizers
with the same settings after one backward pass). No pretrained teacher.

Inner maximisation (the student's adversarial example, guided by the peer):
``x* = argmax_{||x' - x||_inf <= eps} KL(softmax P(x) || softmax S(x'))``,
``P(x)`` once per batch with the peer in eval mode and no gradient, the
student in eval mode; start ``x + 0.001 N(0, I)``; the gradient of the KL
summed over batch and classes.

Outer (train-mode forward passes; ``KL`` is ``nn.KLDivLoss()``'s element-wise
mean, / (B * C), as in the reference code):
``L_peer    = g1 CE(P(x*), y) + g2 tau_p^2 KL(S(x*)/tau_p || P(x*)/tau_p)``
``L_student = l1 CE(S(x*), y) + l2 tau^2 KL(sg P(x*)/tau || S(x*)/tau)
              + l3 tau^2 KL(S(x)/tau || S(x*)/tau)``
Gradient flow as in the reference: the peer is detached in ``L_student``; the
student's ``S(x*)`` is *not* detached in ``L_peer`` (PyTorch differentiates
``kl_div``'s target), nor ``S(x)`` in the third term. Train-mode passes as in
the reference (jaewonalive/PeerAiD main.py:359-383): ``P(x*)`` once, reused
detached as the student's target; ``S(x*)`` twice (``L_peer``'s target, then
``L_student``'s); ``S(x)`` once; so the batch-norm running statistics see the
reference's updates (peer 1, student 3 per step).

The reference's start is not clipped to [0, 1] before the first step; tsjax
projects it (a difference of at most 0.001 in pixels at the first gradient).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tsjax import config_checks as cc
from tsjax import losses
from tsjax.attacks import AttackSpec
from tsjax.methods.common import accuracy, attack_model, forward, logits_fn
from tsjax.methods.registry import Method

STUDENT, PEER = "student", "peer"


@dataclasses.dataclass(frozen=True)
class Options:
  """Spec §2.3; defaults: ResNet-18 / WRN-34-10 on CIFAR-10."""
  tau: float = 5.0        # student temperature
  tau_p: float = 1.0      # peer temperature
  gamma1: float = 1.0     # peer CE
  gamma2: float = 0.1     # peer KL to the student
  lambda1: float = 0.0    # student CE
  lambda2: float = 1.0    # student KL to the peer
  lambda3: float = 1.0    # student adversarial-vs-clean KL
  reduction: str = "mean"

  def __post_init__(self):
    for f in ("tau", "tau_p"):
      cc.require(self, f, cc.number_in(getattr(self, f), 0, low_open=True),
                 "> 0")
    for f in ("gamma1", "gamma2", "lambda1", "lambda2", "lambda3"):
      cc.require(self, f, cc.number_in(getattr(self, f), 0), ">= 0")
    cc.require(self, "reduction", self.reduction in losses.KL_REDUCTIONS[:3],
               f"one of {list(losses.KL_REDUCTIONS[:3])}")

  @classmethod
  def for_dataset(cls, name: str) -> "Options":
    """The paper's per-dataset weights (spec §2.3)."""
    table = {
        "cifar10": cls(),
        "cifar100": cls(gamma2=1.0),
        "tiny_imagenet": cls(tau=1.0, gamma2=100.0, lambda1=0.035,
                             lambda2=35.0, lambda3=20.0),
    }
    if name not in table:
      raise ValueError(f"no PeerAiD weights for data set {name!r}; known: "
                       f"{sorted(table)}")
    return table[name]


def peeraid_objective(p_adv, s_adv_1, s_adv_2, s_clean, labels, w: Options):
  """``(L, L_peer, L_student)`` from the logits of the four train-mode passes
  (``s_adv_1`` feeds ``L_peer``, ``s_adv_2`` ``L_student``; ``p_adv`` feeds
  both, detached in ``L_student``)."""
  kl = lambda a, b, t: t ** 2 * losses.kl(a, b, temperature=t,
                                          reduction=w.reduction)
  l_peer = (w.gamma1 * jnp.mean(losses.cross_entropy(p_adv, labels))
            + w.gamma2 * kl(s_adv_1, p_adv, w.tau_p))
  l_student = (w.lambda1 * jnp.mean(losses.cross_entropy(s_adv_2, labels))
               + w.lambda2 * kl(jax.lax.stop_gradient(p_adv), s_adv_2, w.tau)
               + w.lambda3 * kl(s_clean, s_adv_2, w.tau))
  return l_peer + l_student, l_peer, l_student


def student_adversarial(student, peer, params, model_state, x, key,
                        attack: AttackSpec):
  """The inner maximisation: the student's adversarial examples against the
  peer's clean prediction (no gradient); ``(x_adv, student model_state)``."""
  p_clean = logits_fn(peer, params[PEER], model_state[PEER], "eval")(x)
  p_clean = jax.lax.stop_gradient(p_clean)
  return attack_model(attack, student, params[STUDENT], model_state[STUDENT],
                      x, key, lambda logits, _: losses.kl(p_clean, logits,
                                                          reduction="none"))


def make_loss(student, *, teacher=None, attack: AttackSpec,
              options: Options = Options(), peer=None):
  """``peer``: the peer's module (default: the student's architecture, as
  in every PeerAiD configuration)."""
  del teacher
  peer = student if peer is None else peer

  def loss_fn(params, model_state, batch, key, ctx):
    del ctx
    x, y = batch["image"], batch["label"]
    x_adv, pm = student_adversarial(student, peer, params, model_state, x,
                                    key, attack)
    ps, qs, qm = params[STUDENT], params[PEER], model_state[PEER]
    # The reference's order: P(x*), S(x*) for L_peer, S(x*) again, S(x).
    p_adv, qm = forward(peer, qs, qm, x_adv, True)
    s1, pm = forward(student, ps, pm, x_adv, True)
    s2, pm = forward(student, ps, pm, x_adv, True)
    s_nat, pm = forward(student, ps, pm, x, True)
    loss, l_peer, l_student = peeraid_objective(p_adv, s1, s2, s_nat, y,
                                                options)
    return loss, ({"loss": loss, "loss_peer": l_peer, "loss_student": l_student,
                   "acc": accuracy(s_nat, y), "adv_acc": accuracy(s2, y),
                   "peer_adv_acc": accuracy(p_adv, y)},
                  {STUDENT: pm, PEER: qm})
  return loss_fn


def init_pair(init_fn, key):
  """``(params, model_state)`` pairs for student and peer from ``init_fn(key)
  -> (params, model_state)`` with independent keys."""
  ks, kp = jax.random.split(key)
  (sp, sm), (pp, pm) = init_fn(ks), init_fn(kp)
  return {STUDENT: sp, PEER: pp}, {STUDENT: sm, PEER: pm}


def student_view(params, model_state):
  """The student's ``(params, model_state)`` out of the joint tree."""
  return params[STUDENT], model_state[STUDENT]


METHOD = Method("peeraid", make_loss, Options, init=init_pair,
                view=student_view,
                reference="jaewonalive/PeerAiD main.py")

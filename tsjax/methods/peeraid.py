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
``kl_div``'s target), nor ``S(x)`` in the third term. ``P(x*)`` and ``S(x*)``
are computed twice in train mode (once per loss), so the batch-norm running
statistics see the same updates as in the reference.

The reference's start is not clipped to [0, 1] before the first step; tsjax
projects it (a difference of at most 0.001 in pixels at the first gradient).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tsjax import losses
from tsjax.methods.common import accuracy, forward, logits_fn, run_attack

STUDENT, PEER = "student", "peer"


@dataclasses.dataclass(frozen=True)
class PeerAiDWeights:
  """Spec §2.3; defaults: ResNet-18 / WRN-34-10 on CIFAR-10."""
  tau: float = 5.0        # student temperature
  tau_p: float = 1.0      # peer temperature
  gamma1: float = 1.0     # peer CE
  gamma2: float = 0.1     # peer KL to the student
  lambda1: float = 0.0    # student CE
  lambda2: float = 1.0    # student KL to the peer
  lambda3: float = 1.0    # student adversarial-vs-clean KL
  reduction: str = "mean"

  @classmethod
  def for_dataset(cls, name: str) -> "PeerAiDWeights":
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


def peeraid_objective(p_adv_1, s_adv_1, p_adv_2, s_adv_2, s_clean, labels,
                      w: PeerAiDWeights):
  """``(L, L_peer, L_student)`` from the logits of the five train-mode passes
  (``*_1`` feed ``L_peer``, ``*_2`` feed ``L_student``)."""
  kl = lambda a, b, t: t ** 2 * losses.kl(a, b, temperature=t,
                                          reduction=w.reduction)
  l_peer = (w.gamma1 * jnp.mean(losses.cross_entropy(p_adv_1, labels))
            + w.gamma2 * kl(s_adv_1, p_adv_1, w.tau_p))
  l_student = (w.lambda1 * jnp.mean(losses.cross_entropy(s_adv_2, labels))
               + w.lambda2 * kl(jax.lax.stop_gradient(p_adv_2), s_adv_2, w.tau)
               + w.lambda3 * kl(s_clean, s_adv_2, w.tau))
  return l_peer + l_student, l_peer, l_student


def student_adversarial(student, peer, params, model_state, x, key, attack):
  """The inner maximisation: the student's adversarial examples against the
  peer's clean prediction (no gradient)."""
  p_clean = logits_fn(peer, params[PEER], model_state[PEER], "eval")(x)
  p_clean = jax.lax.stop_gradient(p_clean)
  f = logits_fn(student, params[STUDENT], model_state[STUDENT], attack.bn_mode)
  return run_attack(attack, lambda xa: losses.kl(p_clean, f(xa),
                                                 reduction="none"), x, key)


def make_loss(student, peer, attack, weights: PeerAiDWeights = PeerAiDWeights()):
  def loss_fn(params, model_state, batch, key, ctx):
    del ctx
    x, y = batch["image"], batch["label"]
    x_adv = student_adversarial(student, peer, params, model_state, x, key,
                                attack)
    ps, pm = params[STUDENT], model_state[STUDENT]
    qs, qm = params[PEER], model_state[PEER]
    # L_peer's passes, then L_student's (as the reference orders them).
    p1, qm = forward(peer, qs, qm, x_adv, True)
    s1, pm = forward(student, ps, pm, x_adv, True)
    s2, pm = forward(student, ps, pm, x_adv, True)
    p2, qm = forward(peer, qs, qm, x_adv, True)
    s_nat, pm = forward(student, ps, pm, x, True)
    loss, l_peer, l_student = peeraid_objective(p1, s1, p2, s2, s_nat, y,
                                                weights)
    return loss, ({"loss": loss, "loss_peer": l_peer, "loss_student": l_student,
                   "acc": accuracy(s_nat, y), "adv_acc": accuracy(s2, y),
                   "peer_adv_acc": accuracy(p2, y)},
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

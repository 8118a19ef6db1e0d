"""Adding a method is one module plus one registration: a toy method,
registered from a test, trains through experiments.train unchanged."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.configs import adv_train
from experiments import train as exp
from tsjax import config_checks as cc
from tsjax import losses, methods
from tsjax.data import images
from tsjax.methods.common import accuracy, forward


@dataclasses.dataclass(frozen=True)
class ToyOptions:
  logit_penalty: float = 0.01

  def __post_init__(self):
    cc.require(self, "logit_penalty", cc.number_in(self.logit_penalty, 0),
               ">= 0")


def toy_make_loss(model, *, teacher=None, attack=None,
                  options: ToyOptions = ToyOptions()):
  """Cross-entropy plus a penalty on the squared logits."""
  del teacher, attack

  def loss_fn(params, model_state, batch, key, ctx):
    del key, ctx
    logits, model_state = forward(model, params, model_state, batch["image"],
                                  True)
    penalty = jnp.mean(jnp.sum(logits ** 2, -1))
    loss = (jnp.mean(losses.cross_entropy(logits, batch["label"]))
            + options.logit_penalty * penalty)
    return loss, ({"loss": loss, "toy_penalty": penalty,
                   "acc": accuracy(logits, batch["label"])}, model_state)
  return loss_fn


TOY = methods.Method("toy_penalty", toy_make_loss, ToyOptions,
                     uses_attack=False, reference="this test")


@pytest.fixture
def toy():
  methods.register(TOY, replace=True)
  yield TOY
  methods.REGISTRY.pop(TOY.name)


def test_registry_is_the_one_list_of_names():
  assert set(methods.REGISTRY) >= {"standard", "pgd_at", "trades", "ccat",
                                   "kd", "ard", "rslad", "iad", "funmatch",
                                   "advfunmatch", "peeraid"}
  with pytest.raises(cc.ConfigError, match="method.name"):
    methods.get("madry")
  with pytest.raises(ValueError, match="registered already"):
    methods.register(methods.REGISTRY["kd"])


def test_toy_option_errors_name_the_field(toy):
  c = adv_train.get_config("fashion_mnist,toy_penalty,smoke")
  assert dict(c.method.options) == {"logit_penalty": 0.01}
  c.method.options.logit_penalty = -1.0
  with pytest.raises(cc.ConfigError, match=r"method\.options\.logit_penalty"):
    exp.validate(c)


@pytest.mark.skipif(not os.path.isdir(images.DEFAULT_FASHION_MNIST_DIR),
                    reason=f"needs `{images.FASHION_MNIST_APT}`")
def test_toy_method_trains_through_experiments_train(toy, tmp_path):
  c = adv_train.get_config("fashion_mnist,toy_penalty,smoke")
  c.data.train_subset, c.data.num_val, c.data.test_subset = 160, 32, 64
  c.train.epochs, c.train.boundaries, c.train.log_every = 1, (), 1
  c.eval.val_subset, c.eval.pgd_steps = 32, 1
  out = exp.run(c, str(tmp_path), progress=False)
  assert out["summary"]["method"] == "toy_penalty"
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  penalties = [r["train/toy_penalty"] for r in rows if "train/toy_penalty" in r]
  assert penalties and all(np.isfinite(penalties))
  assert 0.0 <= out["summary"]["results"]["last"]["clean_acc"] <= 1.0

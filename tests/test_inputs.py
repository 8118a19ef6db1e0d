"""Bad input ends early, in one line, and loses nothing (issue 26 / 25).

* Command lines (the five experiment modules): every bad input tried ends in
  one line on stderr naming the field, exit status 2, no traceback, and the
  work dir is left as it was (not created, or its config.json unchanged).
* ``experiments.train.run`` in process: each check that can fail (radii per
  norm, schedule fields bounded by the epoch count, a subset smaller than a
  batch, model options, a teacher's checksum and architecture) raises a
  ConfigError naming the field before the work dir is touched.
* What the command line accepts: ``8/255``, bare comma lists for tuple
  fields, every architecture option of the variant's model.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from experiments import common, train
from tsjax import config_checks as cc
from tsjax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------- command-line parsing
def parse(name: str, variant: str, *overrides: str):
  """The config as ``python -m experiments.X --config configs/NAME.py:VARIANT
  OVERRIDES`` builds it (tsjax's parsers registered, as ``launch`` does)."""
  common.register_config_parsers()
  fv = flags.FlagValues()
  spec = configs.path(name) + (f":{variant}" if variant else "")
  config_flags.DEFINE_config_file("config", spec, flag_values=fv,
                                  lock_config=True)
  argv = ["prog", f"--config={spec}", *overrides]
  saved, sys.argv = sys.argv, argv   # ml_collections reads overrides there
  try:
    fv(argv)
  finally:
    sys.argv = saved
  return fv.config


def test_fractions_parse_as_floats():
  c = parse("adv_train", "cifar10,pgd_at", "--config.method.attack.eps=8/255",
            "--config.eval.eps=4/255", "--config.train.lr=0.1")
  assert c.method.attack.eps == 8 / 255 and c.eval.eps == 4 / 255
  assert c.train.lr == 0.1
  assert parse("evaluate", "", "--config.eps=8/255").eps == 8 / 255
  parser = common.FractionFloatParser()
  assert parser.parse("1e-2/2") == 0.005 and parser.parse(" 3 / 4 ") == 0.75
  with pytest.raises(ValueError):
    parser.parse("1/0")


def test_tuple_fields_take_bare_comma_lists():
  c = parse("specialization", "", "--config.methods=standard,kd")
  assert c.methods == ("standard", "kd")
  assert parse("specialization", "", "--config.methods=('pgd_at',)").methods \
      == ("pgd_at",)
  assert parse("specialization", "", "--config.seeds=3,4").seeds == (3, 4)


def test_every_architecture_option_is_reachable():
  """The variant's model options are all in model.kwargs, so each can be
  overridden (before: only those a variant happened to set)."""
  c = parse("adv_train", "fashion_mnist,pgd_at",
            "--config.model.kwargs.features=(16,32)",
            "--config.model.kwargs.hidden=64")
  assert c.model.kwargs.features == (16, 32) and c.model.kwargs.hidden == 64
  c = parse("adv_train", "cifar10,pgd_at", "--config.model.kwargs.width=32",
            "--config.model.kwargs.shortcut_from=input")
  assert c.model.name == "preact_resnet18" and c.model.kwargs.width == 32
  assert c.model.kwargs.shortcut_from == "input"
  assert c.model.kwargs.final_bn is True            # the model's default
  c = parse("adv_train", "fashion_mnist,pgd_at",
            "--config.model.kwargs.features=16,32")
  assert c.model.kwargs.features == (16, 32)


def test_config_path_resolves_to_the_installed_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)       # no configs/ here
  assert common.resolve_config_path("configs/adv_train.py:cifar10,ard") == (
      configs.path("adv_train") + ":cifar10,ard")
  assert common.resolve_config_path("mine/adv_train.py") == "mine/adv_train.py"


# --------------------------------------------- checks before the first write
def _smoke(variant="fashion_mnist,pgd_at,smoke"):
  return configs.get_config("adv_train", variant)


def _set(c, path, value):
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value


BAD = {
    "linf eps 8 (meant 8/255)": ({"method.attack.eps": 8.0},
                                 r"'method\.attack\.eps'.*8/255"),
    "eval eps 2": ({"eval.eps": 2.0}, r"'eval\.eps'.*at most 1"),
    "boundary past the last epoch": ({"train.boundaries": (5,)},
                                     r"'train\.boundaries'.*epochs"),
    "negative boundary": ({"train.boundaries": (-1,)},
                          r"'train\.boundaries'"),
    "SWA start after the last epoch": ({"train.swa_start_epoch": 2},
                                       r"'train\.swa_start_epoch'.*<= 1"),
    "subset smaller than a batch": ({"data.train_subset": 150,
                                     "data.num_val": 100},
                                    r"'train\.batch_size' \(64\) exceeds the "
                                    r"50 training"),
    "another model's options": ({"model.name": "resnet18"},
                                r"'model\.kwargs'.*\['features', 'hidden'\]"),
    "l2 radius beyond the input box": ({"method.attack.norm": "l2",
                                        "method.attack.eps": 40.0},
                                       r"'method\.attack\.eps'.*sqrt\(784\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refused_before_the_work_dir_is_touched(case, tmp_path):
  fields, match = BAD[case]
  c = _smoke()
  for path, value in fields.items():
    _set(c, path, value)
  workdir = tmp_path / "run"
  with pytest.raises(cc.ConfigError, match=match):
    train.run(c, str(workdir), progress=False)
  assert not workdir.exists()


def _npz_teacher(tmp_path):
  """A PyTorch-layout small CNN state dict (8/16 features, 32 hidden)."""
  from tsjax.models import compute_sha256, save_state_dict_npz
  rng = np.random.default_rng(0)
  shapes = {"conv1.weight": (8, 1, 3, 3), "conv1.bias": (8,),
            "conv2.weight": (16, 8, 3, 3), "conv2.bias": (16,),
            "fc1.weight": (32, 16 * 7 * 7), "fc1.bias": (32,),
            "fc.weight": (10, 32), "fc.bias": (10,)}
  path = tmp_path / "teacher.npz"
  save_state_dict_npz({k: rng.standard_normal(s).astype(np.float32)
                       for k, s in shapes.items()}, path)
  return path, compute_sha256(path)


@pytest.mark.parametrize("what", ["sha256", "architecture"])
def test_teacher_refused_before_the_work_dir_is_touched(what, tmp_path):
  path, sha = _npz_teacher(tmp_path)
  c = _smoke("fashion_mnist,rslad,smoke")
  c.teacher.torch_checkpoint, c.teacher.sha256 = str(path), sha
  c.teacher.model.kwargs.features, c.teacher.model.kwargs.hidden = (8, 16), 32
  if what == "sha256":
    c.teacher.sha256 = "0" * 64
    match = r"'teacher\.sha256'.*mismatch"
  else:
    c.teacher.model.kwargs.hidden = 48
    match = r"(?s)'teacher\.model' \(small_cnn\).*shape mismatch"
  workdir = tmp_path / "run"
  with pytest.raises(cc.ConfigError, match=match):
    train.run(c, str(workdir), progress=False)
  assert not workdir.exists()


def test_resume_with_another_config_is_refused(tmp_path):
  c = _smoke()
  common.prepare_workdir(str(tmp_path), c)
  before = (tmp_path / "config.json").read_text()
  c.train.lr = 0.5
  with pytest.raises(cc.ConfigError, match=r"train\.lr: 0\.05 -> 0\.5"):
    common.prepare_workdir(str(tmp_path), c)
  assert (tmp_path / "config.json").read_text() == before
  rows = (tmp_path / "provenance.jsonl").read_text().splitlines()
  assert len(rows) == 1               # the refused start added no row


def test_provenance_names_version_commit_jax_and_devices():
  import jax
  import tsjax
  p = common.provenance()
  assert p["tsjax"] == tsjax.__version__ and p["jax"] == jax.__version__
  assert p["backend"] == jax.default_backend()
  assert p["device_count"] == jax.device_count()
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"],
                        capture_output=True, text=True)
  if head.returncode == 0:            # a checkout: its commit
    assert p["git_commit"].split("+")[0] == head.stdout.strip()


# ------------------------------------------------------------ command lines
SMOKE = "--config=configs/adv_train.py:fashion_mnist,pgd_at,smoke"
CLI = {  # name: (module, args, what the one line must name)
    "unknown field": ("train", [SMOKE, "--config.train.epochz=3"],
                      r"--config\.train\.epochz: no such config field "
                      r"\(did you mean 'epochs'\?\)"),
    "unknown model option": ("train", [SMOKE,
                                       "--config.model.kwargs.featurez=3"],
                             r"model\.kwargs\.featurez.*'features'"),
    "unknown variant": ("train", [
        "--config=configs/adv_train.py:fashion_mnist,smok"], r"'smok'"),
    "config file typo": ("train", ["--config=configs/adv_trian.py"],
                         r"adv_trian\.py"),
    "bad value type": ("train", [SMOKE, "--config.train.epochs=abc"],
                       r"--config\.train\.epochs=abc"),
    "missing data dir": ("train", [SMOKE,
                                   "--config.data.data_dir=/nonexistent"],
                         r"data error: .*'data\.data_dir'"),
    "augmentation typo": ("train", [SMOKE, "--config.augment=crop_flipp"],
                          r"'augment\[0\]'.*'crop_flipp'"),
    "positional argument": ("train", [SMOKE, "extra"],
                            r"positional arguments \['extra'\]"),
    "eps 8 for 8/255": ("train", [SMOKE, "--config.method.attack.eps=8"],
                        r"method\.attack\.eps=8/255"),
    "batch not divisible by the devices": (
        "train", [SMOKE, "--config.train.batch_size=63"],
        r"'train\.batch_size' \(63\).*divisible.*2 devices"),
    "evaluate: negative subset": (
        "evaluate", ["--config=configs/evaluate.py", "--config.subset=-5",
                     "--config.checkpoint=CKPT"], r"'subset' must be >= 1"),
    "distill: a teacher file that is not there": (
        "distill", ["--config=configs/distill.py:rslad,fashion_mnist,smoke",
                    "--config.teacher.torch_checkpoint=/nonexistent.pt"],
        r"'teacher\.torch_checkpoint': no such file"),
    "specialization: a work dir of another config": (
        "specialization", ["--config=configs/specialization.py:smoke"],
        r"holds a run made with a different config"),
    "teacher_student: a bad field": (
        "teacher_student", ["--config=configs/teacher_student.py:smoke",
                            "--config.num_seeds=0"], r"'num_seeds'"),
}


def test_bad_command_lines_end_in_one_line(tmp_path):
  """Each bad input of ``CLI`` (all launched at once): exit status 2, one
  line on stderr naming the field, the work dir as it was."""
  ckpt = tmp_path / "ckpt"       # a work dir with a config.json, for evaluate
  ckpt.mkdir()
  (ckpt / "config.json").write_text(json.dumps(train_config_json()))
  procs = {}
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  for i, (name, (module, args, _)) in enumerate(sorted(CLI.items())):
    workdir = tmp_path / f"w{i}"
    if module == "specialization":     # holds another config's run
      workdir.mkdir()
      (workdir / "config.json").write_text(json.dumps({"dataset": "other"}))
    args = [a.replace("CKPT", str(ckpt)) for a in args]
    procs[name] = (workdir, subprocess.Popen(
        [sys.executable, "-m", f"experiments.{module}", *args,
         f"--workdir={workdir}", "--compilation_cache=off"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
  failures = []
  for name, (workdir, proc) in procs.items():
    out, err = proc.communicate(timeout=300)
    lines = [l for l in err.splitlines() if l.strip()]
    match = CLI[name][2]
    ok = (proc.returncode == 2 and len(lines) == 1
          and re.search(match, lines[0]) and "Traceback" not in err)
    kept = (not workdir.exists() if CLI[name][0] != "specialization" else
            json.loads((workdir / "config.json").read_text()) ==
            {"dataset": "other"})
    if not (ok and kept):
      failures.append(f"{name}: rc {proc.returncode}, work dir kept: {kept}, "
                      f"stderr:\n{err[-2000:]}")
  assert not failures, "\n\n".join(failures)


def train_config_json():
  return common.config_dict(_smoke())


def test_launch_from_another_directory(tmp_path):
  """An installed tsjax (here: on PYTHONPATH) launches from any directory:
  ``python -m tsjax.experiments.NAME --config configs/NAME.py`` finds the
  module and the config file; a bad field then ends in its one line."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "tsjax.experiments.train", SMOKE,
       "--config.train.epochz=3",
       f"--workdir={tmp_path / 'w'}"], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert "--config.train.epochz: no such config field" in proc.stderr
  assert not (tmp_path / "w").exists()

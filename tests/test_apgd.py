"""APGD / APGD-T: step-size schedule, DLR losses, constraints, determinism,
strength (vs eps and vs PGD) on a real Fashion-MNIST model, and (slow)
cross-checks against torchattacks' port of the reference (fra31/auto-attack).
"""

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax import losses
from tsjax.attacks import apgd, apgd_checkpoints, apgd_targeted, pgd
from tsjax.data import images

A = importlib.import_module("tsjax.attacks.apgd")   # private helpers


# ----------------------------------------------------------- the schedule
def _reference_checkpoints(n_iter):
  """The reference's loop, literally: counter3 counts iterations and the
  step-size check runs when it reaches k (which then shrinks)."""
  k = max(int(0.22 * n_iter), 1)
  k_min = max(int(0.06 * n_iter), 1)
  decr = max(int(0.03 * n_iter), 1)
  counter3, out = 0, []
  for i in range(n_iter):
    counter3 += 1
    if counter3 == k:
      out.append(i + 1)
      counter3 = 0
      k = max(k - decr, k_min)
  return out


def test_checkpoints_100():
  assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 17, 20, 33, 50, 64, 99, 150,
                               250, 1000])
def test_checkpoints_match_reference_loop(n):
  assert apgd_checkpoints(n) == _reference_checkpoints(n)


@pytest.fixture
def torch_one_thread():
  """torch with one intra-op thread (its spinning thread pool is many times
  slower on a shared, oversubscribed CPU); restored afterwards."""
  torch = pytest.importorskip("torch")
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch
  torch.set_num_threads(n)


def test_checkpoints_match_torchattacks(torch_one_thread):
  """Where torchattacks' APGD actually checks the step size (the iteration
  index passed to check_oscillation), on a tiny model."""
  torch = torch_one_thread
  torchattacks = pytest.importorskip("torchattacks")
  net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
  x = torch.rand(2, 1, 2, 2)
  with torch.no_grad():
    y = net(x).argmax(1)
  for n in (1, 5, 10, 37, 100):
    atk = torchattacks.APGD(net, eps=1e-3, steps=n, seed=0)
    seen = []
    orig = atk.check_oscillation

    def spy(xs, j, k, y5, k3=0.75, orig=orig, seen=seen):
      seen.append(j + 1)
      return orig(xs, j, k, y5, k3=k3)
    atk.check_oscillation = spy
    atk.perturb(x, y, cheap=True)
    assert seen == apgd_checkpoints(n), n


# ------------------------------------------------------------ DLR losses
def test_dlr_by_hand():
  z = jnp.array([[1.0, 3.0, 2.0, 0.5],     # sorted 3, 2, 1, 0.5
                 [1.0, 3.0, 2.0, 0.5],
                 [4.0, 0.0, -1.0, 2.0]])   # sorted 4, 2, 0, -1
  y = jnp.array([1, 0, 0])
  # -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)
  expected = [-(3 - 2) / (3 - 1), -(1 - 3) / (3 - 1), -(4 - 2) / (4 - 0)]
  np.testing.assert_allclose(losses.dlr(z, y), expected, rtol=1e-6)
  # > 0 exactly for misclassified rows; shift and scale invariant.
  np.testing.assert_allclose(losses.dlr(2.5 * z + 7.0, y), expected, rtol=1e-6)


def test_dlr_targeted_by_hand():
  z = jnp.array([[1.0, 3.0, 2.0, 0.5],     # pi1 = 3, pi3 = 1, pi4 = 0.5
                 [4.0, 0.0, -1.0, 2.0]])   # pi1 = 4, pi3 = 0, pi4 = -1
  y = jnp.array([1, 0])
  t = jnp.array([3, 3])
  expected = [-(3 - 0.5) / (3 - (1 + 0.5) / 2),
              -(4 - 2) / (4 - (0 - 1) / 2)]
  np.testing.assert_allclose(losses.dlr_targeted(z, y, t), expected,
                             rtol=1e-6)
  g = jax.grad(lambda v: jnp.sum(losses.dlr_targeted(v, y, t)))(z)
  assert np.all(np.isfinite(g))


def test_dlr_matches_torchattacks_formulas():
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  rng = np.random.default_rng(0)
  z = rng.normal(size=(64, 10)).astype(np.float32)
  y = rng.integers(0, 10, 64)
  t = (y + rng.integers(1, 10, 64)) % 10
  net = torch.nn.Linear(1, 1)
  ref = torchattacks.APGD(net).dlr_loss(torch.from_numpy(z),
                                        torch.from_numpy(y)).numpy()
  np.testing.assert_allclose(losses.dlr(jnp.asarray(z), jnp.asarray(y)), ref,
                             rtol=1e-5, atol=1e-6)
  ref_t = torchattacks.APGDT(net).dlr_loss_targeted(
      torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(
      losses.dlr_targeted(jnp.asarray(z), jnp.asarray(y), jnp.asarray(t)),
      ref_t, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- the reference model
def _load_reference(n_test=500):
  from reference_models import fmnist_reference, flax_logits_fn
  try:
    model, params, x, y = fmnist_reference(n_test=n_test)
  except images.DatasetNotPreparedError as e:
    pytest.skip(f"Fashion-MNIST is not installed ({images.FASHION_MNIST_APT}"
                f"): {e}")
  return model, params, flax_logits_fn(model, params), jnp.asarray(x), \
      jnp.asarray(y)


@pytest.fixture(scope="module")
def ref():
  return _load_reference()


def _norms(xa, x):
  d = np.asarray(xa, np.float64) - np.asarray(x, np.float64)
  d = d.reshape(len(d), -1)
  return np.abs(d).max(1), np.sqrt((d * d).sum(1))


def _check_output(f, x, y, xa, info, norm, eps):
  linf, l2 = _norms(xa, x)
  n = linf if norm == "linf" else l2
  assert np.all(n <= eps + 1e-6), n.max()
  xa_np = np.asarray(xa)
  assert xa_np.min() >= 0.0 and xa_np.max() <= 1.0
  robust = np.asarray(info["robust"])
  pred = np.asarray(jnp.argmax(f(xa), -1))
  y = np.asarray(y)
  # Robust points come back unchanged (and correctly classified); broken
  # points come back misclassified.
  np.testing.assert_array_equal(xa_np[robust], np.asarray(x)[robust])
  assert np.all(pred[robust] == y[robust])
  assert np.all(pred[~robust] != y[~robust])
  # Clean errors stay errors and are not attacked.
  clean_wrong = np.asarray(jnp.argmax(f(x), -1)) != y
  assert not np.any(robust & clean_wrong)
  np.testing.assert_array_equal(xa_np[clean_wrong], np.asarray(x)[clean_wrong])


# Jitted attacks shared by the tests below (eps is an argument, so one
# compilation serves every radius): (norm, attack) -> run(x, y, key, eps).
_RUNNERS = {}


def _runner(f, norm, kind):
  if (norm, kind) not in _RUNNERS:
    if kind == "t":
      fn = lambda x, y, k, eps: apgd_targeted(
          f, x, y, k, norm=norm, eps=eps, steps=20, n_target_classes=3)
    else:
      fn = lambda x, y, k, eps: apgd(f, x, y, k, norm=norm, eps=eps, steps=20,
                                     loss=kind, restarts=2)
    _RUNNERS[(norm, kind)] = jax.jit(fn)
  return _RUNNERS[(norm, kind)]


N_SMALL = 128


@pytest.mark.parametrize("norm,eps,kind", [("linf", 0.05, "ce"),
                                           ("linf", 0.05, "t"),
                                           ("l2", 1.0, "dlr"),
                                           ("l2", 1.0, "t")])
def test_constraints_and_outputs(ref, norm, eps, kind):
  _, _, f, x, y = ref
  x, y = x[:N_SMALL], y[:N_SMALL]
  xa, info = _runner(f, norm, kind)(x, y, jax.random.key(1), eps)
  assert xa.dtype == x.dtype and xa.shape == x.shape
  _check_output(f, x, y, xa, info, norm, eps)
  assert 0 < np.mean(info["robust"]) < np.mean(jnp.argmax(f(x), -1) == y)
  assert info["step_size"].shape == y.shape and info["loss"].shape == y.shape


def test_same_key_same_result(ref):
  _, _, f, x, y = ref
  x, y = x[:N_SMALL], y[:N_SMALL]
  run = _runner(f, "linf", "ce")
  a, ia = run(x, y, jax.random.key(7), 0.03)
  b, ib = run(x, y, jax.random.key(7), 0.03)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(ia["robust"]),
                                np.asarray(ib["robust"]))
  np.testing.assert_array_equal(np.asarray(ia["loss"]), np.asarray(ib["loss"]))
  # The random start depends on the key.
  s1 = A.random_start(jax.random.key(7), x, 0.03, "linf")
  s2 = A.random_start(jax.random.key(8), x, 0.03, "linf")
  assert not np.allclose(np.asarray(s1), np.asarray(s2))


def test_random_start_on_the_sphere():
  x = jnp.full((4, 3, 3, 1), 0.5, jnp.float32)
  linf, _ = _norms(A.random_start(jax.random.key(0), x, 0.1, "linf"), x)
  _, l2 = _norms(A.random_start(jax.random.key(0), x, 0.3, "l2"), x)
  np.testing.assert_allclose(linf, 0.1, rtol=1e-5)
  np.testing.assert_allclose(l2, 0.3, rtol=1e-5)


def test_robust_accuracy_monotone_in_eps(ref):
  _, _, f, x, y = ref
  x, y = x[:N_SMALL], y[:N_SMALL]
  run = _runner(f, "linf", "ce")
  clean = float(jnp.mean(jnp.argmax(f(x), -1) == y))
  accs = [float(jnp.mean(run(x, y, jax.random.key(0), e)[1]["robust"]))
          for e in (0.0, 0.01, 0.03, 0.1, 1.0)]
  assert accs[0] == pytest.approx(clean)
  assert all(a >= b for a, b in zip(accs, accs[1:])), accs
  assert accs[-1] == 0.0, accs


def test_apgd_ce_at_least_as_strong_as_pgd(ref):
  _, _, f, x, y = ref
  x, y = x[:300], y[:300]
  eps, steps = 0.05, 100
  xa, info = jax.jit(lambda x, y, k: apgd(f, x, y, k, eps=eps,
                                          steps=steps))(x, y, jax.random.key(0))
  xp = jax.jit(lambda x, y, k: pgd(lambda v: losses.cross_entropy(f(v), y), x, k,
                                   eps=eps, step_size=eps / 4, steps=steps,
                                   bounds=(0.0, 1.0)))(x, y, jax.random.key(0))
  acc_apgd = float(jnp.mean(info["robust"]))
  acc_pgd = float(jnp.mean(jnp.argmax(f(xp), -1) == y))
  assert acc_apgd <= acc_pgd + 2.0 / len(y), (acc_apgd, acc_pgd)   # 2 examples


def test_argument_errors(ref):
  _, _, f, x, y = ref
  k = jax.random.key(0)
  with pytest.raises(ValueError, match="norm"):
    apgd(f, x[:2], y[:2], k, eps=0.1, norm="l1")
  with pytest.raises(ValueError, match="loss"):
    apgd(f, x[:2], y[:2], k, eps=0.1, loss="cw")
  with pytest.raises(ValueError, match="targets"):
    apgd(f, x[:2], y[:2], k, eps=0.1, loss="dlr_targeted")
  with pytest.raises(ValueError, match="n_target_classes"):
    apgd_targeted(f, x[:2], y[:2], k, eps=0.1, n_target_classes=10)


# ------------------------------------------ slow: against torchattacks
def _torch_setup(params, x, y):
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  from reference_models import to_torch_images, torch_model
  return (torch, torchattacks, torch_model(params), to_torch_images(x),
          torch.from_numpy(np.asarray(y)).long())


@pytest.mark.slow
def test_robust_accuracy_matches_torchattacks(ref, torch_one_thread):
  """Robust accuracy of APGD-CE / APGD-T vs torchattacks on 500 points:
  agreement within max(0.5 percentage points, 2 examples)."""
  model, params, f, x, y = ref
  torch, torchattacks, net, xt, yt = _torch_setup(params, x, y)
  n = len(y)
  tol = max(0.005, 2.0 / n)
  cases = [("linf", 0.02, "ce"), ("linf", 0.05, "ce"), ("linf", 0.1, "ce"),
           ("linf", 0.02, "t"), ("linf", 0.05, "t"), ("linf", 0.1, "t"),
           ("l2", 1.0, "ce")]
  rows, failures = [], []
  for norm, eps, kind in cases:
    tnorm = "Linf" if norm == "linf" else "L2"
    if kind == "ce":
      atk = torchattacks.APGD(net, norm=tnorm, eps=eps, steps=100,
                              n_restarts=1, loss="ce", seed=0)
      run = jax.jit(lambda x, y, k, norm=norm, eps=eps: apgd(
          f, x, y, k, norm=norm, eps=eps, steps=100))
    else:
      atk = torchattacks.APGDT(net, norm=tnorm, eps=eps, steps=100,
                               n_restarts=1, n_classes=10, seed=0)
      run = jax.jit(lambda x, y, k, norm=norm, eps=eps: apgd_targeted(
          f, x, y, k, norm=norm, eps=eps, steps=100, n_target_classes=9))
    t0 = time.time()
    xa, info = run(x, y, jax.random.key(0))
    xa.block_until_ready()
    t_jax_first = time.time() - t0          # includes compilation
    t0 = time.time()
    jax.block_until_ready(run(x, y, jax.random.key(0)))
    t_jax = time.time() - t0
    _check_output(f, x, y, xa, info, norm, eps)
    t0 = time.time()
    acc_t, adv_t = atk.perturb(xt, yt, cheap=True)
    t_torch = time.time() - t0
    a_j = float(np.mean(info["robust"]))
    a_t = float(acc_t.float().mean())
    rows.append(f"| {norm} | {eps} | APGD-{kind.upper()} | {a_j:.4f} | "
                f"{a_t:.4f} | {100 * (a_j - a_t):+.1f} pp | "
                f"{t_jax_first:.1f} s ({t_jax:.1f} s warm) | {t_torch:.1f} s |")
    if abs(a_j - a_t) > tol + 1e-9:
      failures.append(rows[-1])
  print("\n| norm | eps | attack | tsjax acc | torchattacks acc | diff | "
        "tsjax time (first call) | torchattacks time |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
  assert not failures, failures


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps,loss", [("linf", 0.05, "ce"),
                                           ("linf", 0.05, "dlr"),
                                           ("l2", 1.0, "ce"),
                                           ("l2", 1.0, "dlr"),
                                           ("linf", 0.05, "dlr_targeted")])
def test_single_run_follows_torchattacks_from_the_same_start(
    ref, torch_one_thread, norm, eps, loss):
  """From torchattacks' own random start, one 100-step run of the JAX port
  breaks exactly the same points (float32 rounding only flips the sign of
  near-zero gradient coordinates, so iterates may drift apart slightly)."""
  model, params, f, x, y = ref
  torch, torchattacks, net, xt, yt = _torch_setup(params, x, y)
  tnorm = "Linf" if norm == "linf" else "L2"
  if loss == "dlr_targeted":
    atk = torchattacks.APGDT(net, norm=tnorm, eps=eps, steps=100,
                             n_restarts=1, n_classes=10, seed=0)
  else:
    atk = torchattacks.APGD(net, norm=tnorm, eps=eps, steps=100,
                            n_restarts=1, loss=loss, seed=0)
  recs = []
  orig = atk.attack_single_run

  def spy(xi, yi):
    state = torch.random.get_rng_state()
    out = orig(xi, yi)
    torch.random.set_rng_state(state)   # replay the start it drew
    if norm == "linf":
      t = 2 * torch.rand(xi.shape) - 1
      x0 = xi + eps * t / t.reshape(len(t), -1).abs().max(1)[0].reshape(
          -1, 1, 1, 1)
    else:
      t = torch.randn(xi.shape)
      x0 = xi + eps * t / ((t ** 2).sum(dim=(1, 2, 3), keepdim=True).sqrt()
                           + 1e-12)
    with torch.no_grad():
      tgt = net(xi).sort(dim=1)[1][:, -2]    # first target: 2nd class
    recs.append((xi, yi, x0.clamp(0.0, 1.0), tgt, out))
    return out
  atk.attack_single_run = spy
  atk.perturb(xt, yt, cheap=True)
  xi, yi, x0, tgt, (_, acc_t, loss_t, _) = recs[0]
  nhwc = lambda v: jnp.asarray(v.numpy().transpose(0, 2, 3, 1))
  _, acc_j, loss_j, _, _ = jax.jit(lambda a, b, c, d: A._single_run(
      f, a, b, c, eps=eps, norm=norm, steps=100, loss=loss, targets=d,
      rho=0.75, bounds=(0.0, 1.0)))(nhwc(xi), jnp.asarray(yi.numpy()),
                                    nhwc(x0), jnp.asarray(tgt.numpy()))
  acc_t = acc_t.numpy().astype(bool)
  acc_j = np.asarray(acc_j)
  mismatch = int(np.sum(acc_t != acc_j))
  close = float(np.mean(np.isclose(np.asarray(loss_j), loss_t.numpy(),
                                   rtol=1e-3, atol=1e-4)))
  print(f"\n{norm} eps={eps} {loss}: {len(acc_t)} points, {mismatch} "
        f"disagree; robust {acc_j.sum()} (jax) vs {acc_t.sum()} (torch); "
        f"best loss equal on {close:.1%}")
  assert mismatch <= max(1, len(acc_t) // 200)
  assert close >= 0.85

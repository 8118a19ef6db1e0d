"""FAB / FAB-T: the box-constrained hyperplane projections against independent
solvers (LP, KKT bisection) and the reference code, minimal distances on
linear classifiers, the eps / box / determinism contract on a Fashion-MNIST
MLP, and (slow) robust accuracy against torchattacks' FAB."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.attacks.fab import (fab, project_hyperplane, projection_l2,
                               projection_linf)

scipy_optimize = pytest.importorskip("scipy.optimize")


# --------------------------------------------------------------------------
# Independent solutions of  min ||d||  s.t.  w . (t + d) = b,  lo <= t + d <= hi


def _corner(t, w, b, lo, hi):
  """The box point moving w . z furthest towards b (used when the
  hyperplane misses the box); coordinates with w = 0 stay."""
  towards_up = (w @ t - b) < 0          # need w . z larger
  up = np.where(w > 0, hi, lo)
  down = np.where(w > 0, lo, hi)
  z = np.where(towards_up, up, down)
  return np.where(w == 0, t, z) - t


def _linf_lp(t, w, b, lo, hi):
  """linprog: min s s.t. |d_i| <= s, w . d = b - w . t, lo <= t + d <= hi.
  Returns the optimal norm, or None if infeasible."""
  D = t.size
  c = np.zeros(D + 1)
  c[-1] = 1.0
  eye = np.eye(D)
  A_ub = np.block([[eye, -np.ones((D, 1))], [-eye, -np.ones((D, 1))]])
  res = scipy_optimize.linprog(
      c, A_ub=A_ub, b_ub=np.zeros(2 * D),
      A_eq=np.concatenate([w, [0.0]])[None], b_eq=[b - w @ t],
      bounds=[(lo - ti, hi - ti) for ti in t] + [(0, None)], method="highs")
  if res.status == 2:
    return None
  assert res.status == 0, res.message
  return res.fun


def _l2_kkt(t, w, b, lo, hi):
  """The unique minimiser d = clip(-lam w, lo - t, hi - t) with lam found by
  bisection on the monotone w . d(lam); None if infeasible."""
  target = b - w @ t
  d_of = lambda lam: np.clip(-lam * w, lo - t, hi - t)
  big = 1e8
  if not (w @ d_of(big) - 1e-12 <= target <= w @ d_of(-big) + 1e-12):
    return None
  a, c = -big, big                       # w . d(a) >= target >= w . d(c)
  for _ in range(400):
    m = 0.5 * (a + c)
    if w @ d_of(m) >= target:
      a = m
    else:
      c = m
  return d_of(0.5 * (a + c))


def _problems(seed, n, D, lo=0.0, hi=1.0):
  """Random (t, w, b): t in the box, some coordinates on its faces, some
  w_i = 0; b from a random point of the box (feasible) or beyond the box's
  range of w . z (infeasible)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    t = rng.uniform(lo, hi, D)
    t[rng.uniform(size=D) < 0.2] = lo
    t[rng.uniform(size=D) < 0.1] = hi
    w = rng.normal(size=D)
    w[rng.uniform(size=D) < 0.15] = 0.0
    if not np.any(w):
      w[0] = 1.0
    if i % 5 == 4:                           # infeasible
      zmax = np.where(w > 0, hi, lo)
      zmin = np.where(w > 0, lo, hi)
      b = (w @ zmax + 0.3) if i % 2 else (w @ zmin - 0.3)
    elif i % 7 == 3:                         # t already on the hyperplane
      b = w @ t
    else:
      z = rng.uniform(lo, hi, D)
      z = np.where(rng.uniform(size=D) < 0.3, t, z)
      b = w @ z
    out.append((t, w, b))
  return out


def _run_projection(norm, probs, lo=0.0, hi=1.0, dtype=jnp.float64):
  t, w, b = (jnp.asarray(np.stack(v), dtype) for v in zip(*probs))
  if (lo, hi) == (0.0, 1.0):
    fn = projection_linf if norm == "linf" else projection_l2
    return np.asarray(fn(t, w, b))
  return np.asarray(project_hyperplane(t, w, b, norm, (lo, hi)))


def _check_against_solver(norm, probs, d, lo, hi):
  n_feasible = 0
  for (t, w, b), di in zip(probs, d):
    z = t + di
    assert np.all(z >= lo - 1e-12) and np.all(z <= hi + 1e-12)
    exact = (_linf_lp if norm == "linf" else _l2_kkt)(t, w, b, lo, hi)
    if exact is None:                        # hyperplane misses the box
      np.testing.assert_allclose(di, _corner(t, w, b, lo, hi), atol=1e-12)
      continue
    n_feasible += 1
    assert abs(w @ z - b) <= 1e-9 * (1 + np.abs(w) @ np.abs(z))
    if norm == "linf":
      np.testing.assert_allclose(np.abs(di).max(), exact, rtol=1e-8,
                                 atol=1e-10)
    else:
      np.testing.assert_allclose(di, exact, atol=1e-8)
  assert n_feasible >= len(probs) // 2


@pytest.mark.parametrize("D", [1, 2, 7, 40])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_independent_solver(norm, D):
  probs = _problems(D, 40, D)
  _check_against_solver(norm, probs, _run_projection(norm, probs), 0.0, 1.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_other_box(norm):
  lo, hi = -0.5, 2.0
  probs = _problems(7, 40, 6, lo, hi)
  _check_against_solver(norm, probs, _run_projection(norm, probs, lo, hi),
                        lo, hi)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_float32(norm):
  probs = _problems(40, 40, 40)        # as in the test above (same compile)
  d32 = _run_projection(norm, probs, dtype=jnp.float32)
  assert d32.dtype == np.float32
  np.testing.assert_allclose(d32, _run_projection(norm, probs), atol=2e-5)


def test_projections_match_reference_code():
  """Same output as the reference implementation (torchattacks' copy of
  fra31/auto-attack's projections), incl. ties and |w_i| < 1e-8."""
  torch = pytest.importorskip("torch")
  fab_ref = pytest.importorskip("torchattacks.attacks.fab")
  rng = np.random.default_rng(0)
  for D in (3, 784):
    N = 300                  # rows: 100 with ties, 100 plain, 100 |w| tiny
    t = rng.uniform(0, 1, (N, D))
    t[rng.uniform(size=t.shape) < 0.3] = 0.0
    w = rng.normal(size=(N, D)) * (rng.uniform(size=(N, D)) < 0.8)
    t[:100] = rng.choice([0.0, 0.25, 0.5, 1.0], (100, D))
    w[:100] = rng.choice([-1.0, 0.0, 1.0, 2.0], (100, D))
    w[200:] += 1e-9 * rng.normal(size=(100, D))
    b = (w * rng.uniform(0, 1, (N, D))).sum(1) * rng.uniform(-1, 3, N)
    for ours, ref in [(projection_linf, fab_ref.projection_linf),
                      (projection_l2, fab_ref.projection_l2)]:
      d = np.asarray(ours(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
      d_ref = ref(torch.tensor(t), torch.tensor(w), torch.tensor(b)).numpy()
      np.testing.assert_allclose(d, d_ref, atol=1e-10, err_msg=f"D={D}")


# --------------------------------------------------------------------------
# Linear classifiers: the minimal distance is known in closed form.


def _linear_problem(seed=0, B=16, D=20, C=5):
  rng = np.random.default_rng(seed)
  W = rng.normal(size=(D, C))
  c = rng.normal(size=C) * 0.3
  x = rng.uniform(0.4, 0.6, (B, D))
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ W + c
  y = np.argmax(logits_fn(x), 1)
  return W, c, x, y, logits_fn


def _linear_min_dist(W, c, x, y, norm):
  """Distance to the closest pairwise boundary (= the minimal adversarial
  distance for a linear classifier) and the point reaching it."""
  B = x.shape[0]
  logits = x @ W + c
  best = np.full(B, np.inf)
  point = np.zeros_like(x)
  for k in range(W.shape[1]):
    dw = W[:, [k]].T - W[:, y].T                       # [B, D]
    df = logits[:, k] - logits[np.arange(B), y]        # < 0 for k != y
    if norm == "linf":
      dist = np.abs(df) / np.maximum(np.abs(dw).sum(1), 1e-300)
      z = x + dist[:, None] * np.sign(dw)
    else:
      dist = np.abs(df) / np.maximum(np.linalg.norm(dw, axis=1), 1e-300)
      z = x + (np.abs(df) / np.maximum((dw ** 2).sum(1), 1e-300))[:, None] * dw
    better = (k != y) & (dist < best)
    best = np.where(better, dist, best)
    point = np.where(better[:, None], z, point)
  return best, point


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_minimal_distance_on_linear_classifier(norm):
  W, c, x, y, f = _linear_problem()
  dist, point = _linear_min_dist(W, c, x, y, norm)
  assert np.all((point > 0) & (point < 1))           # the box is not active
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  attack = jax.jit(lambda eta: fab(f, xj, yj, jax.random.key(0), norm=norm,
                                   eps=10.0, steps=8, eta=eta))
  # Default FAB: the overshoot eta = 1.05 leaves it within ~0.5%.
  x_adv, info = attack(1.05)
  found = np.asarray(info["norm"])
  assert np.all(found >= dist * (1 - 1e-9))
  assert np.all(found <= dist * 1.01)
  assert not np.any(info["robust"])
  assert np.all(np.argmax(f(np.asarray(x_adv)), 1) != y)
  # With almost no overshoot it lands on the boundary.
  _, info = attack(1.0 + 1e-6)
  np.testing.assert_allclose(np.asarray(info["norm"]), dist, rtol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_success_decided_by_eps(norm):
  """FAB-T with all C - 1 targets breaks a linear classifier exactly when
  eps exceeds the minimal distance (per-example eps)."""
  W, c, x, y, f = _linear_problem(seed=1)
  dist, _ = _linear_min_dist(W, c, x, y, norm)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  run = jax.jit(lambda eps: fab(f, xj, yj, jax.random.key(1), norm=norm,
                                eps=eps, steps=8, targeted=True,
                                n_target_classes=9))  # clipped to C - 1 = 4
  x_adv, info = run(dist * 1.02)
  assert not np.any(info["robust"])
  pert = np.asarray(x_adv) - x
  nrm = np.abs(pert).max(1) if norm == "linf" else np.linalg.norm(pert, axis=1)
  assert np.all(nrm <= dist * 1.02 + 1e-12)
  np.testing.assert_allclose(nrm, np.asarray(info["norm"]), rtol=1e-12)
  x_adv, info = run(dist * 0.98)
  assert np.all(info["robust"])
  np.testing.assert_array_equal(np.asarray(x_adv), x)
  assert np.all(np.asarray(info["norm"]) >= dist * (1 - 1e-9))


def test_fab_bad_arguments():
  W, c, x, y, f = _linear_problem(B=2)
  args = (f, jnp.asarray(x), jnp.asarray(y), jax.random.key(0))
  for kw in [dict(norm="l1"), dict(restarts=0), dict(steps=-1),
             dict(targeted=True, n_target_classes=0), dict(bounds=(1.0, 0.0))]:
    with pytest.raises(ValueError):
      fab(*args, eps=0.1, **kw)


# --------------------------------------------------------------------------
# The Fashion-MNIST reference MLP.


N_FMNIST = 64


@pytest.fixture(scope="module")
def fmnist():
  from reference_models import fmnist_reference, flax_logits_fn
  from tsjax.data.images import DatasetNotPreparedError
  try:
    model, params, x, y = fmnist_reference()
  except DatasetNotPreparedError as e:
    pytest.skip(f"Fashion-MNIST missing (apt-get install "
                f"dataset-fashion-mnist): {e}")
  return flax_logits_fn(model, params), params, x, y


_JITTED = {}


def _fab_jit(logits_fn, **kw):
  """One compiled attack per configuration; eps is a traced argument."""
  key = tuple(sorted(kw.items()))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda x, y, k, eps: fab(logits_fn, x, y, k,
                                                     eps=eps, **kw))
  return _JITTED[key]


def _norms(v, norm):
  v = np.asarray(v).reshape(v.shape[0], -1)
  return np.abs(v).max(1) if norm == "linf" else np.linalg.norm(v, axis=1)


@pytest.mark.parametrize("norm,targeted,eps", [("linf", True, 0.03),
                                               ("l2", False, 0.6)])
def test_fmnist_contract_and_determinism(fmnist, norm, targeted, eps):
  lf, _, x, y = fmnist
  x, y = jnp.asarray(x[:N_FMNIST]), jnp.asarray(y[:N_FMNIST])
  attack = _fab_jit(lf, norm=norm, steps=6, restarts=2, targeted=targeted,
                    n_target_classes=3)
  x_adv, info = attack(x, y, jax.random.key(3), eps)
  x_adv2, info2 = attack(x, y, jax.random.key(3), eps)
  np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x_adv2))
  np.testing.assert_array_equal(np.asarray(info["norm"]),
                                np.asarray(info2["norm"]))
  x_adv, xn = np.asarray(x_adv), np.asarray(x)
  robust, best = np.asarray(info["robust"]), np.asarray(info["norm"])
  assert x_adv.shape == xn.shape and x_adv.dtype == xn.dtype
  assert np.all(x_adv >= 0) and np.all(x_adv <= 1)
  pert = _norms(x_adv - xn, norm)
  assert np.all(pert <= eps + 1e-6)
  pred = np.argmax(np.asarray(lf(x_adv)), 1)
  correct = np.argmax(np.asarray(lf(x)), 1) == np.asarray(y)
  np.testing.assert_array_equal(robust, correct & (pred == np.asarray(y)))
  np.testing.assert_array_equal(x_adv[robust], xn[robust])
  np.testing.assert_array_equal(x_adv[~correct], xn[~correct])
  assert (~correct).sum() >= 1
  broken = correct & ~robust
  assert broken.sum() >= 5 and robust.sum() >= 5      # a non-trivial eps
  np.testing.assert_allclose(best[broken], pert[broken], rtol=1e-5)
  assert np.all(best[robust] > eps)
  assert np.all(best[~correct] == 0)


@pytest.mark.parametrize("norm,eps_grid,huge", [
    ("linf", [0.0, 0.01, 0.03, 0.06], 1.0),
    ("l2", [0.0, 0.3, 0.6, 1.2], 28.0)])
def test_fmnist_robust_accuracy_monotone_in_eps(fmnist, norm, eps_grid, huge):
  lf, _, x, y = fmnist
  x, y = jnp.asarray(x[:N_FMNIST]), jnp.asarray(y[:N_FMNIST])
  attack = _fab_jit(lf, norm=norm, steps=10, targeted=True, n_target_classes=3)
  clean = float(np.mean(np.argmax(np.asarray(lf(x)), 1) == np.asarray(y)))
  accs = [float(np.mean(attack(x, y, jax.random.key(0), e)[1]["robust"]))
          for e in eps_grid + [huge]]
  assert accs[0] == pytest.approx(clean)
  assert all(a >= b for a, b in zip(accs, accs[1:])), accs
  assert accs[-2] < accs[0]
  assert accs[-1] == 0.0, accs


# --------------------------------------------------------------------------
# Cross-check against torchattacks' FAB (slow).


@pytest.mark.slow
def test_fab_t_matches_torchattacks(capsys):
  """Robust accuracy of FAB-T (as in AutoAttack: 9 targets, 100 steps, 1
  restart) vs torchattacks.FAB(multi_targeted=True) on the same MLP."""
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  from reference_models import (flax_logits_fn, fmnist_reference, to_torch_images,
                                torch_model)
  from tsjax.data.images import DatasetNotPreparedError
  n = 500
  try:
    model, params, x, y = fmnist_reference()       # n_test = 500
  except DatasetNotPreparedError as e:
    pytest.skip(f"Fashion-MNIST missing: {e}")
  lf = flax_logits_fn(model, params)
  net = torch_model(params)
  x, y = x[:n], y[:n]
  xt, yt = to_torch_images(x), torch.from_numpy(np.asarray(y)).long()
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)    # 2 busy threads on a shared 2-core CPU crawl
  rows = []
  try:
    compiled, t_compile = {}, {}
    for norm, eps in [("linf", 0.02), ("linf", 0.05), ("linf", 0.1),
                      ("l2", 0.5)]:
      if norm not in compiled:
        t0 = time.time()
        compiled[norm] = jax.jit(
            lambda x, y, k, e, norm=norm: fab(lf, x, y, k, norm=norm, eps=e,
                                              steps=100, restarts=1,
                                              targeted=True,
                                              n_target_classes=9)
        ).lower(xj, yj, jax.random.key(0), eps).compile()
        t_compile[norm] = time.time() - t0
      t0 = time.time()
      x_adv, info = compiled[norm](xj, yj, jax.random.key(0), eps)
      x_adv.block_until_ready()
      t_jax = time.time() - t0
      t0 = time.time()
      ref = torchattacks.FAB(net, norm={"linf": "Linf", "l2": "L2"}[norm],
                             eps=eps, steps=100, n_restarts=1,
                             multi_targeted=True, n_classes=10, seed=0)
      xa = ref(xt, yt)
      t_torch = time.time() - t0
      with torch.no_grad():
        pred = net(xa).argmax(1).numpy()
      pert = _norms((xa - xt).numpy(), norm)
      robust_torch = (pred == np.asarray(y)) | (pert > eps)
      acc_torch = float(np.mean(robust_torch))
      robust_jax = np.asarray(info["robust"])
      acc_jax = float(np.mean(robust_jax))
      n_diff = int(np.sum(robust_jax != robust_torch))
      rows.append((norm, eps, acc_jax, acc_torch, n_diff, t_jax, t_torch))
  finally:
    torch.set_num_threads(threads)
  with capsys.disabled():
    print(f"\nFAB-T, Fashion-MNIST MLP, n={n}, 9 targets, 100 steps")
    print("norm  eps    tsjax  torchattacks  diff(pp)  #examples differing"
          "  t_tsjax  t_torch")
    for norm, eps, aj, at, nd, tj, tt in rows:
      print(f"{norm:5s} {eps:<5} {aj:6.3f} {at:9.3f}     {100 * (aj - at):+6.2f}"
            f"  {nd:10d}           {tj:6.1f}s  {tt:6.1f}s")
    print("tsjax compile: " + ", ".join(f"{k} {v:.1f}s"
                                        for k, v in t_compile.items()))
  tol = max(0.005, 2 / n)
  for norm, eps, aj, at, _, _, _ in rows:
    assert abs(aj - at) <= tol + 1e-9, (norm, eps, aj, at)

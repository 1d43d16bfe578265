"""Tests of ddpm/fid.py: FID and IS against closed forms, statistics files, feature plumbing."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm import fid, inception


def _random_covariance(rng, d, n=None):
  a = rng.normal(size=(d, n or 2 * d))
  return a @ a.T / a.shape[1]


# ---- statistics --------------------------------------------------------------------------------
def test_compute_statistics_is_mean_and_unbiased_covariance():
  x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = fid.compute_statistics(x)
  x64 = x.astype(np.float64)
  centred = x64 - x64.sum(0) / 50
  np.testing.assert_allclose(mu, x64.sum(0) / 50, rtol=1e-12)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12, atol=1e-14)
  assert mu.dtype == sigma.dtype == np.float64


@pytest.mark.parametrize("features,match", [(np.zeros((1, 4)), "at least 2"),
                                            (np.zeros((4,)), r"\[N, D\]"),
                                            (np.full((3, 2), np.nan), "NaN")])
def test_compute_statistics_rejects_bad_features(features, match):
  with pytest.raises(ValueError, match=match):
    fid.compute_statistics(features)


# ---- FID ---------------------------------------------------------------------------------------
def test_identical_sets_give_zero():
  feats = np.random.default_rng(1).normal(size=(500, 32))
  mu, sigma = fid.compute_statistics(feats)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def _diagonal_closed_form(mu1, s1, mu2, s2):
  return np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))


def test_diagonal_gaussians_match_closed_form():
  rng = np.random.default_rng(2)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  np.testing.assert_allclose(got, _diagonal_closed_form(mu1, s1, mu2, s2), rtol=1e-10)


def test_commonly_rotated_gaussians_match_closed_form():
  # sigma_i = Q diag(s_i) Q^T: full covariances whose FID is still the diagonal closed form.
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
  s1, s2 = rng.uniform(0.1, 3, 12), rng.uniform(0.1, 3, 12)
  got = fid.frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
  np.testing.assert_allclose(got, _diagonal_closed_form(mu1, s1, mu2, s2), rtol=1e-8)


def test_one_dimensional_gaussians():
  # W2^2 between N(m1, v1) and N(m2, v2) is (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2.
  got = fid.frechet_distance(np.array([1.5]), np.array([[4.0]]), np.array([-0.5]),
                             np.array([[0.25]]))
  np.testing.assert_allclose(got, 2.0 ** 2 + (2.0 - 0.5) ** 2, rtol=1e-12)


def test_symmetric_and_positive_for_full_covariances():
  rng = np.random.default_rng(4)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  c1, c2 = _random_covariance(rng, 10), _random_covariance(rng, 10)
  d12, d21 = fid.frechet_distance(mu1, c1, mu2, c2), fid.frechet_distance(mu2, c2, mu1, c1)
  np.testing.assert_allclose(d12, d21, rtol=1e-8)
  assert d12 > 0


def test_singular_covariances_give_finite_results():
  # Fewer samples than dimensions, as with small eval sets and 2048-d features.
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(6, 20)), rng.normal(size=(6, 20)) + 1.0
  mu_a, s_a = fid.compute_statistics(a)
  mu_b, s_b = fid.compute_statistics(b)
  assert np.linalg.matrix_rank(s_a) < 20
  d = fid.frechet_distance(mu_a, s_a, mu_b, s_b)
  assert np.isfinite(d) and d > 0
  assert abs(fid.frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-3


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r"\[3, 3\]"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


# ---- IS ----------------------------------------------------------------------------------------
def test_uniform_predictions_score_one():
  mean, std = fid.inception_score(np.zeros((100, 1008)), num_splits=10)
  np.testing.assert_allclose(mean, 1.0, rtol=1e-12)
  assert std < 1e-12


@pytest.mark.parametrize("k", [2, 10, 1008])
def test_confident_balanced_predictions_score_k(k):
  num_splits, per_class = 2, 2
  labels = np.arange(num_splits * per_class * k) % k  # every split uses every class equally
  logits = 1e3 * np.eye(k)[labels]                    # p(y|x) one-hot to float64 precision
  mean, std = fid.inception_score(logits, num_splits=num_splits)
  np.testing.assert_allclose(mean, k, rtol=1e-10)
  assert std < 1e-9 * k


def test_inception_score_matches_direct_formula():
  rng = np.random.default_rng(6)
  logits = rng.normal(scale=3, size=(60, 7))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for part in (p[:20], p[20:40], p[40:]):
    py = part.mean(0)
    scores.append(np.exp(np.mean(np.sum(part * np.log(part / py), axis=1))))
  mean, std = fid.inception_score(logits, num_splits=3)
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
  assert 1.0 <= mean <= 7.0


def test_inception_score_splits_like_the_reference_code_when_n_is_not_a_multiple():
  # Salimans et al.'s code takes part i = [i * N // splits, (i + 1) * N // splits): for N = 23
  # and 4 splits the boundaries 0, 5, 11, 17, 23 (np.array_split would cut at 6, 12, 18).
  rng = np.random.default_rng(8)
  logits = rng.normal(scale=2, size=(23, 5))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for lo, hi in ((0, 5), (5, 11), (11, 17), (17, 23)):
    part = p[lo:hi]
    py = part.mean(0)
    scores.append(np.exp(np.mean(np.sum(part * np.log(part / py), axis=1))))
  mean, std = fid.inception_score(logits, num_splits=4)
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
  # The split matters: np.array_split's parts give another score on these logits.
  other = []
  for part in np.array_split(p, 4):
    py = part.mean(0)
    other.append(np.exp(np.mean(np.sum(part * np.log(part / py), axis=1))))
  assert abs(np.mean(other) - mean) > 1e-6


def test_inception_score_rejects_bad_splits():
  with pytest.raises(ValueError, match="num_splits"):
    fid.inception_score(np.zeros((5, 3)), num_splits=6)


# ---- statistics files --------------------------------------------------------------------------
def test_statistics_round_trip_and_atomic_write(tmp_path):
  rng = np.random.default_rng(7)
  mu, sigma = rng.normal(size=5), _random_covariance(rng, 5)
  path = str(tmp_path / "sub" / "ref_stats.npz")
  fid.save_statistics(path, mu, sigma)
  fid.save_statistics(path, mu, sigma)  # overwriting is fine
  mu2, sigma2 = fid.load_statistics(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  assert os.listdir(tmp_path / "sub") == ["ref_stats.npz"]  # no temp files left
  with np.load(path) as data:  # pytorch-fid / TTUR key names
    assert sorted(data.files) == ["mu", "sigma"]


def test_statistics_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    fid.load_statistics(str(tmp_path / "nope.npz"))
  np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
  with pytest.raises(ValueError, match=r"missing key\(s\) \['sigma'\]"):
    fid.load_statistics(str(tmp_path / "bad.npz"))
  with pytest.raises(ValueError, match=r"\(3,\) and \(2, 2\)"):
    fid.save_statistics(str(tmp_path / "x.npz"), np.zeros(3), np.eye(2))
  assert not (tmp_path / "x.npz").exists()


# ---- feature plumbing --------------------------------------------------------------------------
class TinyClassifier(nn.Module):
  """A stand-in for a digits/MNIST classifier: penultimate features and logits."""
  num_classes: int = 5

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
    return h, nn.Dense(self.num_classes)(h)

  def embed(self, x):
    return self(x)[0]


@pytest.fixture(scope="module")
def tiny_classifier():
  module = TinyClassifier()
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  images = np.random.default_rng(8).integers(0, 256, (13, 8, 8, 1), dtype=np.uint8)
  return module, variables, images


def test_classifier_feature_fn_matches_direct_apply(tiny_classifier):
  module, variables, images = tiny_classifier
  # 13 images, chunks of 4 -> rounded up to 8 (8 devices): exercises padding of the last chunk.
  features_fn = fid.classifier_feature_fn(module, variables, batch_size=4)
  feats, logits = features_fn(images)
  want_f, want_l = module.apply(variables, images.astype(np.float32) / 127.5 - 1)
  assert feats.shape == (13, 8) and logits.shape == (13, 5)
  np.testing.assert_allclose(feats, want_f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, want_l, rtol=1e-5, atol=1e-6)

  embed_fn = fid.classifier_feature_fn(module, variables, method="embed", batch_size=8,
                                       devices=jax.local_devices()[:2])
  feats2, none = embed_fn(images)
  assert none is None
  np.testing.assert_allclose(feats2, want_f, rtol=1e-5, atol=1e-6)


def test_features_in_batches_array_and_iterable(tiny_classifier):
  module, variables, images = tiny_classifier
  features_fn = fid.classifier_feature_fn(module, variables, batch_size=8)
  whole_f, whole_l = features_fn(images)
  seen = []

  def recording_fn(batch):
    seen.append(batch.shape[0])
    return features_fn(batch)

  f, l = fid.features_in_batches(recording_fn, images, batch_size=5)
  assert seen == [5, 5, 3]
  np.testing.assert_allclose(f, whole_f, rtol=1e-6)
  np.testing.assert_allclose(l, whole_l, rtol=1e-6)
  f2, _ = fid.features_in_batches(features_fn, iter([images[:6], images[6:]]), progress=True)
  np.testing.assert_allclose(f2, whole_f, rtol=1e-6)
  with pytest.raises(ValueError, match="no images"):
    fid.features_in_batches(features_fn, iter([]))


def test_feature_fn_from_config(tmp_path):
  config = ml_collections.ConfigDict({"eval": {"feature_extractor": "none",
                                               "inception_weights": "", "batch_size": 8}})
  assert fid.feature_fn_from_config(config) is None
  config.eval.feature_extractor = "inception"
  config.eval.inception_weights = str(tmp_path / "missing.npz")
  with pytest.raises(inception.InceptionWeightsError, match="missing.npz"):
    fid.feature_fn_from_config(config)

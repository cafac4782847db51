"""The float64 arithmetic of FID, IS and precision/recall against references and known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from varkit.errors import EvaluationError
from varkit.evaluate.scores import (
    FeatureStats,
    frechet_distance,
    frechet_distance_of_features,
    inception_score,
    manifold_radii,
    precision_recall,
)


def reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula as the TTUR and ADM code write it (np.cov, scipy's sqrtm)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / math.sqrt(d)
    return (rng.standard_normal((n, d)) @ mix + shift).astype(np.float32)


@pytest.mark.parametrize(("n", "m", "d"), [(400, 300, 16), (200, 250, 64)])
def test_frechet_distance_equals_the_scipy_reference(n, m, d):
    x, y = features(0, n, d), features(1, m, d, shift=0.3)
    expected = reference_fid(x.astype(np.float64), y.astype(np.float64))
    assert expected > 0.1
    assert frechet_distance(FeatureStats.of(x), FeatureStats.of(y)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_of_features(x, y) == pytest.approx(expected, rel=1e-9)


def test_stats_match_numpy_and_are_float64():
    x = features(2, 300, 12)
    stats = FeatureStats.of(x)
    assert stats.mean.dtype == np.float64 and stats.cov.dtype == np.float64 and stats.count == 300
    assert np.allclose(stats.mean, x.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    assert np.allclose(stats.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=0, atol=1e-12)


@given(seed=st.integers(0, 2**16), n=st.integers(3, 40), d=st.integers(2, 24), shift=st.floats(0, 3))
def test_frechet_distance_is_zero_for_identical_sets_and_symmetric(seed, n, d, shift):
    x, y = features(seed, n, d), features(seed + 1, n + 3, d, shift)
    scale = float(np.trace(np.cov(x, rowvar=False))) + 1.0
    assert abs(frechet_distance_of_features(x, x)) <= 1e-9 * scale
    assert abs(frechet_distance(FeatureStats.of(x), FeatureStats.of(x))) <= 1e-9 * scale
    assert frechet_distance_of_features(x, y) == pytest.approx(
        frechet_distance_of_features(y, x), rel=1e-9, abs=1e-9
    )
    assert frechet_distance_of_features(x, y) >= -1e-9 * scale


def test_the_span_shortcut_equals_the_full_computation():
    # fewer images than dimensions: computed in the span of the features, same value
    x, y = features(3, 20, 64), features(4, 30, 64, shift=0.5)
    full = frechet_distance(FeatureStats.of(x), FeatureStats.of(y))
    assert frechet_distance_of_features(x, y) == pytest.approx(full, rel=1e-8)


@given(
    mu=st.lists(st.floats(-5, 5), min_size=1, max_size=6),
    sd1=st.lists(st.floats(0.05, 4), min_size=6, max_size=6),
    sd2=st.lists(st.floats(0.05, 4), min_size=6, max_size=6),
)
def test_diagonal_gaussians_have_the_closed_form(mu, sd1, sd2):
    # FID(N(m1, diag s1²), N(m2, diag s2²)) = |m1 - m2|² + Σ (s1 - s2)²
    d = len(mu)
    a = FeatureStats(mean=np.array(mu), cov=np.diag(np.square(sd1[:d])))
    b = FeatureStats(mean=np.zeros(d), cov=np.diag(np.square(sd2[:d])))
    expected = float(np.sum(np.square(mu)) + np.sum((np.array(sd1[:d]) - np.array(sd2[:d])) ** 2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_inception_score_of_known_logits():
    classes = 10
    confident = np.full((1000, 1008), -1000.0)
    confident[np.arange(1000), np.arange(1000) % classes] = 1000.0
    # each image sure of one class, the classes uniform: exp(KL) = exp(log 10) = 10 in every split
    mean, std = inception_score(confident, split_size=250)
    assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0, abs=1e-9)
    # every image the same prediction: IS 1
    assert inception_score(np.tile(np.random.default_rng(0).standard_normal(1008), (100, 1)))[
        0
    ] == pytest.approx(1.0)
    # two classes at p = 0.75 / 0.25 for half the images and mirrored for the others:
    # KL = 0.75 log 1.5 + 0.25 log 0.5 per image
    logits = np.zeros((4, 2))
    logits[:2, 0] = logits[2:, 1] = math.log(3)
    expected = math.exp(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert inception_score(logits)[0] == pytest.approx(expected, rel=1e-12)


def test_inception_score_splits_like_adm():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((12, 5)) * 3
    mean, std = inception_score(logits, split_size=5)  # splits of 5, 5 and 2
    parts = [inception_score(logits[s : s + 5], split_size=5)[0] for s in (0, 5, 10)]
    assert mean == pytest.approx(np.mean(parts)) and std == pytest.approx(np.std(parts))


def line(values) -> np.ndarray:
    """Points on a line in 3-D."""
    return np.array([[v, 0.0, 0.0] for v in values])


def test_manifold_radii_are_the_kth_neighbour_distance():
    radii = manifold_radii(line(range(10)), k=3)  # squared distances
    # the ends see their 3rd neighbour at 3, the next at 2 (one on each side ... then 2 more)
    assert radii.tolist() == [9.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 9.0]


def test_precision_recall_of_constructed_sets():
    ref = line(range(10))
    # the reference itself plus four far-away points: 10 of 14 samples lie on the reference
    # manifold; every reference point is covered by its own copy
    samples = line([*range(10), 1000, 1001, 1002, 1003])
    assert precision_recall(ref, samples, k=3) == (pytest.approx(10 / 14), 1.0)
    # samples far away: nothing in either manifold
    assert precision_recall(ref, line([500, 501, 502, 503, 504]), k=3) == (0.0, 0.0)
    # samples covering half the reference densely: all precise, half recalled
    # (the sample balls have radius 0.3 around 0..4.5, reaching reference points 0..4)
    half = line(np.arange(0, 4.6, 0.1))
    precision, recall = precision_recall(ref, half, k=3)
    assert precision == 1.0 and recall == pytest.approx(0.5)


@given(seed=st.integers(0, 2**16), n=st.integers(5, 30), m=st.integers(5, 30))
def test_precision_and_recall_swap_with_the_sets(seed, n, m):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, 4)), rng.standard_normal((m, 4)) + rng.uniform(0, 2)
    p_ab, r_ab = precision_recall(a, b)
    p_ba, r_ba = precision_recall(b, a)
    assert p_ab == r_ba and r_ab == p_ba
    assert 0.0 <= p_ab <= 1.0 and 0.0 <= r_ab <= 1.0


def test_too_few_images_are_refused():
    with pytest.raises(EvaluationError, match="at least 2 images"):
        FeatureStats.of(np.zeros((1, 4)))
    with pytest.raises(EvaluationError, match="more than 3 images"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
    with pytest.raises(EvaluationError, match="different sizes"):
        frechet_distance_of_features(np.zeros((5, 4)), np.zeros((5, 3)))

"""The arithmetic of sample-quality metrics, in float64: Fréchet distance, Inception
Score, and precision/recall of Kynkäänniemi et al. (2019).

Everything here takes features as arrays ``(n, d)`` (any float dtype; computed in
float64) and knows nothing of networks or images. The definitions follow the ADM
evaluator (``guided-diffusion/evaluations/evaluator.py``), which VAR, LlamaGen and most
papers since report with:

- FID: ``|mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)`` with unbiased covariances.
  The trace of the square root is the sum of the singular values of ``S1^½ S2^½``
  (symmetric eigenproblems and an SVD) rather than scipy's general ``sqrtm`` of
  ``S1 S2``: the same number to ~1e-9 on full-rank covariances, without complex
  round-off or ADM's eps fallback on singular ones, and 0 to rounding for equal ones. When both sets have
  fewer images than feature dimensions, the distance is computed exactly in the span
  of their centred features, which is small.
- IS: ``exp(E[KL(p(y|x) || p(y))])`` on the softmax of the Inception logits, averaged
  over splits of 5 000 images (ADM's split size; 10 splits for 50 000 images).
- Precision / recall with ``k = 3``: a sample counts for precision when it lies within
  the distance of some reference image to that image's k-th nearest reference
  neighbour; recall swaps the roles of the two sets. All samples and all reference
  images take part (ADM: 50 000 samples against its 10 000 reference images).
"""

from __future__ import annotations

import attrs
import numpy as np

from varkit.errors import EvaluationError

#: Images per Inception Score split (ADM's evaluator).
IS_SPLIT_SIZE = 5000
#: Neighbourhood size of precision and recall (Kynkäänniemi et al.; ADM).
PR_NEIGHBOURS = 3
#: Bytes of one block of pairwise distances (float64), bounding the memory of precision/recall.
_BLOCK_BYTES = 256 * 2**20


@attrs.frozen(kw_only=True, eq=False)
class FeatureStats:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` of a feature set, float64.

    Attributes:
        count: images the statistics were computed from (None when given as they are,
            e.g. by the ADM reference batch).
    """

    mean: np.ndarray
    cov: np.ndarray
    count: int | None = None

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        """The statistics of features ``(n, d)``; two passes in float64 over blocks of rows."""
        features = _as_2d(features, "features")
        n, d = features.shape
        if n < 2:
            raise EvaluationError(f"a covariance needs at least 2 images; this set has {n}")
        mean = np.zeros(d)
        for block in _row_blocks(n, d):
            mean += features[block].astype(np.float64).sum(0)
        mean /= n
        cov = np.zeros((d, d))
        for block in _row_blocks(n, d):
            centred = features[block].astype(np.float64) - mean
            cov += centred.T @ centred
        return cls(mean=mean, cov=cov / (n - 1), count=n)


def _as_2d(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise EvaluationError(f"{what} must be (n, d), got shape {x.shape}")
    return x


def _row_blocks(n: int, width: int) -> list[slice]:
    rows = max(1, _BLOCK_BYTES // (8 * max(width, 1)))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _floor(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below its round-off set to 0 (a singular
    covariance has exact zeros, which eigh returns as ±1e-16 · scale; their square roots
    would add ~1e-8 · scale each)."""
    tol = max(float(eigenvalues.max(initial=0.0)), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, u = np.linalg.eigh(matrix)
    return (u * np.sqrt(_floor(w))) @ u.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """``tr((S1 S2)^½)`` for symmetric PSD ``S1``, ``S2``: the sum of the singular values
    of ``S1^½ S2^½`` (its Gram matrix ``S2^½ S1 S2^½`` is similar to ``S1 S2``).

    Singular values come without squaring, so an ill-conditioned covariance keeps its
    small directions (eigenvalues of ``S1^½ S2 S1^½`` would lose them below
    ``sqrt(eps)``), and ``S1 = S2`` gives ``tr(S1)`` to rounding.
    """
    return float(np.linalg.svd(_sqrt_psd(cov1) @ _sqrt_psd(cov2), compute_uv=False).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance of two Gaussians (FID when the features are Inception's)."""
    if a.mean.shape != b.mean.shape or a.cov.shape != b.cov.shape:
        raise EvaluationError(
            f"the two sets have features of different sizes ({a.mean.shape[0]} and {b.mean.shape[0]}); "
            "both must come from the same network and layer"
        )
    diff = a.mean.astype(np.float64) - b.mean.astype(np.float64)
    cov1, cov2 = a.cov.astype(np.float64), b.cov.astype(np.float64)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2))


def frechet_distance_of_features(x: np.ndarray, y: np.ndarray) -> float:
    """``frechet_distance`` of the statistics of features ``(n, d)`` and ``(m, d)``.

    With ``n + m - 2 < d`` both covariances live in the span of the centred features,
    and the distance is computed there (an ``(n + m)``-sized problem instead of a
    ``d``-sized one): the same value, exactly zero-ish for identical sets.
    """
    x, y = _as_2d(x, "features").astype(np.float64), _as_2d(y, "features").astype(np.float64)
    n, m, d = len(x), len(y), x.shape[1]
    if y.shape[1] != d:
        raise EvaluationError(f"the two sets have features of different sizes ({d} and {y.shape[1]})")
    if min(n, m) < 2:
        raise EvaluationError(f"a covariance needs at least 2 images; the sets have {n} and {m}")
    if n + m - 2 >= d:
        return frechet_distance(FeatureStats.of(x), FeatureStats.of(y))
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    u, s, _ = np.linalg.svd(np.concatenate([xc, yc]).T, full_matrices=False)  # u: (d, n + m)
    basis = u[:, s > s.max(initial=0.0) * max(d, n + m) * np.finfo(np.float64).eps]
    px, py = xc @ basis, yc @ basis  # (n, r), (m, r): the features in the basis of their span
    cov1, cov2 = px.T @ px / (n - 1), py.T @ py / (m - 1)
    diff = mx - my
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """Inception Score of class logits ``(n, c)``: mean and standard deviation over splits.

    Splits of ``split_size`` images in order (the last may be smaller), as ADM's
    evaluator cuts them.
    """
    logits = _as_2d(logits, "logits").astype(np.float64)
    if len(logits) == 0:
        raise EvaluationError("the Inception Score needs at least one image")
    scores = []
    for start in range(0, len(logits), split_size):
        part = logits[start : start + split_size]
        log_p = part - part.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))  # log softmax, finite even where p underflows
        p = np.exp(log_p)
        marginal = p.mean(0)
        log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))  # p = 0 wherever the marginal is 0
        kl = (p * (log_p - log_marginal)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray, b_norms: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + b_norms[None, :]
    return np.maximum(d, 0.0)


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURS) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in the same set ``(n,)``.

    A point is its own nearest neighbour (distance 0), so the k-th neighbour is the
    ``k``-th entry after it in sorted order, as in ADM's evaluator.
    """
    x = _as_2d(features, "features").astype(np.float64)
    if len(x) <= k:
        raise EvaluationError(
            f"precision and recall with k={k} need more than {k} images in each set; this one has {len(x)}"
        )
    norms = (x * x).sum(1)
    radii = np.empty(len(x))
    for block in _row_blocks(len(x), len(x)):
        radii[block] = np.partition(_squared_distances(x[block], x, norms), k, axis=1)[:, k]
    return radii


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each point ``(n, d)``, whether it lies in some ball (centre, squared radius)."""
    norms = (centres * centres).sum(1)
    hit = np.zeros(len(points), dtype=bool)
    for block in _row_blocks(len(points), len(centres)):
        hit[block] = (_squared_distances(points[block], centres, norms) <= radii[None, :]).any(1)
    return hit


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURS
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``samples`` against ``reference``.

    Args:
        reference: features of the real images ``(n, d)``.
        samples: features of the generated images ``(m, d)``.
        k: neighbourhood size.

    Returns:
        ``(precision, recall)``: the share of samples inside the reference manifold,
        and the share of reference images inside the samples' manifold.
    """
    ref = _as_2d(reference, "reference features").astype(np.float64)
    gen = _as_2d(samples, "sample features").astype(np.float64)
    if ref.shape[1] != gen.shape[1]:
        raise EvaluationError(
            f"the two sets have features of different sizes ({ref.shape[1]} and {gen.shape[1]})"
        )
    precision = _inside(gen, ref, manifold_radii(ref, k)).mean()
    recall = _inside(ref, gen, manifold_radii(gen, k)).mean()
    return float(precision), float(recall)

"""Spectral channels of an embedding batch: anisotropy (made well-posed), effective rank, std of normalised rows.

Each needs ``d >= 2`` features and raises a ValueError below: they measure how a batch spreads across directions,
and with one feature there is one direction, so anisotropy would be 0, the effective rank 1 and the normalised
rows +-1 whatever the data (see `topo_callbacks.functional`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from topo_callbacks.functional._validation import as_real, check_points

__all__ = ["anisotropy", "anisotropy_ratio", "effective_rank", "l2_normalized_std"]

#: The lower quantile of the observable spectrum that stands in for the smallest eigenvalue (see `anisotropy`).
LOW_QUANTILE = 0.1
#: How far beyond the isotropic ratio counts as fully anisotropic: the write-up's "over 100 is collapse".
COLLAPSE_RATIO = 100.0


#: Above this many observable dimensions the spectra are computed in float32 (cubic cost; see `_gram_spectrum`).
FLOAT64_MAX_DIM = 512


def _gram_spectrum(x: Tensor, *, center: bool) -> Tensor:
    """Ascending eigenvalues of the smaller Gram matrix of ``x`` (centred if asked): the squared singular values.

    float64 up to `FLOAT64_MAX_DIM` dimensions, float32 above: an eigendecomposition is cubic in that size and
    float32 keeps 1e-7 of the top eigenvalue, far below what either channel resolves (callers treat eigenvalues
    under that floor as zero).
    """
    n, d = x.shape
    dtype = torch.float64 if min(n, d) <= FLOAT64_MAX_DIM else torch.float32
    x = x.to(dtype)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    gram = x @ x.T if n <= d else x.T @ x  # the smaller side has the same non-zero spectrum
    return torch.linalg.eigvalsh(gram).to(torch.float64).clamp_min(0.0)


def _spectrum_eps(n: int, d: int) -> float:
    """The epsilon of the dtype the spectra of an ``(n, d)`` batch are computed in: their noise floor."""
    return torch.finfo(torch.float64 if min(n, d) <= FLOAT64_MAX_DIM else torch.float32).eps


def _observable_spectrum(x: Tensor) -> tuple[Tensor, float]:
    """The ``min(n - 1, d)`` eigenvalues of the sample covariance that can be non-zero, and their dtype's eps."""
    n, d = x.shape
    eig = _gram_spectrum(x, center=True) / max(n - 1, 1)
    return eig[-min(n - 1, d) :], _spectrum_eps(n, d)


def _ratio_of_spectrum(eig: Tensor, eps: float) -> float:
    """`anisotropy_ratio` of the observable covariance eigenvalues ``eig`` (ascending) with noise floor ``eps``."""
    top = float(eig[-1])
    if top <= 0.0:
        return math.inf
    low = float(torch.quantile(eig, LOW_QUANTILE))
    if low <= top * eig.numel() * eps:
        return math.inf
    return top / low


def _anisotropy_of_ratio(ratio: float, n: int, d: int) -> float:
    """`anisotropy` of an `anisotropy_ratio` for a batch of ``n`` rows of width ``d``."""
    if math.isinf(ratio):
        return 1.0
    m, big = min(n - 1, d), max(n - 1, d)
    score = math.log(ratio / _isotropic_ratio(m, big)) / math.log(COLLAPSE_RATIO)
    return min(max(score, 0.0), 1.0)


def _rank_of_spectrum(eig: Tensor, eps: float = 1e-7) -> float:
    """`effective_rank` from the ascending eigenvalues of the (uncentred) Gram matrix."""
    s = eig.clamp_min(0.0).sqrt()
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def _spectra_from_gram(gram: Tensor, n: int, d: int, *, precise: bool = True) -> tuple[float, float]:
    """`anisotropy` and `effective_rank` of a batch from its ``n x n`` Gram matrix ``x x^T`` (float64), for
    ``d > n``: the non-zero spectra of ``x x^T`` and ``x^T x`` agree, and centring the rows is ``H (x x^T) H``
    with ``H = I - 11^T/n``, so no ``d``-wide product is needed. ``precise=False`` when ``gram`` was summed from
    float32 products: the centred spectrum is then taken in float32, as `_gram_spectrum` does above
    `FLOAT64_MAX_DIM` (the anisotropy reads its top and its lower decile, exact enough in float32). The effective
    rank sums the square roots of all eigenvalues, and float32 rounding noise on the zero ones of a rank-deficient
    batch (~1e-7 of the top, ~3e-4 after the root, times ``n``) would add up to several percent of it: that
    spectrum is always taken in float64.

    Example:
        >>> import torch
        >>> x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> a, r = _spectra_from_gram(x @ x.T, 16, 64)
        >>> abs(a - anisotropy(x)) < 1e-9, abs(r - effective_rank(x)) < 1e-9
        (True, True)
    """
    raw = torch.linalg.eigvalsh(gram).to(torch.float64).clamp_min(0.0)
    centred = gram - gram.mean(dim=0, keepdim=True)
    centred -= centred.mean(dim=1, keepdim=True)  # eigvalsh reads one triangle: no need to symmetrise again
    eig = torch.linalg.eigvalsh(centred if precise else centred.to(torch.float32)).to(torch.float64)
    eig = eig.clamp_min(0.0) / max(n - 1, 1)
    ratio = _ratio_of_spectrum(eig[-min(n - 1, d) :], _spectrum_eps(n, d))
    return _anisotropy_of_ratio(ratio, n, d), _rank_of_spectrum(raw)


@lru_cache(maxsize=256)
def _isotropic_ratio(m: int, big: int, quantile: float = LOW_QUANTILE) -> float:
    """Expected ``lambda_max / lambda_(quantile)`` for isotropic Gaussian data, from the Marchenko-Pastur law.

    The non-zero spectrum of an ``m``-by-``big`` Gaussian sample covariance (``m <= big``) follows MP with aspect
    ratio ``q = m / big``, support ``[(1 - sqrt q)^2, (1 + sqrt q)^2]``; ratios do not depend on the scale.
    """
    q = m / big
    a, b = (1 - math.sqrt(q)) ** 2, (1 + math.sqrt(q)) ** 2
    # x = a + (b - a)(1 - cos t)/2 removes the square-root edges of the density, so a plain grid integrates well.
    t = np.linspace(0.0, math.pi, 4097)
    xs = a + (b - a) * (1 - np.cos(t)) / 2
    dens = np.sqrt(np.clip((b - xs) * (xs - a), 0, None)) / (2 * math.pi * q * np.maximum(xs, 1e-300))
    integrand = dens * (b - a) * np.sin(t) / 2
    cdf = np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * np.diff(t))])
    cdf /= cdf[-1]
    low = float(np.interp(quantile, cdf, xs))
    # Finite m: the largest of m eigenvalues sits below the edge b; use the (1 - 1/(2m)) quantile instead.
    top = float(np.interp(1.0 - 0.5 / m, cdf, xs)) if m > 1 else low
    return top / max(low, 1e-300)


def anisotropy_ratio(x: Tensor) -> float:
    """``lambda_max / lambda_(q)`` of the covariance of ``x``, with ``lambda_(q)`` its lower-decile eigenvalue.

    The raw ratio the write-up names (largest over smallest eigenvalue) is infinite for ``n <= d`` and near the
    smallest eigenvalue's noise floor otherwise; the lower decile of the ``min(n - 1, d)`` observable eigenvalues
    is a stable stand-in. Returns ``inf`` when that eigenvalue is numerically zero. Needs ``n >= 2``, ``d >= 2``.

    Example:
        >>> import torch
        >>> x = torch.cat([torch.eye(11), -torch.eye(11)]) * torch.tensor([3.0] + [1.0] * 10)
        >>> round(anisotropy_ratio(x), 6)  # variance 9 along one axis, 1 along the ten others
        9.0
    """
    x = check_points(x, min_rows=2, min_features=2)
    eig, eps = _observable_spectrum(x)
    return _ratio_of_spectrum(eig, eps)


def anisotropy(x: Tensor) -> float:
    r"""Anisotropy of an embedding batch in [0, 1], 0 for isotropic data at any ``n`` and ``d``.

    The write-up's anisotropy is ``lambda_max / lambda_min`` of the embedding covariance with "over 100 is
    collapse"; taken literally it is infinite whenever ``n <= d`` and above 100 for isotropic Gaussian batches
    when ``n < ~1.5 d`` (Marchenko-Pastur). Made well-posed:

    .. math:: A = \mathrm{clip}\left(\frac{\log(r / r_{\mathrm{iso}}(n, d))}{\log 100}, 0, 1\right)

    where ``r`` is :func:`anisotropy_ratio` (top eigenvalue over the lower-decile eigenvalue of the
    ``min(n - 1, d)`` observable ones) and ``r_iso`` the same ratio expected for isotropic data of the same
    ``n`` and ``d`` from the Marchenko-Pastur law. So ``A = 1`` means "100 times more elongated than an
    isotropic batch of this size", the write-up's threshold read relative to the right baseline.
    A batch whose points all coincide, or whose spread lies in fewer than ~90% of the observable directions
    (rank ``k`` data with ``k < 0.9 min(n - 1, d)``), scores 1. Rank-``k`` data is only told apart from
    isotropic data when the batch can see more than ``k`` directions: with ``n - 1 <= k`` it cannot.

    Args:
        x: embeddings, shape ``(n, d)`` with ``n >= 2`` and ``d >= 2``.

    Returns:
        A float in [0, 1].

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> iso = torch.randn(512, 64, generator=g)
        >>> anisotropy(iso) < 0.1
        True
        >>> flat = torch.randn(512, 2, generator=g) @ torch.randn(2, 64, generator=g)
        >>> anisotropy(flat + 1e-3 * torch.randn(512, 64, generator=g))
        1.0
    """
    x = check_points(x, min_rows=2, min_features=2)
    n, d = x.shape
    return _anisotropy_of_ratio(anisotropy_ratio(x), n, d)


def effective_rank(x: Tensor, *, eps: float = 1e-7) -> float:
    """RankMe effective rank: ``exp`` of the entropy of the normalised singular values of ``x`` (Garrido et al.).

    ``p_k = s_k / sum(s) + eps``; the result is between 1 and ``min(n, d)`` (0 for an all-zero batch). As in
    RankMe the embeddings are not centred, so a batch collapsed to one non-zero point has rank 1. Needs ``d >= 2``
    (with one feature the rank is 1 whatever the data); ``eps`` is a finite number >= 0.

    Example:
        >>> import torch
        >>> round(effective_rank(torch.eye(4)), 3)
        4.0
    """
    x = check_points(x, min_features=2)
    eps = as_real(eps, "eps", "a finite number >= 0")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"`eps` must be a finite number >= 0; got {eps!r}.")
    return _rank_of_spectrum(_gram_spectrum(x, center=False), eps)


def l2_normalized_std(x: Tensor) -> float:
    """Mean over dimensions of the std of the L2-normalised rows (lightly's SimSiam collapse statistic).

    About ``1/sqrt(d)`` for isotropic data and 0 under complete collapse (all rows pointing the same way).
    Rows of norm zero are left as zero. Needs ``n >= 2``, ``d >= 2``.

    Example:
        >>> import torch
        >>> l2_normalized_std(torch.ones(8, 3))
        0.0
    """
    x = check_points(x, min_rows=2, min_features=2).to(torch.float64)
    z = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return float(z.std(dim=0).mean())


def dead_unit_fraction(x: Tensor) -> float:
    """Share of the columns (units) that are exactly 0 on every row: units that did not fire on any sampled input, a
    ReLU layer's dead or dormant units (Lu et al. 2019; Sokar et al. 2023 with tau = 0). 0 for a layer whose outputs
    are never exactly 0 (GELU, a linear output). One reduction over the rows (of their magnitudes).

    Example:
        >>> import torch
        >>> dead_unit_fraction(torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]]))
        0.5
    """
    return _dead_unit_fraction(check_points(x, min_rows=1, min_features=1))


def _dead_unit_fraction(x: Tensor) -> float:
    """`dead_unit_fraction` of points already checked (`collapse_index` validates its input once)."""
    return float(silent_units(x).float().mean())


def silent_units(x: Tensor) -> Tensor:
    """Which columns (units) of ``x`` (finite rows) are exactly 0 on every row: a boolean mask, one reduction over the
    rows (a column is 0 everywhere exactly when its largest magnitude is). What `dead_unit_fraction` averages, and
    what the monitor's unit checks sum over ranks.

    Example:
        >>> import torch
        >>> silent_units(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, -2.0]])).tolist()
        [True, False, False]
    """
    return x.abs().amax(dim=0) == 0


def mean_cosine(x: Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows: 0 for isotropic data (about), 1 when every row points
    the same way. Computed as ``(||sum_i u_i||^2 - n) / (n (n - 1))`` over the unit rows ``u_i`` (O(n d)). Rows of
    norm zero count as zero vectors. Needs ``n >= 2``, ``d >= 2``.

    Example:
        >>> import torch
        >>> round(mean_cosine(torch.ones(8, 3)), 6)
        1.0
        >>> round(mean_cosine(torch.eye(4)), 6)
        0.0
    """
    x = check_points(x, min_rows=2, min_features=2).to(torch.float64)
    n = x.shape[0]
    norms = x.norm(dim=1, keepdim=True)
    z = torch.where(norms > 0, x / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(x))
    total = z.sum(dim=0)
    self_terms = float((z * z).sum())
    return float((total.dot(total) - self_terms) / (n * (n - 1)))

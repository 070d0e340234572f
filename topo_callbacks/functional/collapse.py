"""The collapse index (CI): the write-up's formula with each term made well-posed, plus side channels."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from topo_callbacks.engine.reduction import flag_betti
from topo_callbacks.functional._geometry import BatchGeometry, PairDistances
from topo_callbacks.functional._validation import as_real, check_eps, check_points, check_prime
from topo_callbacks.functional.spectral import _dead_unit_fraction, _spectra_from_gram, anisotropy, effective_rank
from topo_callbacks.functional.topology import _h0_from_tree, persistence_entropy

__all__ = [
    "BENCHMARK_WEIGHTS",
    "PAPER_WEIGHTS",
    "TERMS",
    "CollapseReport",
    "collapse_index",
    "resolve_weights",
    "scale_from_quantile",
]

#: The terms a CI can weigh, each in [0, 1] with 1 meaning collapsed.
TERMS: tuple[str, ...] = ("betti", "entropy", "anisotropy", "rank", "std")
#: The write-up's weights: ``CI = 0.4 (1 - b1/b0) + 0.3 (1 - PE) + 0.3 A``.
PAPER_WEIGHTS: Mapping[str, float] = {"betti": 0.4, "entropy": 0.3, "anisotropy": 0.3}
#: The monitors' default: the weighting the collapse-scenario benchmark chose on its calibration seeds (equal
#: weights over the subset of terms that best separated collapse runs from healthy twins and controls; README,
#: "Does it work?"). With it the monitors' default rise rule is ``max_rise=0.2``.
BENCHMARK_WEIGHTS: Mapping[str, float] = {"betti": 0.25, "entropy": 0.25, "anisotropy": 0.25, "rank": 0.25}
#: Default scale rule: the distance at which a point has this many neighbours on average.
DEFAULT_NEIGHBORS = 8.0


@dataclasses.dataclass(frozen=True)
class CollapseReport:
    """The CI of one batch, every term and channel behind it, as plain floats.

    Terms (each in [0, 1], 1 = collapsed): ``betti_term = 1 - min(b1/b0, 1)``, ``entropy_term = 1 - PE``,
    ``anisotropy_term = A``, ``rank_term = 1 - (erank - 1)/(min(n, d) - 1)``, ``std_term = 1 - min(sqrt(d) std, 1)``.
    Channels: ``b0``, ``b1``, ``persistence_entropy`` (normalised, of the H0 diagram), ``effective_rank``,
    ``std_l2`` (lightly's statistic), ``mean_cosine`` (over pairs of rows), ``b0_fraction = b0/n``,
    ``nonfinite_fraction`` (rows dropped before the call, filled in by the monitors), ``dead_fraction`` (units 0 on
    every row: dead ReLU units; `topo_callbacks.functional.dead_unit_fraction`). ``eps`` is the scale used,
    ``time_s`` the wall time of the call.
    """

    ci: float
    betti_term: float
    entropy_term: float
    anisotropy_term: float
    rank_term: float
    std_term: float
    b0: float
    b1: float
    persistence_entropy: float
    effective_rank: float
    std_l2: float
    mean_cosine: float
    b0_fraction: float
    nonfinite_fraction: float
    n: int
    d: int
    eps: float
    time_s: float
    dead_fraction: float = 0.0
    #: The H0 persistence diagram (all births 0): the death scales, i.e. the minimum-spanning-tree edge lengths
    #: of the (normalised) rows. Not a scalar, so not in `as_dict`.
    h0_deaths: tuple[float, ...] = dataclasses.field(default=(), repr=False, compare=False)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """All scalar fields as ``{prefix + name: float}``, ready for a logger.

        Example:
            >>> import torch
            >>> rep = collapse_index(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
            >>> sorted(rep.as_dict("collapse/"))[:3]
            ['collapse/anisotropy_term', 'collapse/b0', 'collapse/b0_fraction']
        """
        return {
            f"{prefix}{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "h0_deaths"
        }

    def term(self, name: str) -> float:
        """The value of one CI term by its weight name (``"betti"``, ``"entropy"``, ...)."""
        return float(getattr(self, f"{name}_term"))


def resolve_weights(weights: str | Mapping[str, float]) -> dict[str, float]:
    """Validate CI weights: ``"paper"``, ``"benchmark"`` or a mapping from term names in `TERMS` to non-negative floats.

    Raises:
        ValueError: for an unknown preset, an unknown term, a negative or non-finite weight, or all zeros.

    Example:
        >>> resolve_weights("paper")
        {'betti': 0.4, 'entropy': 0.3, 'anisotropy': 0.3}
        >>> resolve_weights("benchmark")["rank"]
        0.25
        >>> resolve_weights({"rank": 1, "std": 1})
        {'rank': 1.0, 'std': 1.0}
    """
    if isinstance(weights, str):
        presets = {"paper": PAPER_WEIGHTS, "benchmark": BENCHMARK_WEIGHTS}
        if weights not in presets:
            raise ValueError(
                f"`weights` must be 'paper', 'benchmark' or a mapping of {list(TERMS)} to floats; got {weights!r}."
            )
        return dict(presets[weights])
    if not isinstance(weights, Mapping):
        raise ValueError(
            f"`weights` must be 'paper' or a mapping of {list(TERMS)} to floats; got {type(weights).__name__}."
        )
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"`weights` has unknown term(s) {unknown}; accepted terms are {list(TERMS)}.")
    out = {}
    for key, given in weights.items():
        value = as_real(given, f"weights[{key!r}]", "a finite number >= 0")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"`weights[{key!r}]` must be a finite number >= 0; got {given!r}.")
        out[key] = value
    if sum(out.values()) <= 0:
        raise ValueError(f"`weights` must have at least one weight > 0; got {dict(weights)!r}.")
    return out


def _check_quantile(quantile: object) -> float:
    accepted = "a number in (0, 1) or None"
    value = as_real(quantile, "eps_quantile", accepted)
    if not 0.0 < value < 1.0:
        raise ValueError(f"`eps_quantile` must be {accepted}; got {quantile!r}.")
    return value


def scale_from_quantile(dist: Tensor, quantile: float | None = None) -> float:
    """A positive Vietoris-Rips scale: the ``quantile`` of the off-diagonal pairwise distances.

    ``quantile=None`` (the default) takes ``min(DEFAULT_NEIGHBORS / (n - 1), 0.5)``: the distance at which a point
    has 8 neighbours on average. High-dimensional data concentrate distances: at the median distance nearly
    everything is connected and ``b0 = 1, b1 = 0`` for healthy and collapsed data alike, while at a fixed low
    quantile a small batch has no loops at all and a large one has tens of thousands (slow to reduce). A fixed
    mean degree keeps the eps-graph sparse and its loops countable at every batch size. When the quantile is 0
    (many duplicates) the smallest positive distance is used, and 1.0 when all points coincide (any positive
    scale then gives the same complex).

    Example:
        >>> import torch
        >>> scale_from_quantile(torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]]), 0.5)
        2.0
    """
    n = dist.shape[0]
    if quantile is None:
        quantile = min(DEFAULT_NEIGHBORS / max(n - 1, 1), 0.5)
    quantile = _check_quantile(quantile)
    iu = torch.triu_indices(n, n, offset=1, device=dist.device)
    values = dist[iu[0], iu[1]]
    if values.numel() == 0:
        return 1.0
    # A selection, not torch.quantile's full sort: this runs at every calibration check.
    k = min(max(round(quantile * (values.numel() - 1)), 0), values.numel() - 1)
    eps = float(values.kthvalue(k + 1).values)
    if eps <= 0.0:
        positive = values[values > 0]
        eps = float(positive.min()) if positive.numel() else 1.0
    return eps


def topology_rows(x: Tensor, normalize: str = "l2") -> Tensor:
    """The rows the topological terms are computed on: float64, L2-normalised unless ``normalize="none"``.

    Example:
        >>> import torch
        >>> topology_rows(torch.tensor([[3.0, 4.0]])).tolist()
        [[0.6, 0.8]]
    """
    z = x.to(torch.float64)
    if normalize == "l2":
        z = z / z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return z


def h0_death_scales(x: Tensor, normalize: str = "l2") -> tuple[float, ...]:
    """The H0 persistence diagram's death scales (all births 0) of the rows as the topological terms see them: the
    minimum-spanning-tree edge lengths of the distinct (normalised) rows, ascending. What `CollapseReport.h0_deaths`
    holds, without the rest of the index.

    Example:
        >>> import torch
        >>> h0_death_scales(torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0]]))  # two rows point the same way
        (1.4142135623730951,)
    """
    x = check_points(x, min_rows=1)
    if x.shape[0] < 2:
        return ()
    pairs = _distinct_pairs(x, normalize)[1]
    return tuple(float(v) for v in pairs.tree().tolist())


def _distinct_pairs(x: Tensor, normalize: str) -> tuple[BatchGeometry, PairDistances]:
    """The geometry of ``x`` and the precise squared distances of its distinct topology rows.

    Duplicate rows are dominated vertices: dropping them changes no Betti number and no non-zero H0 bar. When
    float32 products cannot resolve the close pairs of the whole batch (`PairDistances.refine`), the Gram matrix is
    summed again from float64 products.
    """
    geo = BatchGeometry.of(x, normalize)
    pairs = geo.distances()
    if not pairs.refine():
        geo = BatchGeometry.of(x, normalize, precise=True)
        pairs = geo.distances()
        pairs.refine()
    return geo, pairs


def _scale(pairs: PairDistances, deaths: Tensor, quantile: float | None) -> float:
    """`scale_from_quantile` of the distinct rows' exact distances, recomputing only the pairs near the quantile."""
    m = pairs.keep.numel()
    count = m * (m - 1) // 2
    if count == 0:
        return 1.0
    if quantile is None:
        quantile = min(DEFAULT_NEIGHBORS / max(m - 1, 1), 0.5)
    quantile = _check_quantile(quantile)
    k = min(max(round(quantile * (count - 1)), 0), count - 1)
    eps = math.sqrt(max(pairs.quantile(k), 0.0))
    if eps <= 0.0:
        positive = deaths[deaths > 0]
        eps = float(positive.min()) if positive.numel() else 1.0
    return eps


def _check_eps_in_range(eps: float, *, low: float, high: float, normalize: str) -> None:
    """Raise when ``eps`` is outside ``[low, high]``, the nonzero pairwise distances: the Betti term saturates."""
    if low <= eps <= high:
        return
    rows = "L2-normalised rows" if normalize == "l2" else "rows"
    effect = "joins every point into one clique" if eps > high else "leaves every point isolated"
    raise ValueError(
        f"`eps`={eps!r} lies outside [{low:.4g}, {high:.4g}], the range of this batch's nonzero pairwise distances"
        f" (of the {rows}, as the topological terms see them): it {effect}, so the Betti term is 1 whatever the"
        " data. Pass an eps inside that range, eps=None to take the scale from this batch, or strict_eps=False"
        " for a scale calibrated on other batches and held fixed (a collapsed batch then legitimately has every"
        " distance below eps)."
    )


def collapse_index(
    x: Tensor,
    *,
    eps: float | None = None,
    eps_quantile: float | None = None,
    weights: str | Mapping[str, float] = "paper",
    normalize: Literal["l2", "none"] = "l2",
    coeff: int = 2,
    betti: tuple[int, int] | None = None,
    strict_eps: bool = True,
) -> CollapseReport:
    r"""Collapse index of an embedding batch, with every term and channel.

    .. math:: \mathrm{CI} = \frac{\sum_t w_t\, T_t}{\sum_t w_t}, \qquad
              \text{paper: } 0.4\,(1 - \min(b_1/b_0, 1)) + 0.3\,(1 - \mathrm{PE}) + 0.3\,A

    - ``b0, b1``: Betti numbers of the Vietoris-Rips complex at scale ``eps`` (exact, `betti_numbers`);
      the ratio is clipped to [0, 1].
    - ``PE``: persistence entropy of the H0 diagram divided by ``log(#bars)``, in [0, 1].
    - ``A``: `anisotropy`, the eigenvalue ratio normalised against isotropic data of the same ``n`` and ``d``.

    The topological terms are computed on L2-normalised rows by default (``normalize="l2"``): it makes the
    scale ``eps`` meaningful across training (the norm of embeddings drifts) while complete collapse still
    shrinks all distances. ``eps=None`` takes `scale_from_quantile` of this batch's pairwise distances (by default
    the distance at which points have 8 neighbours on average); that scale moves with the data, so for a series
    of batches calibrate it once and pass it with ``strict_eps=False`` (the monitors do this): a collapse then
    shows as the eps-graph filling in (``b0 -> 1, b1 -> 0``).

    An ``eps`` passed for this batch alone is checked against it: outside ``[min, max]`` of the nonzero pairwise
    distances of the (normalised) rows, every point is isolated or all are joined, and the Betti term is 1
    whatever the data, so that raises a ValueError that gives the range. A scale held fixed across batches is
    not checked (``strict_eps=False``, or ``betti`` given, which means the caller keeps the complex at that scale
    across checks): there a collapsed batch legitimately has every distance below ``eps``.

    Cost: one pass over ``x`` in column chunks builds an ``n x n`` Gram matrix of the centred (normalised) rows, from
    which come the distances, the tree, the scale and, for ``d > n``, both spectra (the ``d x d`` side for
    ``d <= n``); only ``n x n`` matrices and ``n x 512`` chunks are float64, never a copy of ``x``. Wide, large
    batches take float32 products summed in float64: every decision and value that needs the exact float64
    distance (duplicates, pairs within ``eps``, the scale's pair, the tree's edges) is recomputed from the rows'
    differences where the products' rigorous error bound leaves it open, so the Betti numbers and the scale are
    the float64 ones; the tree's edges are recomputed exactly, the tree is minimal for distances precise to ~1e-7
    (1e-5 at worst); see ``topo_callbacks.functional._geometry``.

    Args:
        x: embeddings, shape ``(n, d)``, ``n >= 2``, ``d >= 2`` (with one feature the spectral terms are constant
            whatever the data; see `topo_callbacks.functional`), finite.
        eps: Vietoris-Rips scale (> 0), or None for the quantile heuristic.
        eps_quantile: the quantile used when ``eps`` is None, in (0, 1); None for the 8-neighbour rule.
        weights: ``"paper"`` or a mapping from term names (``betti``, ``entropy``, ``anisotropy``, ``rank``,
            ``std``) to non-negative weights; the CI is the weighted mean of the terms, so it lies in [0, 1].
        normalize: ``"l2"`` (default) or ``"none"``: how rows are scaled before the topological terms.
        coeff: prime p of the homology coefficients Z/p.
        betti: ``(b0, b1)`` already known for these points at ``eps`` (e.g. from an `MMHMEngine` kept across
            checks, as the monitors do); requires ``eps``. None computes them here. ``eps`` is then not checked
            against this batch's distances.
        strict_eps: check a given ``eps`` against the range of this batch's nonzero (normalised) pairwise
            distances. False for a scale calibrated on other batches and held fixed (`CollapseIndex(eps=...)`
            passes False).

    Returns:
        A `CollapseReport`.

    Raises:
        ValueError: for a non-2-D, too small or non-finite ``x``, ``d < 2``, ``eps <= 0``, a given ``eps``
            outside this batch's distances (unless ``strict_eps=False`` or ``betti`` is given), a number given as
            a string, unknown weights or options.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> healthy = torch.randn(256, 32, generator=g)
        >>> eps = collapse_index(healthy).eps
        >>> collapsed = healthy[:1] + 1e-3 * torch.randn(256, 32, generator=g)
        >>> collapse_index(healthy, eps=eps).ci < collapse_index(collapsed, eps=eps, strict_eps=False).ci
        True
        >>> # for this batch alone that eps joins every point, and its Betti term would say nothing
        >>> collapse_index(collapsed, eps=eps)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: `eps`=... lies outside [...], the range of this batch's nonzero pairwise distances (...
    """
    start = time.perf_counter()
    x = check_points(x, min_rows=2, min_features=2)
    w = resolve_weights(weights)
    coeff = check_prime(coeff)
    if normalize not in ("l2", "none"):
        raise ValueError(f"`normalize` must be 'l2' or 'none'; got {normalize!r}.")
    if eps_quantile is not None:
        _check_quantile(eps_quantile)
    if not isinstance(strict_eps, bool):
        raise ValueError(f"`strict_eps` must be True or False; got {strict_eps!r}.")
    if eps is not None:
        eps = check_eps(eps)
    elif betti is not None:
        raise ValueError("`betti` needs the `eps` it was computed at; got eps=None.")
    if betti is not None and not (
        len(betti) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) for b in betti)
        and betti[0] >= 1
        and betti[1] >= 0
    ):
        raise ValueError(f"`betti` must be (b0, b1) ints with b0 >= 1 and b1 >= 0; got {betti!r}.")
    n, d = x.shape

    geo, pairs = _distinct_pairs(x, normalize)
    deaths = pairs.tree()
    if eps is None:
        eps = _scale(pairs, deaths, eps_quantile)
    elif strict_eps and betti is None and deaths.numel():
        _check_eps_in_range(eps, low=float(deaths[0]), high=math.sqrt(pairs.maximum()), normalize=normalize)
    if betti is None:
        i, j = pairs.within(eps)
        roots, cycles = flag_betti(pairs.keep.numel(), i, j, coeff)
        b0, b1 = int(torch.unique(roots).numel()), int(cycles.sum())
    else:
        b0, b1 = betti
    pe = persistence_entropy(_h0_from_tree(deaths))
    if d > n:  # the n x n side: both spectra from the Gram matrix already summed
        aniso, erank = _spectra_from_gram(geo.raw_gram(), n, d, precise=geo.precise)
    else:
        aniso, erank = anisotropy(x), effective_rank(x)
    std = geo.std_l2

    terms = {
        "betti": 1.0 - min(b1 / b0, 1.0),
        "entropy": 1.0 - pe,
        "anisotropy": aniso,
        "rank": 1.0 - min(max((erank - 1.0) / max(min(n, d) - 1, 1), 0.0), 1.0),
        "std": 1.0 - min(std * math.sqrt(d), 1.0),
    }
    ci = sum(w[k] * terms[k] for k in w) / sum(w.values())
    return CollapseReport(
        ci=float(ci),
        betti_term=terms["betti"],
        entropy_term=terms["entropy"],
        anisotropy_term=terms["anisotropy"],
        rank_term=terms["rank"],
        std_term=terms["std"],
        b0=float(b0),
        b1=float(b1),
        persistence_entropy=pe,
        effective_rank=erank,
        std_l2=std,
        mean_cosine=geo.mean_cosine,
        b0_fraction=b0 / n,  # per input row: a batch of duplicates is one component out of n rows
        nonfinite_fraction=0.0,
        n=n,
        d=d,
        eps=float(eps),
        time_s=time.perf_counter() - start,
        dead_fraction=_dead_unit_fraction(x),
        h0_deaths=tuple(float(v) for v in deaths.tolist()),
    )

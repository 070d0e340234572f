"""Point-by-point comparisons of two embeddings of the same examples (a probe re-embedded at consecutive checks).

Row ``i`` of ``previous`` and of ``current`` is the same example, so how the cloud *moved* is measurable, not only
how it looks: the representation analogue of the neuron monitor's bi-Lipschitz statistics. Rows are compared after
L2 normalisation (the topological channels' convention), so a uniform rescaling moves nothing.

- `neighbourhood_preservation`: the mean overlap of each point's k nearest neighbours before and after (1: the
  neighbourhoods kept, about ``k/n``: scrambled).
- `contracted_pairs`: of the k-nearest-neighbour pairs before, the share whose distance shrank below ``factor``
  times what it was (points merging).
- `h0_diagram_distance`: the optimal-transport (1-Wasserstein) cost between the two diagrams' death scales (all
  births are 0, so the sorted deaths are matched in order), over the previous diagram's total persistence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from topo_callbacks.functional._validation import check_points

__all__ = ["contracted_pairs", "h0_diagram_distance", "neighbourhood_preservation"]


def _pair(previous: Tensor, current: Tensor, k: int) -> tuple[Tensor, Tensor]:
    a = check_points(previous, name="previous", min_rows=2, min_features=1).to(torch.float64)
    b = check_points(current, name="current", min_rows=2, min_features=1).to(torch.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"`previous` and `current` must hold the same examples; got {a.shape[0]} and {b.shape[0]} rows."
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < a.shape[0]:
        raise ValueError(f"`k` must be an int in [1, n - 1] = [1, {a.shape[0] - 1}]; got {k!r}.")
    unit = lambda z: z / z.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)  # noqa: E731
    return unit(a), unit(b.to(a.device))


def _knn(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    dist = torch.cdist(z, z)
    dist.fill_diagonal_(float("inf"))
    values, idx = dist.topk(k, dim=1, largest=False)
    return idx, values


def neighbourhood_preservation(previous: Tensor, current: Tensor, k: int = 10) -> float:
    """Mean over points of ``|kNN_previous(i) & kNN_current(i)| / k``.

    Example:
        >>> import torch
        >>> x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
        >>> neighbourhood_preservation(x, 3 * x)  # a rescaling keeps every neighbourhood
        1.0
        >>> neighbourhood_preservation(x, x[torch.randperm(50, generator=torch.Generator().manual_seed(1))]) < 0.5
        True
    """
    a, b = _pair(previous, current, k)
    before, _ = _knn(a, k)
    after, _ = _knn(b, k)
    n = a.shape[0]
    hit = torch.zeros(n, n, dtype=torch.bool, device=a.device)
    hit.scatter_(1, before, True)
    return float(hit.gather(1, after).sum()) / (n * k)


def contracted_pairs(previous: Tensor, current: Tensor, k: int = 10, factor: float = 0.5) -> float:
    """Share of the previous k-nearest-neighbour pairs ``(i, j)`` with ``|u'_i - u'_j| < factor |u_i - u_j|``.

    Example:
        >>> import torch
        >>> x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
        >>> contracted_pairs(x, x)
        0.0
        >>> contracted_pairs(x, torch.ones(40, 6) + 1e-3 * x)  # everything merged
        1.0
    """
    if not 0.0 < float(factor) < 1.0:
        raise ValueError(f"`factor` must be in (0, 1); got {factor!r}.")
    a, b = _pair(previous, current, k)
    idx, before = _knn(a, k)
    after = (b[:, None, :] - b[idx]).norm(dim=2)
    return float((after < factor * before).double().mean())


def h0_diagram_distance(previous: Sequence[float], current: Sequence[float]) -> float:
    """The optimal-transport cost between the death scales of two H0 diagrams with all births 0 (matched in sorted
    order, the shorter padded with zeros), over the previous total persistence (0 when both are empty).

    Example:
        >>> h0_diagram_distance([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
        0.0
        >>> round(h0_diagram_distance([0.1, 0.2, 0.3], [0.05, 0.1, 0.15]), 3)  # every bar halved
        0.5
    """
    a = sorted((float(v) for v in previous), reverse=True)
    b = sorted((float(v) for v in current), reverse=True)
    size = max(len(a), len(b))
    a += [0.0] * (size - len(a))
    b += [0.0] * (size - len(b))
    total = sum(a)
    moved = sum(abs(x - y) for x, y in zip(a, b, strict=True))
    if total == 0.0:
        return 0.0 if moved == 0.0 else float("inf")
    return moved / total

"""Input checks shared by the functional API; every message says what was wrong and what is accepted.

The scalar checks (`as_real`, `check_eps`, `check_prime`) live in `topo_callbacks._validation`, below the engine,
and are re-exported here for the modules that import them from this one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from topo_callbacks._validation import all_finite, as_real, check_eps, check_prime

__all__ = ["all_finite", "as_real", "check_eps", "check_points", "check_prime", "drop_nonfinite"]


def check_points(x: Tensor, *, name: str = "x", min_rows: int = 1, min_features: int = 1) -> Tensor:
    """Validate a point cloud ``(n, d)`` and return it as a floating tensor, detached from autograd.

    The functional API is not differentiable (Betti numbers, bars chosen by a spanning tree and eigenvalue
    quantiles carry no useful gradient): inputs that require grad are computed on ``x.detach()``, and results
    never require grad. ``min_features=2`` is for the embedding channels (see `topo_callbacks.functional`): with a
    single feature a cloud has no shape across directions to measure.

    Raises:
        ValueError: when ``x`` is not a 2-D finite tensor with at least ``min_rows`` rows and ``min_features``
            columns.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape (n, d); got {type(x).__name__}.")
    if x.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D tensor of shape (n, d) (one row per point); got shape {tuple(x.shape)}."
            " Pool or flatten the extra dimensions first."
        )
    if x.shape[0] < min_rows:
        raise ValueError(f"`{name}` must have at least {min_rows} row(s); got shape {tuple(x.shape)}.")
    if x.shape[1] < min_features:
        if min_features == 1:
            raise ValueError(f"`{name}` must have at least one column (d >= 1); got shape {tuple(x.shape)}.")
        raise ValueError(
            f"`{name}` must have at least {min_features} features (columns, d >= {min_features}); got shape"
            f" {tuple(x.shape)}. With one feature the embedding channels are constant whatever the data"
            " (anisotropy 0, effective rank 1, normalised rows +-1); the topology functions accept d = 1."
        )
    x = x.detach()
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(
            f"`{name}` holds {bad} row(s) with NaN or Inf; only finite values are accepted."
            " Drop those rows first (the monitors do this and report the count)."
        )
    return x


def drop_nonfinite(rows: Tensor) -> tuple[Tensor, int]:
    """The rows of ``rows`` ``(n, d)`` that are all finite, and how many were dropped.

    Example:
        >>> import torch
        >>> kept, dropped = drop_nonfinite(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]))
        >>> kept.tolist(), dropped
        ([[1.0, 2.0]], 1)
    """
    if all_finite(rows):
        return rows, 0
    finite = torch.isfinite(rows).all(dim=1)
    dropped = int((~finite).sum())
    return (rows[finite] if dropped else rows), dropped

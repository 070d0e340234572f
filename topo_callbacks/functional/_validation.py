"""Input checks shared by the functional API; every message says what was wrong and what is accepted."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_points(x: Tensor, *, name: str = "x", min_rows: int = 1) -> Tensor:
    """Validate a point cloud ``(n, d)`` and return it as a floating tensor.

    Raises:
        ValueError: when ``x`` is not a 2-D finite floating tensor with at least ``min_rows`` rows.
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
    if x.shape[1] < 1:
        raise ValueError(f"`{name}` must have at least one column (d >= 1); got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if not bool(torch.isfinite(x).all()):
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
    finite = torch.isfinite(rows).all(dim=1)
    dropped = int((~finite).sum())
    return (rows[finite] if dropped else rows), dropped


def check_eps(eps: float) -> float:
    """Validate a Vietoris-Rips scale: a finite float > 0."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"`eps` must be a finite number > 0; got {eps!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`eps` must be a finite number > 0; got {eps!r}.")
    return value


def check_prime(coeff: int) -> int:
    """Validate a coefficient field Z/p: p must be a prime."""
    if isinstance(coeff, bool) or not isinstance(coeff, int) or coeff < 2:
        raise ValueError(f"`coeff` must be a prime number (2, 3, 5, ...); got {coeff!r}.")
    if any(coeff % k == 0 for k in range(2, math.isqrt(coeff) + 1)):
        raise ValueError(f"`coeff` must be a prime number (2, 3, 5, ...); got {coeff} which is not prime.")
    return coeff

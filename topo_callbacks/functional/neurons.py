"""The neuron point cloud of a layer: merging statistics, the bi-Lipschitz distortion of a step, sharpness.

Background (Yang, Poggio, Chuang, Ziyin, arXiv 2510.02670): a permutation-equivariant update maps neurons to
neurons and changes their pairwise distances by a factor in ``[1 - eta K, 1 + eta K]``; below ``eta* = 1/K`` two
distinct neurons cannot merge, above it they can. These functions measure that on the weights themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from topo_callbacks.functional._validation import as_real

__all__ = [
    "bilipschitz_constants",
    "directional_curvature",
    "hessian_max_eigenvalue",
    "merging_statistics",
    "neighbour_distances",
    "neighbour_pairs",
    "neuron_points",
    "stability_threshold",
]


def neuron_points(layer: nn.Module, next_layer: nn.Module | None = None) -> Tensor:
    """One row per neuron (output unit) of ``layer``: its incoming weights, then its bias if any.

    Works for ``nn.Linear`` (rows of ``weight``), convolutions (each filter flattened) and any module with a
    ``weight`` whose first dimension indexes the neurons. With ``next_layer``, the neuron's outgoing weights (the
    matching column of the next layer's weight) are appended. Returned detached, float32, on the weights' device.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> neuron_points(nn.Linear(3, 4)).shape, neuron_points(nn.Linear(3, 4), nn.Linear(4, 2)).shape
        (torch.Size([4, 4]), torch.Size([4, 6]))
        >>> neuron_points(nn.Conv2d(3, 8, kernel_size=3)).shape
        torch.Size([8, 28])
    """
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim < 2:
        raise ValueError(f"{type(layer).__name__} has no weight matrix whose rows are neurons.")
    parts = [weight.detach().flatten(1)]
    bias = getattr(layer, "bias", None)
    if isinstance(bias, Tensor):
        parts.append(bias.detach()[:, None])
    if next_layer is not None:
        nxt = getattr(next_layer, "weight", None)
        if not isinstance(nxt, Tensor) or nxt.ndim < 2 or nxt.shape[1] != weight.shape[0]:
            raise ValueError(
                f"`next_layer` must take this layer's {weight.shape[0]} outputs as input (weight of shape"
                f" (out, {weight.shape[0]}, ...)); got {type(next_layer).__name__}."
            )
        parts.append(nxt.detach().transpose(0, 1).flatten(1))  # (neurons, out * kernel)
    return torch.cat(parts, dim=1).to(torch.float32)


def neighbour_distances(points: Tensor) -> Tensor:
    """Pairwise distances of the rows in float64, with ``inf`` on the diagonal (no point is its own neighbour).

    Compute it once and pass it as ``distances=`` to `merging_statistics` and `neighbour_pairs`.

    Example:
        >>> import torch
        >>> neighbour_distances(torch.tensor([[0.0], [2.0]])).tolist()
        [[inf, 2.0], [2.0, inf]]
    """
    x = points.to(torch.float64)
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    return dist


def merging_statistics(
    points: Tensor,
    rel_eps: float = 0.05,
    quantiles: Sequence[float] = (0.0, 0.1, 0.5),
    *,
    distances: Tensor | None = None,
) -> dict[str, float]:
    """Nearest-neighbour distances of the neuron cloud, relative to the median neuron norm.

    Returns ``nn_q{q}`` for each quantile of the nearest-neighbour distances (``nn_q0`` is the closest pair),
    ``merged_fraction`` (neurons with a neighbour closer than ``rel_eps`` times the median norm) and ``scale``
    (the median norm). Distances in float64; pass ``distances=neighbour_distances(points)`` to reuse them.

    Example:
        >>> import torch
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.01], [-1.0, 0.0]])
        >>> s = merging_statistics(w, rel_eps=0.05)
        >>> round(s["nn_q0"], 4), s["merged_fraction"]
        (0.01, 0.5)
    """
    if points.ndim != 2 or points.shape[0] < 2:
        raise ValueError(f"`points` must be (n >= 2, d); got shape {tuple(points.shape)}.")
    if not 0 < as_real(rel_eps, "rel_eps", "a finite number > 0") < math.inf:
        raise ValueError(f"`rel_eps` must be a finite number > 0; got {rel_eps!r}.")
    dist = neighbour_distances(points) if distances is None else distances
    nearest = dist.min(dim=1).values
    scale = float(points.to(torch.float64).norm(dim=1).median())
    scale = scale if scale > 0 else 1.0
    rel = nearest / scale
    q = torch.tensor(list(quantiles), dtype=torch.float64, device=rel.device)
    values = torch.quantile(rel, q)
    out = {f"nn_q{round(float(k) * 100)}": float(v) for k, v in zip(q, values, strict=True)}
    out["merged_fraction"] = float((rel < rel_eps).double().mean())
    out["scale"] = scale
    return out


def neighbour_pairs(points: Tensor, k: int = 5, *, distances: Tensor | None = None) -> Tensor:
    """The ``(m, 2)`` index pairs ``i < j`` where ``j`` is among the ``k`` nearest neighbours of ``i`` or back.

    Example:
        >>> import torch
        >>> neighbour_pairs(torch.tensor([[0.0], [1.0], [5.0]]), k=1).tolist()
        [[0, 1], [1, 2]]
    """
    n = points.shape[0]
    k = min(k, n - 1)
    dist = neighbour_distances(points) if distances is None else distances
    nearest = dist.topk(k, dim=1, largest=False).indices
    rows = torch.arange(n, device=points.device).repeat_interleave(k)
    pairs = torch.stack([rows, nearest.flatten()], dim=1)
    pairs = torch.stack([pairs.min(dim=1).values, pairs.max(dim=1).values], dim=1)
    return torch.unique(pairs, dim=0)


def bilipschitz_constants(
    before: Tensor, after: Tensor, pairs: Tensor | None = None, *, contraction: float = 0.5, k: int = 5
) -> dict[str, float]:
    """Empirical bi-Lipschitz constants of the map ``before[i] -> after[i]`` over neighbour pairs.

    ``lip_min`` / ``lip_max`` are the smallest and largest ``||a_i - a_j|| / ||b_i - b_j||`` over ``pairs``
    (default: the ``k``-nearest-neighbour pairs of ``before``; pairs at distance 0 before are skipped), and
    ``contracted`` the number of pairs whose ratio fell below ``contraction``. Below the critical learning rate
    the ratios stay in ``[1 - eta K, 1 + eta K]``; a ratio near 0 is two neurons merging.

    Example:
        >>> import torch
        >>> before = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
        >>> after = torch.tensor([[0.0, 0.0], [0.2, 0.0], [4.0, 0.0]])
        >>> c = bilipschitz_constants(before, after, k=1)
        >>> round(c["lip_min"], 3), round(c["lip_max"], 3), c["contracted"]
        (0.2, 1.9, 1.0)
    """
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"`before` and `after` must be (n, d) of one shape; got {tuple(before.shape)}, "
                         f"{tuple(after.shape)}.")  # fmt: skip
    if not 0 < as_real(contraction, "contraction", "a finite number > 0") < math.inf:
        raise ValueError(f"`contraction` must be a finite number > 0; got {contraction!r}.")
    if pairs is None:
        pairs = neighbour_pairs(before, k)
    b, a = before.to(torch.float64), after.to(torch.float64)
    d_before = (b[pairs[:, 0]] - b[pairs[:, 1]]).norm(dim=1)
    d_after = (a[pairs[:, 0]] - a[pairs[:, 1]]).norm(dim=1)
    keep = d_before > 0
    if not bool(keep.any()):
        return {"lip_min": float("nan"), "lip_max": float("nan"), "contracted": 0.0}
    ratio = d_after[keep] / d_before[keep]
    return {
        "lip_min": float(ratio.min()),
        "lip_max": float(ratio.max()),
        "contracted": float((ratio < contraction).sum()),
    }


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """The inner product of two parameter-shaped lists of tensors."""
    return torch.stack([(x * y).sum() for x, y in zip(xs, ys, strict=True)]).sum()


def _hvp(loss_fn: Callable[[], Tensor], params: list[Tensor], vec: list[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    return list(torch.autograd.grad(_dot(grads, vec), params))


def hessian_max_eigenvalue(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    iters: int = 20,
    init: Sequence[Tensor] | None = None,
    preconditioner: Sequence[Tensor] | None = None,
    tol: float = 1e-4,
) -> tuple[float, list[Tensor]]:
    """Largest-magnitude eigenvalue of the Hessian of ``loss_fn()`` in ``params``, by power iteration on HVPs.

    Returns ``(lambda, vector)``; pass the vector back as ``init`` to warm-start the next call. With
    ``preconditioner`` (one tensor per parameter, e.g. Adam's ``sqrt(v_hat) + eps``) it is the largest eigenvalue
    of ``P^-1/2 H P^-1/2``, the preconditioned sharpness. ``.grad`` fields are not touched. Each iteration costs
    one Hessian-vector product (about two backward passes).

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> lam, _ = hessian_max_eigenvalue(lambda: 3 * w[0] ** 2 + 0.5 * w[1] ** 2, [w], iters=50)
        >>> round(lam, 3)
        6.0
    """
    params = list(params)
    scale = None if preconditioner is None else [p.detach().clamp_min(1e-30).rsqrt() for p in preconditioner]
    if init is None:
        g = torch.Generator(device="cpu").manual_seed(0)
        vec = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    else:
        vec = [v.detach().clone() for v in init]
    lam = 0.0
    for _ in range(iters):
        norm = _dot(vec, vec).sqrt()
        vec = [v / norm for v in vec]
        probe = vec if scale is None else [v * s for v, s in zip(vec, scale, strict=True)]
        hv = _hvp(loss_fn, params, probe)
        if scale is not None:
            hv = [h * s for h, s in zip(hv, scale, strict=True)]
        new = float(_dot(hv, vec))
        vec = [h.detach() for h in hv]
        converged = abs(new - lam) <= tol * max(abs(new), 1e-12)
        lam = new
        if converged:
            break
    norm = _dot(vec, vec).sqrt()
    return lam, [v / norm for v in vec]


def directional_curvature(loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> float:
    """``g^T H g / ||g||^2`` along the gradient ``g`` of ``loss_fn()``: one Hessian-vector product.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 0.0], requires_grad=True)
        >>> directional_curvature(lambda: 3 * w[0] ** 2 + 0.5 * w[1] ** 2, [w])
        6.0
    """
    params = list(params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = [x.detach() for x in grads]
    gg = float(_dot(g, g))
    if gg == 0:
        return 0.0
    hg = torch.autograd.grad(_dot(grads, g), params)
    return float(_dot(hg, g)) / gg


def stability_threshold(optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
    """The edge-of-stability level of ``lr * sharpness`` for ``optimizer``, and whether it is preconditioned.

    Gradient descent with heavy-ball momentum ``beta`` is unstable on a quadratic once ``lr * lambda_max`` passes
    ``2 + 2 beta`` (2 without momentum); Adam once ``lr`` times the preconditioned sharpness passes
    ``(2 + 2 beta1) / (1 - beta1)`` (38 for ``beta1 = 0.9``; Cohen et al., "Adaptive gradient methods at the
    edge of stability").

    Example:
        >>> import torch
        >>> p = [torch.zeros(1, requires_grad=True)]
        >>> stability_threshold(torch.optim.SGD(p, lr=0.1)), stability_threshold(torch.optim.Adam(p))
        ((2.0, False), (38.0, True))
    """
    group = optimizer.param_groups[0]
    if "betas" in group:
        beta1 = float(group["betas"][0])
        return round((2 + 2 * beta1) / (1 - beta1), 12), True
    beta = float(group.get("momentum", 0.0) or 0.0)
    return 2 + 2 * beta, False

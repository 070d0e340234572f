"""torchmetrics Metrics over the functional API."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from topo_callbacks.core.gather import subsample_rows
from topo_callbacks.functional._validation import check_eps, drop_nonfinite
from topo_callbacks.functional.collapse import CollapseReport, collapse_index, resolve_weights

__all__ = ["CollapseIndex"]


class CollapseIndex(Metric):
    r"""Collapse index (CI) of the embeddings seen since the last reset.

    .. math:: \mathrm{CI} = 0.4\,(1 - \min(b_1/b_0, 1)) + 0.3\,(1 - \mathrm{PE}) + 0.3\,A

    with the normalisations of :func:`topo_callbacks.functional.collapse_index` (which does the maths). 0 is a
    healthy, spread-out batch, 1 a fully collapsed one.

    As input to ``forward`` and ``update`` the metric accepts:

    - ``embeddings`` (:class:`~torch.Tensor`): float tensor of shape ``(N, d)``; non-finite rows are dropped
      and counted (see ``nonfinite_fraction`` in the report).

    As output of ``forward`` and ``compute`` the metric returns:

    - ``ci`` (:class:`~torch.Tensor`): a scalar float tensor. The full
      :class:`~topo_callbacks.functional.CollapseReport` of the last ``compute`` is in :attr:`report`.

    Embeddings from all processes are concatenated (``dist_reduce_fx="cat"``) before ``compute``, so under DDP
    every rank gets the CI of the global batch. ``compute`` is a collective: call it on every rank, after at least
    one ``update`` on every rank (``update`` with a ``(0, d)`` tensor is fine).

    Args:
        eps: fixed Vietoris-Rips scale, or None to use the quantile heuristic on each computed batch.
        weights: ``"paper"`` or a mapping of term names to weights.
        max_samples: if set, ``compute`` uses at most this many rows (an evenly spaced subset).
        normalize: ``"l2"`` or ``"none"``, how rows are scaled for the topological terms.
        kwargs: Additional keyword arguments, see :ref:`Metric kwargs` in torchmetrics.

    Example:
        >>> import torch
        >>> from topo_callbacks.metrics import CollapseIndex
        >>> g = torch.Generator().manual_seed(0)
        >>> metric = CollapseIndex()
        >>> metric.update(torch.randn(128, 16, generator=g))
        >>> metric.update(torch.randn(128, 16, generator=g))
        >>> bool(metric.compute() < 0.1)
        True
        >>> metric.report.n
        256
    """

    is_differentiable: bool = False
    higher_is_better: bool = False
    full_state_update: bool = False
    plot_lower_bound: float = 0.0
    plot_upper_bound: float = 1.0

    embeddings: list[Tensor]
    nonfinite: Tensor
    seen: Tensor

    def __init__(
        self,
        eps: float | None = None,
        weights: str | Mapping[str, float] = "paper",
        max_samples: int | None = None,
        normalize: Literal["l2", "none"] = "l2",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.eps = None if eps is None else check_eps(eps)
        self.weights = resolve_weights(weights)
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 2):
            raise ValueError(f"`max_samples` must be an int >= 2 or None; got {max_samples!r}.")
        if normalize not in ("l2", "none"):
            raise ValueError(f"`normalize` must be 'l2' or 'none'; got {normalize!r}.")
        self.max_samples = max_samples
        self.normalize = normalize
        self.report: CollapseReport | None = None
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("nonfinite", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("seen", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, embeddings: Tensor) -> None:
        """Add a batch of embeddings ``(N, d)``."""
        if embeddings.ndim != 2:
            raise ValueError(f"`embeddings` must have shape (N, d); got {tuple(embeddings.shape)}.")
        kept, dropped = drop_nonfinite(embeddings.detach().to(torch.float32))
        self.seen += embeddings.shape[0]
        self.nonfinite += dropped
        self.embeddings.append(kept)

    def compute(self) -> Tensor:
        """The CI of all embeddings seen (all ranks); the full report is stored in :attr:`report`."""
        x = dim_zero_cat(self.embeddings)
        if self.max_samples is not None:
            x = subsample_rows(x, self.max_samples)
        report = collapse_index(x, eps=self.eps, weights=self.weights, normalize=self.normalize)
        seen = max(int(self.seen), 1)
        self.report = dataclasses.replace(report, nonfinite_fraction=int(self.nonfinite) / seen)
        return torch.tensor(self.report.ci, dtype=torch.float32, device=x.device)

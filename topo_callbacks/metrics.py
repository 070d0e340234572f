"""torchmetrics Metrics over the functional API."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from topo_callbacks._validation import check_eps
from topo_callbacks.core.gather import subsample_rows
from topo_callbacks.functional._validation import drop_nonfinite
from topo_callbacks.functional.collapse import CollapseReport, collapse_index, resolve_weights

__all__ = ["CollapseIndex"]


class CollapseIndex(Metric):
    r"""Collapse index (CI) of the embeddings seen since the last reset.

    .. math:: \mathrm{CI} = 0.4\,(1 - \min(b_1/b_0, 1)) + 0.3\,(1 - \mathrm{PE}) + 0.3\,A

    with the normalisations of :func:`topo_callbacks.functional.collapse_index` (which does the maths). 0 is a
    healthy, spread-out batch, 1 a fully collapsed one.

    As input to ``forward`` and ``update`` the metric accepts:

    - ``embeddings`` (:class:`~torch.Tensor`): float tensor of shape ``(N, d)`` with ``d >= 2`` features, the same
      ``d`` at every update; ``N = 0`` is fine. Non-finite rows are dropped and counted (see
      ``nonfinite_fraction`` in the report). Anything else raises a ValueError naming ``embeddings``.

    As output of ``forward`` and ``compute`` the metric returns:

    - ``ci`` (:class:`~torch.Tensor`): a scalar float tensor. The full
      :class:`~topo_callbacks.functional.CollapseReport` of the last ``compute`` is in :attr:`report`.

    Embeddings from all processes are concatenated (``dist_reduce_fx="cat"``) before ``compute``, so under DDP
    every rank gets the CI of the global batch. ``compute`` is a collective: call it on every rank, after at least
    one ``update`` on every rank (``update`` with a ``(0, d)`` tensor is fine). ``compute`` with no ``update`` at
    all, or with fewer than 2 finite rows in total, raises a ValueError that says so; the check reads only the
    (synced) state and adds no collective.

    Args:
        eps: fixed Vietoris-Rips scale, held across computes, or None to use the quantile heuristic on each
            computed batch. Being fixed, it is not checked against each batch's distances (on a collapsed batch
            every distance is below it: that is the collapse; ``collapse_index(..., strict_eps=False)``). With
            ``normalize="l2"`` it must be below 2, the largest distance between unit rows.
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
        if self.eps is not None and normalize == "l2" and self.eps >= 2.0:
            raise ValueError(
                f"`eps` must be below 2 with normalize='l2': L2-normalised rows are at most 2 apart, so eps={eps!r}"
                " joins every point of every batch and the Betti term is always 1. Use a smaller eps, eps=None, or"
                " normalize='none'."
            )
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
        """Add a batch of embeddings ``(N, d)``, ``d >= 2``; non-finite rows are dropped and counted."""
        accepted = "a torch.Tensor of shape (N, d) with at least 2 features (d >= 2)"
        if not isinstance(embeddings, Tensor):
            raise ValueError(f"`embeddings` must be {accepted}; got {type(embeddings).__name__}.")
        if embeddings.ndim != 2 or embeddings.shape[1] < 2:
            shape = tuple(embeddings.shape)
            raise ValueError(f"`embeddings` must be {accepted}; got shape {shape}.")
        # checked here, not left to the concatenation in `compute`, so the message points at the bad batch
        if isinstance(self.embeddings, list) and self.embeddings and embeddings.shape[1] != self.embeddings[0].shape[1]:
            raise ValueError(
                f"`embeddings` has d = {embeddings.shape[1]} features, but the earlier updates since the last reset"
                f" had d = {self.embeddings[0].shape[1]}."
            )
        kept, dropped = drop_nonfinite(embeddings.detach().to(torch.float32))
        self.seen += embeddings.shape[0]
        self.nonfinite += dropped
        self.embeddings.append(kept)

    def compute(self) -> Tensor:
        """The CI of all embeddings seen (all ranks); the full report is stored in :attr:`report`."""
        try:
            return self._compute()
        except Exception:
            # torchmetrics runs compute inside its sync context, whose exit (restoring this rank's own state) an
            # exception skips: the state would stay the gathered one and the next update or compute would fail.
            # Restoring the local cache is local, no collective.
            if getattr(self, "_is_synced", False):
                self.unsync()
            raise

    def _compute(self) -> Tensor:
        # Only the state is read, after torchmetrics synced it: every rank sees the same and raises alike.
        embeddings = self.embeddings
        # Synced, the list is one tensor; a rank that had no update sends an empty 1-D one, so 1-D means no rank had.
        if (isinstance(embeddings, list) and not embeddings) or (
            isinstance(embeddings, Tensor) and embeddings.ndim != 2
        ):
            raise ValueError(
                "CollapseIndex.compute() has no embeddings: update() was never called since the metric was created"
                " or reset. Call update(embeddings) with an (N, d) tensor first (on every rank under DDP)."
            )
        x = dim_zero_cat(embeddings)
        if x.shape[0] < 2:
            raise ValueError(
                f"CollapseIndex needs at least 2 finite embeddings to compute; got {x.shape[0]} ({int(self.seen)} seen,"
                f" {int(self.nonfinite)} non-finite dropped)."
            )
        if self.max_samples is not None:
            x = subsample_rows(x, self.max_samples)
        report = collapse_index(x, eps=self.eps, weights=self.weights, normalize=self.normalize, strict_eps=False)
        seen = max(int(self.seen), 1)
        self.report = dataclasses.replace(report, nonfinite_fraction=int(self.nonfinite) / seen)
        return torch.tensor(self.report.ci, dtype=torch.float32, device=x.device)

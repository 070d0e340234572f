"""One `MMHMEngine` per monitored layer, kept across checks and fed each check's points as edits."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from topo_callbacks.engine import MMHMEngine
from topo_callbacks.functional._geometry import topology_rows_float32

Source = Literal["stream", "probe"]
SOURCES: tuple[str, ...] = ("stream", "probe")


def unit_rows(x: Tensor, normalize: str) -> Tensor:
    """The rows the topology is computed on (`topology_rows`, as `collapse_index` scales them), in float32.

    Normalised in float64 a block of rows at a time: the same values, without a float64 copy of a wide batch.

    Example:
        >>> import torch
        >>> unit_rows(torch.tensor([[3.0, 4.0]]), "l2").tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    return topology_rows_float32(x, normalize)


class EngineTracker:
    """Keeps the Vietoris-Rips complex of a layer's latest check at a fixed eps and returns its (b0, b1).

    ``source="probe"``: the same probe inputs are embedded at every check, so row ``i`` is the same example each
    time; the rows that changed are given to `MMHMEngine.move` and only the modules they touch are re-reduced
    (none, when every edge that changed passes the engine's link condition).
    ``source="stream"``: each check's sample replaces the previous one (`MMHMEngine.remove` of the old ids,
    `MMHMEngine.insert` of the new rows); the engine's storage is kept. A new eps (calibration), device or
    width, or a probe whose rows changed in number, starts a new engine.

    Example:
        >>> import torch
        >>> tracker = EngineTracker("probe")
        >>> angles = torch.arange(12) * (2 * torch.pi / 12)
        >>> ring = torch.stack([angles.cos(), angles.sin()], dim=1)
        >>> tracker.betti(ring, eps=0.6)  # 12 points on a circle, neighbours 0.52 apart
        (1, 1)
        >>> tracker.betti(torch.cat([ring[:11], ring[11:] * 0.1]), eps=0.6)  # one point moves to the centre
        (2, 0)
        >>> tracker.last_edit
        'move 1'
    """

    def __init__(self, source: Source = "stream") -> None:
        if source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}; got {source!r}.")
        self.source = source
        self.engine: MMHMEngine | None = None
        self._ids: Tensor | None = None
        self._rows: Tensor | None = None
        self.resets = 0
        self.last_edit = "none"

    def betti(self, z: Tensor, eps: float) -> tuple[int, int]:
        """(b0, b1) of the points ``z`` (float32 rows) at scale ``eps``, by edits from the previous call."""
        engine, ids, rows = self.engine, self._ids, self._rows
        if engine is None or ids is None or rows is None or not self._compatible(engine, rows, z, eps):
            engine = MMHMEngine(eps, device=z.device, dtype=torch.float32, capacity=max(z.shape[0], 1))
            self._ids = engine.reset(z)
            self.resets += 1
            self.last_edit = f"reset {z.shape[0]}"
        elif self.source == "probe":
            changed = torch.nonzero((rows != z).any(dim=1)).flatten().cpu()
            if changed.numel():
                engine.move(ids[changed], z[changed])
            self.last_edit = f"move {changed.numel()}"
        else:
            engine.remove(ids)
            self._ids = engine.insert(z)
            self.last_edit = f"remove {ids.numel()}, insert {z.shape[0]}"
        self.engine, self._rows = engine, z
        return engine.betti()

    def _compatible(self, engine: MMHMEngine, rows: Tensor, z: Tensor, eps: float) -> bool:
        same_rows = self.source == "stream" or rows.shape[0] == z.shape[0]
        return engine.eps == eps and rows.device == z.device and rows.shape[1] == z.shape[1] and same_rows

    def stats(self) -> dict[str, Any]:
        """The engine's `MMHMEngine.stats` plus how often it was rebuilt from scratch and the last edit."""
        base = self.engine.stats() if self.engine is not None else {}
        return {**base, "resets": self.resets, "last_edit": self.last_edit}

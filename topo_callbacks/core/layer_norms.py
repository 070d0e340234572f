"""Which layers' gradients moved when an alarm's change began: the first step of a "which layer" diagnosis.

The monitor computes the global gradient norm from one norm per parameter tensor at every step it reads; it keeps
those per-tensor norms for the last `STEP_WINDOW` such steps (numbers on the CPU, a small tensor per step on an
accelerator, read only when an alarm asks). At an alarm, the tensors are grouped into layers by their names in the
model (``layer1.0.conv1.weight`` and ``.bias`` make ``layer1.0.conv1``) and each layer's norm from the onset to the
alarm is compared with its norm before the onset (`topo_callbacks.functional.detector.layer_shifts`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from topo_callbacks.core.detector import STEP_WINDOW
from topo_callbacks.functional.detector import layer_shifts

__all__ = ["LayerGradNorms"]


class LayerGradNorms:
    """The per-tensor gradient norms of the last ``window`` steps read, and the diagnosis they give at an alarm.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> params = list(model.parameters())
        >>> norms = LayerGradNorms()
        >>> for step in range(1, 41):  # layer "1" (the second Linear) blows up at step 31
        ...     norms.record(step, params, [1.0, 1.0, 1.0 if step <= 30 else 50.0, 1.0])
        >>> [(name, round(factor, 1)) for name, factor in norms.diagnose(onset=31, step=35, model=model, top=2)]
        [('1', 35.4), ('0', 1.0)]
    """

    def __init__(self, window: int = STEP_WINDOW) -> None:
        self._rows: deque[tuple[int, list[Any], Any]] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, step: int, params: list[Any], per_tensor: list[float] | Tensor) -> None:
        """Keep step ``step``'s norm of each of ``params``' gradients (a device tensor is not read here)."""
        self._rows.append((int(step), params, per_tensor))

    def clear(self) -> None:
        """Forget every step (after a rollback the steps kept belong to the abandoned run)."""
        self._rows.clear()

    def diagnose(
        self, onset: int, step: int, model: nn.Module | None = None, top: int = 3
    ) -> list[tuple[str, float]] | None:
        """The ``top`` layers whose gradient norm moved most from the steps before ``onset`` to the steps from
        ``onset`` to ``step``, each with its factor (the median after over the median before); None when either side
        has no step kept. Layers are named by ``model``'s parameter names (``parameter <i>`` for one not in it)."""
        before: dict[str, list[float]] = {}
        after: dict[str, list[float]] = {}
        rows = [(s, p, v) for s, p, v in self._rows if s <= step]
        if not any(s < onset for s, _, _ in rows) or not any(s >= onset for s, _, _ in rows):
            return None
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        for s, params, values in rows:
            side = before if s < onset else after
            numbers = values.tolist() if isinstance(values, Tensor) else values
            for layer, norm in _layers(params, numbers, names).items():
                side.setdefault(layer, []).append(norm)
        return layer_shifts(before, after, top=top)


def _layers(params: list[Any], norms: Iterable[float], names: dict[int, str]) -> dict[str, float]:
    """One step's per-tensor norms grouped into layers (the root sum of squares of their tensors' norms)."""
    squares: dict[str, float] = {}
    for i, (param, norm) in enumerate(zip(params, norms, strict=False)):
        name = names.get(id(param))
        layer = name.rsplit(".", 1)[0] if name is not None and "." in name else (name or f"parameter {i}")
        squares[layer] = squares.get(layer, 0.0) + float(norm) ** 2
    return {layer: math.sqrt(total) for layer, total in squares.items()}

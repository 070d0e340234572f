"""Embedding a fixed probe batch at a check: the same inputs every time, so checks differ by small moves."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from topo_callbacks.core.capture import pool_output, select_tensor


def probe_rows(probe: Any) -> int | None:
    """Leading size of the first tensor of a probe batch (a tensor, a tuple/list or a mapping of inputs)."""
    if isinstance(probe, Tensor):
        return probe.shape[0] if probe.ndim else None
    items = probe.values() if isinstance(probe, Mapping) else probe if isinstance(probe, (tuple, list)) else ()
    for item in items:
        rows = probe_rows(item)
        if rows is not None:
            return rows
    return None


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor moved to ``device`` (tuples, lists and mappings are rebuilt)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def embed_probe(
    model: nn.Module,
    module: nn.Module,
    probe: Any,
    pool: str | Callable[[Tensor], Tensor] = "mean",
    select: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    """Run ``model`` on ``probe`` in eval mode without gradients and return ``module``'s pooled output rows.

    A tensor probe is passed as ``model(probe)``, a tuple/list as ``model(*probe)``, a mapping as
    ``model(**probe)``, after moving its tensors to the model's device. Eval mode switches dropout off and makes
    batch norm use (and not update) its running statistics; every submodule's mode is restored afterwards, also
    on error. If the layer runs more than once per forward, all its outputs are concatenated.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
        >>> rows = embed_probe(model, model[1], torch.ones(3, 4))
        >>> rows.shape, bool(torch.equal(rows, embed_probe(model, model[1], torch.ones(3, 4)))), model.training
        (torch.Size([3, 8]), True, True)
    """
    outputs: list[Tensor] = []
    pick = select or select_tensor

    def hook(_: nn.Module, __: Any, output: Any) -> None:
        outputs.append(pool_output(pick(output), pool).detach().to(torch.float32, copy=True))

    param = next(model.parameters(), None)
    inputs = to_device(probe, param.device if param is not None else torch.device("cpu"))
    modes = [(m, m.training) for m in model.modules()]
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                model(**inputs)
            elif isinstance(inputs, (tuple, list)):
                model(*inputs)
            else:
                model(inputs)
    finally:
        handle.remove()
        for m, mode in modes:
            m.train(mode)
    if not outputs:
        raise RuntimeError("the probe's forward pass did not run the monitored layer")
    return torch.cat(outputs)

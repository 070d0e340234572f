"""Capture a layer's outputs with a forward hook: resolve the layer, pool, detach, drop non-finite, cap memory."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from topo_callbacks.functional._validation import drop_nonfinite

__all__ = [
    "POOLS",
    "EmbeddingCapture",
    "LayerSpec",
    "pool_output",
    "resolve_layer",
    "select_tensor",
    "unwrap_model",
]

#: How outputs with more than two dimensions become one row per example.
POOLS = ("mean", "first", "last", "flatten")
#: Wrappers whose real model sits in an attribute: DDP/FSDP/DataParallel (``module``), torch.compile (``_orig_mod``).
_WRAPPER_ATTRS = ("_orig_mod", "module")

LayerSpec = str | Callable[[nn.Module], nn.Module]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip torch.compile and (D)DP wrappers, whose submodule names carry ``_orig_mod.`` / ``module.`` prefixes.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in _WRAPPER_ATTRS:
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and type(model).__name__ in (
                "OptimizedModule",
                "DistributedDataParallel",
                "DataParallel",
                "FullyShardedDataParallel",
            ):
                model = inner
                break
    return model


#: Path components that wrappers insert inside a model: FSDP1 per-module wrapping, activation checkpointing,
#: torch.compile of a submodule. They forward attribute access to the wrapped module, so dropping them from a
#: path still resolves on a wrapped tree, and resolves on the unwrapped tree too (Lightning calls `setup` first).
_INNER_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for attr in _WRAPPER_ATTRS:
            if name.startswith(attr + "."):
                name, changed = name[len(attr) + 1 :], True
    return ".".join(part for part in name.split(".") if part not in _INNER_WRAPPER_PARTS)


def resolve_layer(model: nn.Module, layer: LayerSpec) -> nn.Module:
    """The submodule of ``model`` named by a dotted path (``"encoder.3"``), or returned by ``layer(model)``.

    Wrapper prefixes (``module.``, ``_orig_mod.``) and the parts that FSDP1 and activation checkpointing insert
    (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``) are accepted and ignored on either side.

    Raises:
        ValueError: when the path names no submodule; the message lists the closest existing names.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> resolve_layer(net, "0")
        Linear(in_features=4, out_features=8, bias=True)
    """
    root = unwrap_model(model)
    if callable(layer) and not isinstance(layer, str):
        found = layer(root)
        if not isinstance(found, nn.Module):
            raise ValueError(f"`layer` callable must return an nn.Module; it returned {type(found).__name__}.")
        return found
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"`layer` must be a dotted module path (str) or a callable(model) -> Module; got {layer!r}.")
    path = _strip_prefixes(layer)
    try:
        return root.get_submodule(path)
    except AttributeError:
        pass
    try:
        return root.get_submodule(layer)  # a path through wrappers that do not forward attributes
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        close += [n for n in names if path in n and n not in close][: 5 - len(close)]
        hint = f" Close matches: {close}." if close else f" Available (first 20): {names[:20]}."
        raise ValueError(f"`layer={layer!r}` does not name a submodule of {type(root).__name__}.{hint}") from None


def select_tensor(output: Any) -> Tensor:
    """The documented rule for layers whose output is not a tensor.

    A tensor is used as is; a tuple or list gives its first tensor; a mapping (dict, HF ``ModelOutput``) gives
    ``last_hidden_state`` if present, else its first tensor value. Pass ``select=`` to choose otherwise.

    Example:
        >>> import torch
        >>> select_tensor((torch.ones(2, 3), "cache")).shape
        torch.Size([2, 3])
        >>> select_tensor({"logits": torch.zeros(2, 5), "last_hidden_state": torch.ones(2, 4, 8)}).shape
        torch.Size([2, 4, 8])
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("last_hidden_state"), Tensor):
            return output["last_hidden_state"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise TypeError(
        f"cannot find a tensor in a layer output of type {type(output).__name__}; pass `select=` to pick one."
    )


def pool_output(out: Tensor, pool: str | Callable[[Tensor], Tensor] = "mean") -> Tensor:
    """One row per example: ``(B, d)`` as is; ``(B, T, d)`` (tokens) and ``(B, C, H, W...)`` (maps) pooled.

    ``"mean"`` averages tokens (dim 1) of a 3-D output and the spatial dims (2 and up) of a 4-D or larger one;
    ``"first"``/``"last"`` take the first/last token (e.g. a CLS token) of a 3-D output; ``"flatten"`` keeps
    everything. A callable receives the raw output and must return ``(B, d)``.

    Example:
        >>> import torch
        >>> pool_output(torch.ones(2, 5, 3)).shape, pool_output(torch.ones(2, 4, 8, 8)).shape
        (torch.Size([2, 3]), torch.Size([2, 4]))
    """
    if callable(pool):
        return pool(out)
    if out.ndim == 1:
        return out[:, None]
    if out.ndim == 2:
        return out
    if pool == "flatten":
        return out.flatten(1)
    if out.ndim == 3:
        if pool == "mean":
            return out.mean(dim=1)
        if pool == "first":
            return out[:, 0]
        if pool == "last":
            return out[:, -1]
    elif pool == "mean":
        return out.flatten(2).mean(dim=2)
    raise ValueError(f"`pool={pool!r}` cannot pool an output of shape {tuple(out.shape)}; accepted: {POOLS}.")


def _in_backward() -> bool:
    """True inside the autograd engine: activation checkpointing re-runs forwards (and their hooks) there."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class EmbeddingCapture:
    """A forward hook that keeps, while armed, the latest ``max_samples`` pooled rows of a layer's output.

    Rows are detached, cast to float32 and kept on the layer's device; rows with NaN/Inf are dropped and
    counted. Disarmed, the hook returns at once. Memory never exceeds ``max_samples`` rows.
    """

    def __init__(
        self,
        max_samples: int,
        pool: str | Callable[[Tensor], Tensor] = "mean",
        select: Callable[[Any], Tensor] | None = None,
    ) -> None:
        self.max_samples = max_samples
        self.pool = pool
        self.select = select or select_tensor
        self.armed = False
        self.error: Exception | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self.reset()

    def reset(self) -> None:
        self._rows: list[Tensor] = []
        self._count = 0
        self.seen = 0
        self.nonfinite = 0

    def attach(self, module: nn.Module) -> None:
        self.detach()
        self._handle = module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self.armed or not module.training or _in_backward():
            return
        try:
            with torch.no_grad():
                # Always a copy: the output may be modified in place later in the forward pass (ReLU(inplace=True)).
                rows = pool_output(self.select(output), self.pool).detach().to(torch.float32, copy=True)
                self.seen += rows.shape[0]
                rows, dropped = drop_nonfinite(rows)
                self.nonfinite += dropped
                self.add(rows)
        except Exception as err:  # never break the user's forward pass; the monitor reports it at the check
            self.error = err

    def add(self, rows: Tensor) -> None:
        """Append rows, dropping the oldest beyond ``max_samples``."""
        if rows.shape[0] == 0:
            if not self._rows:
                self._rows.append(rows)
            return
        self._rows.append(rows[-self.max_samples :])
        self._count += min(rows.shape[0], self.max_samples)
        while self._count - self._rows[0].shape[0] >= self.max_samples:
            self._count -= self._rows.pop(0).shape[0]

    def take(self) -> Tensor | None:
        """The captured rows ``(n, d)`` (at most ``max_samples``, newest last), or None if nothing was captured.

        The buffer is emptied; the counters (``seen``, ``nonfinite``) are kept until `reset`.
        """
        if not self._rows:
            return None
        rows = torch.cat(self._rows)[-self.max_samples :]
        self._rows, self._count = [], 0
        return rows

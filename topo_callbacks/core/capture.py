"""Capture a layer's outputs with a forward hook: resolve the layer, pool, detach, drop non-finite, cap memory."""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Hashable, Mapping
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
    "selection_warning",
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

    Which tensor is watched:

    - a tensor output is used as is;
    - a tuple or list gives its first tensor with at least one dimension (a 0-d scalar, such as a loss, is
      skipped);
    - a mapping (dict, HF ``ModelOutput``) gives ``last_hidden_state`` if it holds a tensor, else its first tensor
      value with at least one dimension, in the mapping's order.

    Pass ``select=`` (a callable given the layer's output, e.g. ``select=lambda out: out["z"]``; the HF callback
    takes a module-level function or a ``"module:function"`` path) to choose otherwise.

    When a warning is given: `EmbeddingCapture` inspects the output of the first armed forward of each output
    structure and records a warning (see `selection_warning`; the monitors emit it as ``CollapseWarning`` at the
    next check, and raise with ``strict=True``) when the watched rows have fewer than 2 features after pooling (a
    point cloud of dimension < 2 has no geometry to lose: the collapse index stays constant), or, with this
    default rule, when the output holds another tensor with the same leading (batch) size and more features (the
    ``d`` that ``pool="mean"`` gives: ``(B, d)`` and ``(B, T, d)`` give ``d``, ``(B, C, H, W)`` gives ``C``, ``(B,)``
    gives 1): the selected tensor is then probably not the layer's main output. Capturing goes on either way.

    Example:
        >>> import torch
        >>> select_tensor((torch.ones(2, 3), "cache")).shape
        torch.Size([2, 3])
        >>> select_tensor({"logits": torch.zeros(2, 5), "last_hidden_state": torch.ones(2, 4, 8)}).shape
        torch.Size([2, 4, 8])
        >>> select_tensor({"loss": torch.tensor(0.5), "logits": torch.zeros(2, 5)}).shape
        torch.Size([2, 5])
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("last_hidden_state"), Tensor):
            return output["last_hidden_state"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor) and item.ndim > 0:
                return item
    raise TypeError(
        f"cannot find a tensor with a batch dimension in a layer output of type {type(output).__name__};"
        " pass `select=` to pick one."
    )


def _width(t: Tensor) -> int:
    """Features per example as ``pool="mean"`` counts them: (B,) 1, (B, d) and (B, T, d) d, (B, C, ...) C."""
    if t.ndim <= 1:
        return 1
    return int(t.shape[2] if t.ndim == 3 else t.shape[1])


def _tensor_items(output: Any) -> list[tuple[Hashable, Tensor]]:
    """The top-level tensors (with a batch dimension) of a layer output: (key or index, tensor)."""
    if isinstance(output, Mapping):
        pairs: Any = output.items()
    elif isinstance(output, (tuple, list)):
        pairs = enumerate(output)
    else:
        return []
    return [(key, value) for key, value in pairs if isinstance(value, Tensor) and value.ndim > 0]


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(int(n)) for n in t.shape) + ("," if t.ndim == 1 else "") + ")"


def selection_warning(output: Any, selected: Tensor, d: int, *, default_rule: bool = True) -> str | None:
    """Why the tensor watched in a layer's ``output`` looks wrong, or None when it looks right.

    ``selected`` is the tensor the capture took (by `select_tensor` when ``default_rule``, else by the user's
    ``select=``) and ``d`` its number of features after pooling. A warning is given when ``d < 2``, or, with the
    default rule only (a user's ``select=`` is deliberate), when another top-level tensor of the output has the
    same leading (batch) size and more features than the selected one. The message lists the output's tensors with
    their shapes (keys for mappings, indices for tuples and lists) and says how to choose one with ``select=``.

    Example:
        >>> import torch
        >>> out = {"aux": torch.zeros(8), "z": torch.ones(8, 16)}
        >>> message = selection_warning(out, select_tensor(out), 1)
        >>> "'aux' (8,), 'z' (8, 16)" in message, 'select=lambda out: out["z"]' in message
        (True, True)
        >>> selection_warning(torch.ones(8, 16), torch.ones(8, 16), 16) is None
        True
    """
    items = _tensor_items(output)
    batch = int(selected.shape[0]) if selected.ndim else None
    width = _width(selected)
    wider = [(key, t) for key, t in items if t is not selected and int(t.shape[0]) == batch and _width(t) > width]
    if d >= 2 and not (default_rule and wider):
        return None
    mapping = isinstance(output, Mapping)

    def label(key: Hashable) -> str:
        return repr(key) if mapping else f"[{key}]"

    def access(key: Hashable) -> str:
        return "out[" + (f'"{key}"' if isinstance(key, str) else repr(key)) + "]"

    if items:
        listed = ", ".join(f"{label(key)} {_shape(t)}" for key, t in items)
        message = f"The watched layer returns a {type(output).__name__} of tensors: {listed}; the capture watches "
        message += next((label(key) for key, t in items if t is selected), f"`select=`'s tensor {_shape(selected)}")
    elif isinstance(output, Tensor) and output is selected:
        message = f"The watched layer returns a tensor of shape {_shape(selected)}"
    else:
        kind = "a tensor" if isinstance(output, Tensor) else f"a {type(output).__name__}"
        message = f"The watched layer returns {kind}; the capture watches `select=`'s tensor {_shape(selected)}"
    if d < 2:
        message += (
            f", which gives {d} feature{'' if d == 1 else 's'} per example after pooling: points of dimension < 2 have"
            " no geometry to collapse, so the collapse index stays constant."
        )
    else:
        message += "."
    how = "a callable given the layer's output"
    hf = '(the HF callback takes a module-level function or a "module:function" path)'
    if default_rule and wider:
        key, best = max(wider, key=lambda pair: _width(pair[1]))
        message += (
            f" {label(key)} has the same batch size and more features ({_width(best)} > {width}), so the watched"
            f" tensor is probably not the layer's main output. Choose the tensor with `select=`, {how}, e.g."
            f" `select=lambda out: {access(key)}` {hf}."
        )
    elif others := [key for key, t in items if t is not selected]:
        message += (
            f" Watch a wider layer, or choose another tensor with `select=`, {how}, e.g."
            f" `select=lambda out: {access(others[0])}` {hf}."
        )
    else:
        message += (
            " Watch a wider layer, or build the rows differently with `pool=` or `select=` (a callable given the"
            ' layer\'s output; the HF callback takes a module-level function or a "module:function" path).'
        )
    return message


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


def nonfinite_rows(rows: Tensor) -> Tensor:
    """How many rows of a float32 ``(n, d)`` tensor hold a NaN or an infinity, as a tensor on its device (not read).

    A row's float64 sum is NaN or infinite exactly when the row holds a NaN or an infinity (float32 values cannot
    overflow it), and ``s - s`` is NaN exactly then: four kernels instead of ``isfinite``'s six and a reduction (27 ->
    9 us for 64 rows on the CPU, for each batch the capture drops). MPS has no float64: ``isfinite`` there.

    Example:
        >>> import torch
        >>> rows = torch.ones(4, 3)
        >>> rows[1, 0], rows[3, 2], rows[2, 1] = float("nan"), float("-inf"), 3e38
        >>> int(nonfinite_rows(rows))
        2
    """
    if rows.device.type == "mps":
        return (~torch.isfinite(rows).all(dim=1)).sum()
    sums = rows.sum(dim=1, dtype=torch.float64)
    return (sums - sums).isnan().sum()


def _in_backward() -> bool:
    """True inside the autograd engine: activation checkpointing re-runs forwards (and their hooks) there."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


#: At most this many output structures are remembered as inspected (then the memory starts over).
_MAX_STRUCTURES = 256


def _structure_key(output: Any, selected: Tensor, d: int) -> Hashable:
    """What `selection_warning` depends on, without the batch size (so a smaller last batch is not new)."""
    batch = selected.shape[0] if selected.ndim else None
    items = tuple((key, t is selected, t.shape[0] == batch, tuple(t.shape[1:])) for key, t in _tensor_items(output))
    return type(output), d, tuple(selected.shape[1:]), items


def _capture(capture: EmbeddingCapture, module: nn.Module, output: Any) -> None:
    """The armed hook's work; runs eagerly, outside any compiled graph (see `EmbeddingCapture`)."""
    if capture._handle is None or _in_backward():  # a hook kept by a compiled graph after `detach`; a recompute
        return
    start = time.perf_counter()
    try:
        if capture.select is select_tensor and not callable(capture.pool):
            # ours only: detached before pooling, so no graph is built without a no_grad context (~2 us a step)
            selected = select_tensor(output)
            pooled = pool_output(selected.detach(), capture.pool)
        else:  # a user's select or pool runs as it always did, without building a graph
            with torch.no_grad():
                selected = capture.select(output)
                pooled = pool_output(selected, capture.pool)
        # Always a copy: the output may be modified in place later in the forward pass (ReLU(inplace=True)).
        rows = pooled.detach().to(torch.float32, copy=True)
        capture.seen += rows.shape[0]
        capture.add(rows)  # non-finite rows are counted when they leave the buffer (`add`, `take`), not here
    except Exception as err:  # never break the user's forward pass; the monitor reports it at the check
        capture.error = err
        capture.spent_s += time.perf_counter() - start
        return
    try:
        capture._inspect(output, selected, rows)
    except Exception as err:  # a diagnostic must not cost the check
        capture._record(f"could not inspect the watched layer's output: {err!r}")
    capture.spent_s += time.perf_counter() - start


#: `_capture`, or the same function marked for dynamo to skip once `EmbeddingCapture.attach` has run.
_capture_outside_graph: Callable[[EmbeddingCapture, nn.Module, Any], None] = _capture


def _mark_outside_graph() -> None:
    """Mark `_capture` for ``torch.compile`` to leave out of its graphs (imports torch._dynamo, ~1 s, once)."""
    global _capture_outside_graph
    if _capture_outside_graph is not _capture:
        return
    try:
        _capture_outside_graph = torch.compiler.disable(_capture)
    except Exception:  # a torch without dynamo: there is nothing to stay out of
        _capture_outside_graph = _capture


class EmbeddingCapture:
    """A forward hook that keeps, while armed, the latest ``max_samples`` pooled rows of a layer's output.

    Rows are detached, cast to float32 and kept on the layer's device; rows with NaN/Inf are counted (``seen``,
    ``nonfinite``: on the device as they leave the buffer, so no armed step waits for a GPU) and dropped by `take`,
    which returns the finite ones among the newest ``max_samples``. Disarmed, in eval mode or inside backward
    (activation checkpointing re-runs forwards there), the hook returns at once. Memory never exceeds ``max_samples``
    rows. The hook never raises into the forward pass: an error is kept in ``error`` for the next check.

    ``torch.compile``: only the hook's check of ``training`` and ``armed`` is traced (dynamo guards on ``armed``:
    switching it selects between compiled variants, it does not recompile); the capture itself is wrapped in
    ``torch.compiler.disable`` and runs eagerly, so its Python state causes no recompiles and its ``.item()`` no
    graph break inside it. The call is one graph break at the watched layer, which dynamo (``nested_graph_breaks``
    off, as by default in torch 2.13) takes at the outermost call on the stack: inside a loop (``nn.Sequential``, a
    loop over blocks) that frame then runs eagerly. When the first compiled forward is disarmed, disarmed forwards
    stay one graph; when it is armed, the graph-broken code serves both. ``fullgraph=True`` forbids the break: an
    armed forward fails to compile there; use ``source="probe"`` with such a model. Dynamo does not guard on module
    hooks: attach before the model's first compiled forward (a hook attached later is never called).

    The first armed forward of each output structure is inspected (no per-forward or per-row cost after that):
    a watched tensor with fewer than 2 features after pooling, or a larger tensor beside it, records a warning
    (see `select_tensor`); `pop_warnings` hands the pending ones over, each distinct warning once per capture.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(4, 3)
        >>> cap = EmbeddingCapture(max_samples=8)
        >>> cap.attach(layer)
        >>> cap.armed = True
        >>> _ = layer(torch.randn(5, 4))
        >>> cap.take().shape, cap.seen, cap.pop_warnings()
        (torch.Size([5, 3]), 5, [])
        >>> cap.detach()
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
        # kept across `reset`: each distinct warning is recorded once per capture object
        self._inspected: set[Hashable] = set()
        self._warned: set[str] = set()
        self._pending: list[str] = []
        self.reset()

    def reset(self) -> None:
        self._rows: list[Tensor] = []
        self._count = 0
        self.seen = 0
        self._nonfinite: Tensor | int = 0
        #: wall seconds the armed hook spent since `reset` (the monitor counts them as its own)
        self.spent_s = 0.0

    @property
    def nonfinite(self) -> int:
        """Rows seen since `reset` that held a NaN or an infinity (dropped by `take`); reading it waits for the
        device, so the monitor reads it at the check."""
        return int(self._nonfinite)

    @nonfinite.setter
    def nonfinite(self, value: int) -> None:
        self._nonfinite = int(value)

    def attach(self, module: nn.Module) -> None:
        self.detach()
        _mark_outside_graph()
        self._handle = module.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        # Traced by dynamo in a compiled model: only these two reads (guarded) stay in the graph. `training` first:
        # in eval mode `armed` is not read, so it adds no variant.
        if not module.training or not self.armed:
            return
        _capture_outside_graph(self, module, output)

    def _inspect(self, output: Any, selected: Tensor, rows: Tensor) -> None:
        """Record a `selection_warning` for this output structure, once; a plain wide tensor costs nothing."""
        d = int(rows.shape[1]) if rows.ndim == 2 else 1
        if not (selected.is_floating_point() or selected.is_complex()):
            self._record(
                f"the watched tensor has dtype {selected.dtype} (integer or boolean: indices, masks, token ids), which"
                " has no geometry to watch; its values are cast to float32 and watched as they are. Pick a layer"
                " whose output is a floating-point tensor (or pass `select=`)."
            )
        if d >= 2 and isinstance(output, Tensor):
            return
        key = _structure_key(output, selected, d)
        if key in self._inspected:
            return
        if len(self._inspected) >= _MAX_STRUCTURES:
            self._inspected.clear()
        self._inspected.add(key)
        message = selection_warning(output, selected, d, default_rule=self.select is select_tensor)
        if message is not None:
            self._record(message)

    def _record(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._pending.append(message)

    def pop_warnings(self) -> list[str]:
        """The warnings recorded since the last call (each distinct one once per capture), and forget them.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> layer = nn.Linear(4, 1)  # one feature per example: the collapse index would stay constant
            >>> cap = EmbeddingCapture(max_samples=8)
            >>> cap.attach(layer)
            >>> cap.armed = True
            >>> _ = layer(torch.randn(5, 4)), layer(torch.randn(5, 4))
            >>> pending = cap.pop_warnings()  # two forwards, one structure: one warning
            >>> len(pending), "1 feature per example" in pending[0], cap.pop_warnings()
            (1, True, [])
        """
        pending, self._pending = self._pending, []
        return pending

    def add(self, rows: Tensor) -> None:
        """Append rows, dropping the oldest beyond ``max_samples``.

        The rows dropped are counted in ``nonfinite`` on their device (no wait for a GPU); the rows kept are counted
        by `take`. Counting each batch as it came cost the CPU 45 us per armed step on a small MLP (cold kernels
        between a backward and a forward), more than the copy itself."""
        if rows.shape[0] == 0:
            if not self._rows:
                self._rows.append(rows)
            return
        if rows.shape[0] > self.max_samples:
            self._count_nonfinite(rows[: -self.max_samples])
            rows = rows[-self.max_samples :]
        self._rows.append(rows)
        self._count += rows.shape[0]
        while self._count - self._rows[0].shape[0] >= self.max_samples:
            dropped = self._rows.pop(0)
            self._count -= dropped.shape[0]
            self._count_nonfinite(dropped)

    def _count_nonfinite(self, rows: Tensor) -> None:
        if rows.ndim == 2 and rows.shape[0]:
            self._nonfinite = self._nonfinite + nonfinite_rows(rows)

    def take(self) -> Tensor | None:
        """The captured rows ``(n, d)`` (at most ``max_samples``, newest last), or None if nothing was captured.

        The buffer is emptied; the counters (``seen``, ``nonfinite``) are kept until `reset`.
        """
        if not self._rows:
            return None
        rows = torch.cat(self._rows)
        self._rows, self._count = [], 0
        if rows.shape[0] > self.max_samples:
            self._count_nonfinite(rows[: -self.max_samples])
            rows = rows[-self.max_samples :]
        if rows.ndim == 2:
            rows, dropped = drop_nonfinite(rows)
            self._nonfinite = self._nonfinite + dropped
        return rows

"""The framework-agnostic neuron-topology monitor: every K steps, per watched layer, the neuron cloud's merging
statistics, its Betti numbers at a fixed scale (through the MMHM engine, the same neurons moved each check), the
bi-Lipschitz distortion since the previous check, a phase flag, and optionally the sharpness.

Adapters call `attach` once and `run_check` after an optimizer step for which `is_check_step` holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from topo_callbacks.core.capture import resolve_layer
from topo_callbacks.engine.mmhm import MMHMEngine
from topo_callbacks.functional.neurons import (
    bilipschitz_constants,
    directional_curvature,
    hessian_max_eigenvalue,
    merging_statistics,
    neighbour_distances,
    neighbour_pairs,
    neuron_points,
    stability_threshold,
)

__all__ = ["NeuronTopologyMonitorCore"]

LossFn = Callable[[nn.Module], Tensor]


class NeuronTopologyMonitorCore:
    """Watch the neurons of chosen layers: do distinct neurons merge (topology breaks) or not?

    Each neuron is a point: its incoming weights and bias, plus its outgoing weights when ``outgoing`` names the
    next layer. At every check, per layer, it logs under ``{prefix}/{layer}/``:

    - ``nn_q0``, ``nn_q10``, ``nn_q50``: quantiles of nearest-neighbour distances over the median neuron norm;
      ``merged_fraction``: neurons with a neighbour closer than ``rel_eps`` times the median norm;
    - ``b0``, ``b1``: Betti numbers of the neuron cloud at scale ``rel_eps`` in units of the median neuron norm
      (so ``b0`` counts neurons and groups of merged neurons), kept by an `MMHMEngine` whose points, the same
      neurons rescaled, are moved at each check;
    - ``lip_min``, ``lip_max``, ``contracted``: the empirical bi-Lipschitz constants of the map from the previous
      check's neurons to these, over the previous cloud's ``k_neighbors``-nearest-neighbour pairs, and the count
      of pairs whose distance shrank below ``contraction`` times what it was;
    - ``breaking``: the phase flag, 1 when topology broke since the previous check: ``b0`` fell (neurons merged
      at the engine's scale) or some neighbour pair contracted below ``contraction``; else 0 (preserving).

    With ``sharpness=True`` (off by default: it costs ``sharpness_iters`` Hessian-vector products, each about two
    backward passes over the probe batch, at every check) and a ``loss_fn(model) -> loss`` on a fixed probe
    batch, it also logs ``{prefix}/sharpness`` (lambda_max of the Hessian by warm-started power iteration; for
    Adam the preconditioned sharpness), ``{prefix}/lr_sharpness`` (lr x that), ``{prefix}/stability_ratio``
    (lr x sharpness over the optimizer's edge-of-stability level: 2 for GD, 2 + 2 beta with momentum,
    38 for Adam with beta1 = 0.9; above 1 is past the edge) and ``{prefix}/grad_curvature`` (the curvature along
    the gradient, one HVP). Training is not affected: ``.grad`` is not touched, and the RNG state and module
    buffers (e.g. batch-norm statistics) are restored after the probe passes.

    Args:
        layers: a dotted layer path or a list of them (Linear, Conv, attention projections: any module with a
            ``weight`` whose rows are neurons).
        every_n_train_steps: check after every this many optimizer steps.
        rel_eps: the merging scale, relative to the median neuron norm.
        outgoing: ``{layer: next_layer}``: also use each neuron's outgoing weights in ``next_layer``.
        k_neighbors: neighbours per neuron in the pairs of the bi-Lipschitz constants.
        contraction: a pair whose distance ratio falls below this counts as contracted.
        sharpness, loss_fn, sharpness_iters: see above.
        prefix: the log-key prefix.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> monitor = NeuronTopologyMonitorCore("0", every_n_train_steps=1)
        >>> _ = monitor.attach(model)
        >>> first = monitor.run_check(1)
        >>> with torch.no_grad():
        ...     model[0].weight[1] = model[0].weight[0]  # drive neuron 1 onto neuron 0
        ...     model[0].bias[1] = model[0].bias[0]
        >>> second = monitor.run_check(2)
        >>> first["neurons/0/b0"], second["neurons/0/b0"], second["neurons/0/breaking"]
        (16.0, 15.0, 1.0)
    """

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        every_n_train_steps: int = 50,
        rel_eps: float = 0.05,
        outgoing: Mapping[str, str] | None = None,
        k_neighbors: int = 5,
        contraction: float = 0.5,
        sharpness: bool = False,
        loss_fn: LossFn | None = None,
        sharpness_iters: int = 20,
        prefix: str = "neurons",
    ) -> None:
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"`layers` must be a dotted layer path or a non-empty list of them; got {layers!r}.")
        for name, value, low in (("every_n_train_steps", every_n_train_steps, 1), ("k_neighbors", k_neighbors, 1),
                                 ("sharpness_iters", sharpness_iters, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}; got {value!r}.")
        if not (isinstance(rel_eps, (int, float)) and 0 < rel_eps < math.inf):
            raise ValueError(f"`rel_eps` must be a positive float; got {rel_eps!r}.")
        if not (isinstance(contraction, (int, float)) and 0 < contraction < 1):
            raise ValueError(f"`contraction` must be in (0, 1); got {contraction!r}.")
        unknown = set(outgoing or {}) - set(names)
        if unknown:
            raise ValueError(f"`outgoing` keys must be watched layers {names}; got {sorted(unknown)}.")
        if sharpness and loss_fn is None:
            raise ValueError("`sharpness=True` needs `loss_fn`, a callable(model) -> loss on a fixed probe batch.")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be a callable(model) -> loss tensor; got {loss_fn!r}.")
        self.layers = names
        self.every_n_train_steps = every_n_train_steps
        self.rel_eps = float(rel_eps)
        self.outgoing = dict(outgoing or {})
        self.k_neighbors = k_neighbors
        self.contraction = float(contraction)
        self.sharpness = bool(sharpness)
        self.loss_fn = loss_fn
        self.sharpness_iters = sharpness_iters
        self.prefix = prefix
        self.model: nn.Module | None = None
        self.modules: dict[str, tuple[nn.Module, nn.Module | None]] = {}
        self.history: list[dict[str, float]] = []
        self.last_checked_step = -1
        self._engines: dict[str, tuple[MMHMEngine, Tensor]] = {}  # engine, neuron ids
        self._previous: dict[str, tuple[Tensor, Tensor, float]] = {}  # points, their neighbour pairs, b0
        self._eigvec: list[Tensor] | None = None

    def attach(self, model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module | None]]:
        """Resolve the layers (and their ``outgoing`` partners) on ``model``; ValueError with close matches."""
        self.model = model
        self.modules = {}
        for name in self.layers:
            module = resolve_layer(model, name)
            nxt = resolve_layer(model, self.outgoing[name]) if name in self.outgoing else None
            # fail now, not at the first check, for a layer without neuron rows
            if neuron_points(module, nxt).shape[0] < 2:
                raise ValueError(
                    f"`layers`: {name!r} has fewer than 2 neurons; a neuron cloud needs at least 2 neurons."
                )
            self.modules[name] = (module, nxt)
        return self.modules

    def is_check_step(self, step: int) -> bool:
        return step > 0 and step % self.every_n_train_steps == 0 and step != self.last_checked_step

    def run_check(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Measure every layer (and the sharpness, when on); returns the logged values and records them."""
        self.last_checked_step = step
        logged: dict[str, float] = {}
        for name, (module, nxt) in self.modules.items():
            for key, value in self._layer_check(name, neuron_points(module, nxt)).items():
                logged[f"{self.prefix}/{name}/{key}"] = value
        if self.sharpness and self.model is not None and self.loss_fn is not None:
            logged.update({f"{self.prefix}/{k}": v for k, v in self._sharpness(optimizer).items()})
        self.history.append({"step": float(step), **logged})
        return logged

    def _layer_check(self, name: str, points: Tensor) -> dict[str, float]:
        distances = neighbour_distances(points)  # one O(n^2 d) pass, shared by the statistics and the pairs
        out = merging_statistics(points, self.rel_eps, distances=distances)
        # in units of the current median norm, so that the engine's fixed eps is the merging scale at every check
        # even as the weights grow or shrink; the neurons are the same points from check to check (moves)
        scaled = points.to(torch.float64) / out["scale"]
        if name not in self._engines:
            engine = MMHMEngine(self.rel_eps, dtype=torch.float64, device=points.device)
            self._engines[name] = (engine, engine.reset(scaled))
        else:
            engine, ids = self._engines[name]
            engine.move(ids, scaled)
        b0, b1 = engine.betti()
        out.update(b0=float(b0), b1=float(b1))
        previous = self._previous.get(name)
        if previous is not None:
            before, pairs, b0_before = previous
            out.update(bilipschitz_constants(before, points, pairs, contraction=self.contraction))
            out["breaking"] = float(b0 < b0_before or out["contracted"] > 0)
        pairs = neighbour_pairs(points, self.k_neighbors, distances=distances)
        self._previous[name] = (points.clone(), pairs, float(b0))
        return out

    def _sharpness(self, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
        model, loss_fn = self.model, self.loss_fn
        assert model is not None
        assert loss_fn is not None
        params = [p for p in model.parameters() if p.requires_grad]
        buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
        devices = [p.device for p in params if p.device.type == "cuda"]
        preconditioner = _adam_preconditioner(optimizer, params) if optimizer is not None else None
        with torch.random.fork_rng(devices=devices[:1]):
            lam, self._eigvec = hessian_max_eigenvalue(
                lambda: loss_fn(model),
                params,
                iters=self.sharpness_iters,
                init=self._eigvec,
                preconditioner=preconditioner,
            )
            curvature = directional_curvature(lambda: loss_fn(model), params)
        with torch.no_grad():
            for key, buffer in model.named_buffers():
                buffer.copy_(buffers[key])
        out = {"sharpness": lam, "grad_curvature": curvature}
        if optimizer is not None:
            lr = float(optimizer.param_groups[0]["lr"])
            level, _ = stability_threshold(optimizer)
            out.update(lr_sharpness=lr * lam, stability_ratio=lr * lam / level)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the history and the last checked step (the previous cloud is not kept, so the first check
        after a resume has no bi-Lipschitz values)."""
        return {
            "history": [dict(h) for h in self.history],
            "last_checked_step": self.last_checked_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]
        self.last_checked_step = int(state.get("last_checked_step", -1))
        self._engines, self._previous = {}, {}


def _adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[Tensor] | None:
    """Adam's ``sqrt(v_hat) + eps`` per parameter, or None (not Adam-like, or no step taken yet)."""
    group = optimizer.param_groups[0]
    if "betas" not in group:
        return None
    beta2, eps = float(group["betas"][1]), float(group.get("eps", 1e-8))
    out = []
    for p in params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        t = float(state["step"])
        out.append((state["exp_avg_sq"] / (1 - beta2**t)).sqrt() + eps)
    return out

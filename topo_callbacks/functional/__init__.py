"""Pure functions on tensors: topology, spectra and the collapse index. No state, no framework."""

from topo_callbacks.functional.collapse import CollapseReport, collapse_index
from topo_callbacks.functional.neurons import (
    bilipschitz_constants,
    hessian_max_eigenvalue,
    merging_statistics,
    neuron_points,
)
from topo_callbacks.functional.spectral import anisotropy, effective_rank, l2_normalized_std
from topo_callbacks.functional.topology import betti_numbers, persistence_diagrams, persistence_entropy

__all__ = [
    "CollapseReport",
    "anisotropy",
    "betti_numbers",
    "bilipschitz_constants",
    "collapse_index",
    "effective_rank",
    "hessian_max_eigenvalue",
    "l2_normalized_std",
    "merging_statistics",
    "neuron_points",
    "persistence_diagrams",
    "persistence_entropy",
]

"""Pure functions on tensors: topology, spectra and the collapse index. No state, no framework."""

from topo_callbacks.functional.collapse import CollapseReport, collapse_index
from topo_callbacks.functional.spectral import anisotropy, effective_rank, l2_normalized_std
from topo_callbacks.functional.topology import betti_numbers, persistence_diagrams, persistence_entropy

__all__ = [
    "CollapseReport",
    "anisotropy",
    "betti_numbers",
    "collapse_index",
    "effective_rank",
    "l2_normalized_std",
    "persistence_diagrams",
    "persistence_entropy",
]

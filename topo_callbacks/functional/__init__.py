"""Pure functions on tensors: topology, spectra and the collapse index. No state, no framework.

Input rules, the same for every function here:

- points are a 2-D tensor ``(n, d)``, one row per point, finite; integer tensors are converted to the default
  float dtype. The functions are not differentiable: a tensor that requires grad is used detached.
- The topology functions (`betti_numbers`, `persistence_diagrams`) accept any ``d >= 1``: points on a line have a
  well-defined Vietoris-Rips complex. The embedding channels (`collapse_index`, `anisotropy`, `effective_rank`,
  `l2_normalized_std`) need ``d >= 2`` and raise a ValueError below: they measure how a batch spreads across
  directions, and with one feature they are constant whatever the data.
- Numbers (scales, thresholds, quantiles, weights) must be real numbers: Python or numpy ints and floats, or
  one-element tensors. A string such as ``"0.9"`` or a bool is refused with a ValueError naming the argument.
"""

from topo_callbacks.functional.collapse import CollapseReport, collapse_index, h0_death_scales
from topo_callbacks.functional.consecutive import contracted_pairs, h0_diagram_distance, neighbourhood_preservation
from topo_callbacks.functional.neurons import (
    bilipschitz_constants,
    hessian_max_eigenvalue,
    merging_statistics,
    neuron_points,
)
from topo_callbacks.functional.spectral import (
    anisotropy,
    dead_unit_fraction,
    effective_rank,
    l2_normalized_std,
    mean_cosine,
)
from topo_callbacks.functional.topology import betti_numbers, persistence_diagrams, persistence_entropy

__all__ = [
    "CollapseReport",
    "anisotropy",
    "betti_numbers",
    "bilipschitz_constants",
    "collapse_index",
    "contracted_pairs",
    "dead_unit_fraction",
    "effective_rank",
    "h0_death_scales",
    "h0_diagram_distance",
    "hessian_max_eigenvalue",
    "l2_normalized_std",
    "mean_cosine",
    "merging_statistics",
    "neighbourhood_preservation",
    "neuron_points",
    "persistence_diagrams",
    "persistence_entropy",
]

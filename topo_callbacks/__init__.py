"""topo-callbacks: watch the geometry and topology of a layer's embeddings while a network trains.

Importing the package imports torch only; the framework adapters (`topo_callbacks.lightning`, ...) are imported
by the user when needed.
"""

from topo_callbacks.core.monitor import CollapseWarning
from topo_callbacks.functional import CollapseReport, collapse_index

__version__ = "0.1.0"

__all__ = ["CollapseReport", "CollapseWarning", "__version__", "collapse_index"]

"""Lightning (``lightning.pytorch``) callbacks. Importing this module imports Lightning; the package does not."""

from lightning.pytorch import Callback

from topo_callbacks._lightning_adapter import build_callbacks

CollapseMonitor, NeuronTopologyMonitor = build_callbacks(Callback, __name__)

__all__ = ["CollapseMonitor", "NeuronTopologyMonitor"]

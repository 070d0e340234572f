"""The same callbacks on the standalone ``pytorch_lightning`` package."""

from pytorch_lightning import Callback

from topo_callbacks._lightning_adapter import build_callbacks

CollapseMonitor, NeuronTopologyMonitor = build_callbacks(Callback, __name__)

__all__ = ["CollapseMonitor", "NeuronTopologyMonitor"]

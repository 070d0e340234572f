"""The same callbacks on the standalone ``pytorch_lightning`` package."""

from pytorch_lightning import Callback

from topo_callbacks._lightning_adapter import build_collapse_monitor, build_neuron_monitor

CollapseMonitor = build_collapse_monitor(Callback)
CollapseMonitor.__module__ = __name__
CollapseMonitor.__qualname__ = CollapseMonitor.__name__ = "CollapseMonitor"
NeuronTopologyMonitor = build_neuron_monitor(Callback)
NeuronTopologyMonitor.__module__ = __name__
NeuronTopologyMonitor.__qualname__ = NeuronTopologyMonitor.__name__ = "NeuronTopologyMonitor"

__all__ = ["CollapseMonitor", "NeuronTopologyMonitor"]

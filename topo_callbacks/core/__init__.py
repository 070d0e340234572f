"""Framework-agnostic monitoring: capture, gather, schedule, calibration, alarm and state."""

from topo_callbacks.core.alarm import AlarmRule, StoppingReason
from topo_callbacks.core.capture import EmbeddingCapture, pool_output, resolve_layer, select_tensor, unwrap_model
from topo_callbacks.core.gather import gather_samples
from topo_callbacks.core.monitor import CheckResult, CollapseMonitorCore, CollapseWarning
from topo_callbacks.core.neurons import NeuronTopologyMonitorCore
from topo_callbacks.core.probe import embed_probe
from topo_callbacks.core.rollback import RollbackController, RollbackPolicy, TrainingState, resolve_on_alarm
from topo_callbacks.core.tracker import EngineTracker

__all__ = [
    "AlarmRule",
    "CheckResult",
    "CollapseMonitorCore",
    "CollapseWarning",
    "EmbeddingCapture",
    "EngineTracker",
    "NeuronTopologyMonitorCore",
    "RollbackController",
    "RollbackPolicy",
    "StoppingReason",
    "TrainingState",
    "embed_probe",
    "gather_samples",
    "pool_output",
    "resolve_layer",
    "resolve_on_alarm",
    "select_tensor",
    "unwrap_model",
]

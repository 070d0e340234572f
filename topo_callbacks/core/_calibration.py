"""The CUSUM detector's shipped calibrations, written by scripts/write_calibration.py; do not edit.

Fit by `topo-callbacks bench --seeds 8` on its calibration seeds [0, 1, 2, 3] of every family
(208 runs); see docs/benchmark.md.
"""

from typing import Any

CALIBRATIONS: list[dict[str, Any]] = [
    {
        "false_alarm_rate": 0.01,
        "channels": ["loss", "grad_norm", "loss_spike"],
        "normalisers": {"loss": 93.18158371409727, "grad_norm": 102.7147436314385, "loss_spike": 32.374664383652146},
        "threshold": 1.0,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.02,
        "channels": ["loss", "grad_norm", "loss_spike"],
        "normalisers": {"loss": 93.18158371409727, "grad_norm": 102.7147436314385, "loss_spike": 32.374664383652146},
        "threshold": 1.0,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.05,
        "channels": ["loss", "grad_norm", "loss_spike"],
        "normalisers": {"loss": 84.37392794003837, "grad_norm": 99.06570298490075, "loss_spike": 31.57258071057097},
        "threshold": 1.0254044381241418,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.1,
        "channels": ["loss", "grad_norm", "loss_spike"],
        "normalisers": {"loss": 80.51233736136444, "grad_norm": 98.0711878396686, "loss_spike": 3.2204358387224787},
        "threshold": 1.1573578257437653,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.2,
        "channels": ["loss", "grad_norm", "loss_spike"],
        "normalisers": {"loss": 72.74901817927018, "grad_norm": 54.29357799477479, "loss_spike": 2.3174484883067934},
        "threshold": 1.1067137313518607,
        "fit_on": "calibration seeds of every family",
    },
]

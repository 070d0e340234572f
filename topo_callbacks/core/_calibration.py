"""The CUSUM detector's shipped calibrations, written by scripts/write_calibration.py; do not edit.

Fit by `topo-callbacks bench --seeds 8` on its calibration seeds [0, 1, 2, 3] of every family
(208 runs); see docs/benchmark.md.
"""

from typing import Any

CALIBRATIONS: list[dict[str, Any]] = [
    {
        "false_alarm_rate": 0.01,
        "channels": ["loss", "grad_norm", "loss_spike"],
        "normalisers": {"loss": 93.18158371409727, "grad_norm": 102.7147436314385, "loss_spike": 186.00563703604408},
        "threshold": 1.0,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.02,
        "channels": ["loss", "grad_norm", "loss_spike"],
        "normalisers": {"loss": 93.18158371409727, "grad_norm": 102.7147436314385, "loss_spike": 186.00563703604408},
        "threshold": 1.0,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.05,
        "channels": ["loss", "grad_norm", "loss_spike"],
        "normalisers": {"loss": 84.37392794003837, "grad_norm": 99.06570298490075, "loss_spike": 160.13980697627275},
        "threshold": 1.0,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.1,
        "channels": ["loss", "grad_norm", "loss_spike"],
        "normalisers": {"loss": 80.51233736136444, "grad_norm": 98.0711878396686, "loss_spike": 139.2559776048083},
        "threshold": 1.0101407474217408,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.2,
        "channels": ["loss", "grad_norm", "loss_spike", "b0_fraction"],
        "normalisers": {
            "loss": 72.74901817927018,
            "grad_norm": 54.29357799477479,
            "loss_spike": 7.700512767005894,
            "b0_fraction": 7.8480221984332,
        },
        "threshold": 1.6259805635250548,
        "fit_on": "calibration seeds of every family",
    },
]

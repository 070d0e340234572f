"""The CUSUM detector's shipped calibrations, written by scripts/write_calibration.py; do not edit.

Fit by `topo-callbacks bench --seeds 8` on its calibration seeds [0, 1, 2, 3] of every family
(208 runs); see docs/benchmark.md.
"""

from typing import Any

CALIBRATIONS: list[dict[str, Any]] = [
    {
        "false_alarm_rate": 0.01,
        "channels": ["loss", "grad_norm", "b0_fraction", "effective_rank"],
        "normalisers": {
            "loss": 93.18158371409727,
            "grad_norm": 102.7147436314385,
            "b0_fraction": 24.90219066423033,
            "effective_rank": 30.163946562614314,
        },
        "threshold": 1.0,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.02,
        "channels": ["loss", "grad_norm", "b0_fraction", "effective_rank"],
        "normalisers": {
            "loss": 93.18158371409727,
            "grad_norm": 102.7147436314385,
            "b0_fraction": 24.90219066423033,
            "effective_rank": 30.163946562614314,
        },
        "threshold": 1.0,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.05,
        "channels": ["loss", "grad_norm", "b0_fraction"],
        "normalisers": {"loss": 84.37392794003837, "grad_norm": 99.06570298490075, "b0_fraction": 23.336713164373403},
        "threshold": 1.06708217600441,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.1,
        "channels": ["loss", "effective_rank", "b0_fraction", "grad_norm"],
        "normalisers": {
            "loss": 80.51233736136444,
            "effective_rank": 25.77106295690727,
            "b0_fraction": 12.760731556765554,
            "grad_norm": 98.0711878396686,
        },
        "threshold": 1.1704579905397208,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.2,
        "channels": ["std_l2", "loss", "grad_norm", "b0_fraction"],
        "normalisers": {
            "std_l2": 16.195061740585604,
            "loss": 72.74901817927018,
            "grad_norm": 70.47540787883129,
            "b0_fraction": 7.8480221984332,
        },
        "threshold": 1.7289220904808689,
        "fit_on": "calibration seeds of every family",
    },
]

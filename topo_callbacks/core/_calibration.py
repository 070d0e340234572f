"""The CUSUM detector's shipped calibrations, written by scripts/write_calibration.py; do not edit.

Fit by `topo-callbacks bench --seeds 12` on its calibration seeds [0, 1, 2, 3, 4, 5] of every family
(156 runs); see docs/benchmark.md.
"""

from typing import Any

CALIBRATIONS: list[dict[str, Any]] = [
    {
        "false_alarm_rate": 0.01,
        "channels": ["grad_norm", "effective_rank", "persistence_entropy", "std_l2"],
        "normalisers": {
            "grad_norm": 167.83992086359913,
            "effective_rank": 31.099177096301762,
            "persistence_entropy": 3.21031873653175,
            "std_l2": 28.606135367752405,
        },
        "threshold": 1.0050246568718328,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.02,
        "channels": ["grad_norm", "effective_rank", "b0_fraction"],
        "normalisers": {
            "grad_norm": 140.26647627813355,
            "effective_rank": 29.38215608980708,
            "b0_fraction": 28.000000000000004,
        },
        "threshold": 1.0044807437849494,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.05,
        "channels": ["grad_norm", "loss", "b0_fraction"],
        "normalisers": {"grad_norm": 85.76715725382421, "loss": 91.9206857554917, "b0_fraction": 10.212265253126748},
        "threshold": 1.112385816112125,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.1,
        "channels": ["grad_norm", "loss", "b0_fraction", "b1_fraction"],
        "normalisers": {
            "grad_norm": 65.44448981195505,
            "loss": 8.28141756584463,
            "b0_fraction": 8.81159835010756,
            "b1_fraction": 9.636449480642117,
        },
        "threshold": 1.1589571888512247,
        "fit_on": "calibration seeds of every family",
    },
    {
        "false_alarm_rate": 0.2,
        "channels": ["grad_norm", "loss", "effective_rank", "b0_fraction"],
        "normalisers": {
            "grad_norm": 42.113673290269276,
            "loss": 6.465334236856835,
            "effective_rank": 13.166847667131345,
            "b0_fraction": 6.691686936519179,
        },
        "threshold": 1.3172824269391723,
        "fit_on": "calibration seeds of every family",
    },
]

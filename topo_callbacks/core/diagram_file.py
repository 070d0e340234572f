"""The latest H0 diagram of a monitor, kept as a small JSON file next to a run's logs for `topo-callbacks report`."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["diagram_path", "write_diagram"]


def diagram_path(log_dir: str, monitor: str) -> str:
    """Where the latest H0 diagram of ``monitor`` is kept, next to the logger's files.

    Example:
        >>> diagram_path("logs", "collapse/ci")
        'logs/collapse_diagram_collapse_ci.json'
    """
    return os.path.join(log_dir, f"collapse_diagram_{monitor.replace('/', '_')}.json")


def write_diagram(log_dir: str, diagram: dict[str, Any]) -> None:
    """Overwrite the latest diagram file (small: one float per embedding row)."""
    os.makedirs(log_dir, exist_ok=True)
    with open(diagram_path(log_dir, diagram["monitor"]), "w") as fh:
        json.dump(diagram, fh)

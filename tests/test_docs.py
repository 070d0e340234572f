"""The documented defaults are the code's: one source of truth (the monitor's signature), the docs checked."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from topo_callbacks.core import AlarmRule, CollapseMonitorCore

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def monitor_defaults() -> dict[str, object]:
    params = inspect.signature(CollapseMonitorCore).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def defaults_table() -> str:
    """The README's list of defaults, generated from the signature (paste it into the README when it changes)."""
    values = [f"`{name}={value!r}`".replace("'", '"') for name, value in monitor_defaults().items()]
    lines, line = [], "Defaults:"
    for value in values:
        if len(line) + len(value) + 2 > 116:
            lines.append(line + ",")
            line = value
        else:
            line += (" " if line == "Defaults:" else ", ") + value
    return "\n".join([*lines, line + "."])


def test_readme_defaults_table_is_generated_from_the_signature():
    assert defaults_table() in README, f"README's table of defaults is stale; the code's is:\n{defaults_table()}"


def test_every_numeric_setting_the_readme_states_inline_is_the_default():
    """`max_rise=0.15` in the prose while the code said 0.2: a number given inline for a monitor argument must be
    its default, unless the line marks it as an example ("e.g.")."""
    numeric = {k: v for k, v in monitor_defaults().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    wrong = []
    for line in README.splitlines():
        for name, value in re.findall(r"`(\w+)=([-0-9.e]+)`", line):
            if name in numeric and "e.g." not in line and float(value) != numeric[name]:
                wrong.append(f"{name}={value} (code: {numeric[name]!r}): {line.strip()}")
    assert not wrong, "\n".join(wrong)


def test_the_alarm_rules_own_defaults_are_the_monitors():
    rule = {f.name: f.default for f in dataclasses.fields(AlarmRule)}
    defaults = monitor_defaults()
    for name in ("mode", "min_delta", "patience", "stopping_threshold", "divergence_threshold", "check_finite",
                 "max_rise", "baseline_checks", "rise_patience", "monitor"):  # fmt: skip
        assert rule[name] == defaults[name], name

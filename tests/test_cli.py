"""The `topo-callbacks` command line itself: version, help."""

from __future__ import annotations

import pytest

import topo_callbacks
from topo_callbacks.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"topo-callbacks {topo_callbacks.__version__}"


def test_report_help_states_how_runs_are_chosen(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--run RUN" in help_text
    assert "most recently written" in help_text
    assert all(ext in help_text for ext in (".html", ".png", ".pdf", ".svg"))

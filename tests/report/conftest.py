"""The report of the shared tiny run, built once for the page checks and the browser checks."""
from __future__ import annotations

from pathlib import Path

import pytest

REPORT_METHOD = "final-sim"  # fast: final-checkpoint features only


@pytest.fixture(scope="session")
def tiny_report(tiny_run, tmp_path_factory) -> Path:
    """``build_report(tiny_run, method=REPORT_METHOD)`` with the default options; read it, never change it."""
    from montrage.report import build_report

    out = tmp_path_factory.mktemp("report") / "report.html"
    path = build_report(tiny_run, method=REPORT_METHOD, out=out, progress=False)
    assert path == out
    return path

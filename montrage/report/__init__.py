"""Self-contained static HTML reports of a run and its attribution (``montrage report``)."""
from montrage.report.html import build_report

__all__ = ["build_report"]

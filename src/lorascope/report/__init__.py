"""``lorascope report``: the paper's figures and one self-contained HTML page from stored results."""

from lorascope.report.html import build_report
from lorascope.report.loader import ReportData, load

__all__ = ["ReportData", "build_report", "load"]

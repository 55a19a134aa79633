"""Reports: a self-contained HTML page made of sections (report.sections), with the files behind it,
written together into one directory. `write` makes one from the user's own objects; `write_report`
from a whole `mechscope circuit` run."""

from __future__ import annotations

from .circuit_figure import circuit_figure
from .write import FILES, ReportError, check_output_dir, write, write_report, write_sections

__all__ = ["FILES", "ReportError", "check_output_dir", "circuit_figure", "write", "write_report", "write_sections"]

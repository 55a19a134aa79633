"""The report's circuit viewer section: the span graph of the report's circuits drawn on a canvas by
assets/circuit.js from a contract-B payload (report/sections/circuit_data.py builds it)."""

from __future__ import annotations

from ..page import Section

HTML = """
<div class="cv-controls">
 <label>circuit <input type="range" id="cv-size" min="0" step="1"></label>
 <select id="cv-select" aria-label="circuit"></select>
 <span id="cv-size-info" class="cv-note"></span>
</div>
<div class="cv-controls">
 <label>view <select id="cv-mode">
  <option value="heads">heads</option><option value="layers">layers (per span)</option>
  <option value="spans">layers (all spans)</option></select></label>
 <span class="cv-group">edges
  <label><input type="checkbox" id="cv-kind-within" checked>within</label>
  <label><input type="checkbox" id="cv-kind-k" checked>k</label>
  <label><input type="checkbox" id="cv-kind-v" checked>v</label>
  <label><input type="checkbox" id="cv-kind-q" checked>q</label></span>
 <label>sign <select id="cv-sign"><option value="both">both</option><option value="positive">positive</option>
  <option value="negative">negative</option></select></label>
 <label>|score| ≥ <input type="range" id="cv-threshold" min="0" max="1000" step="1" value="0"></label>
 <span id="cv-threshold-value" class="cv-note">off</span>
 <input type="search" id="cv-search" placeholder="find: a12.h3, m7, logits" aria-label="find a node">
 <button type="button" id="cv-reset">reset view</button>
 <button type="button" id="cv-collapse">collapse all</button>
</div>
<div id="cv-legend" class="cv-legend"></div>
<div id="cv-status" class="cv-note"></div>
<div id="cv-wrap"><canvas id="cv-canvas"></canvas></div>
"""


def section(payload: dict, title: str = "The circuit (span graph)") -> Section:
    """The circuit viewer for `payload` (contract B: nodes, typed-array edge columns, circuits)."""
    return Section(id="circuit", title=title, html=HTML, data=payload,
                   assets=("circuit.js", "circuit.css"))

"""The report's attention viewer section: one head's attention pattern on one example, clean and
counterfactual side by side (assets/attention.js), from a contract-C payload
(report/sections/attention_data.py builds it)."""

from __future__ import annotations

from ..page import Section

HTML = """
<div class="av-controls">
 <label>head <select id="av-head"></select></label>
 <label>example <select id="av-example"></select></label>
 <span class="av-note">rows: query tokens, columns: key tokens; colour bands mark the spans; hover a cell for its
 weight; clicking a head in the circuit view selects it here</span>
</div>
<div id="av-panels"></div>
"""


def section(payload: dict, title: str = "Attention patterns of circuit heads") -> Section:
    """The attention viewer for `payload` (contract C: heads, examples, u8 patterns)."""
    return Section(id="attention", title=title, html=HTML, data=payload,
                   assets=("attention.js", "attention.css"))

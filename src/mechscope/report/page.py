"""The report page: a shell of shared style and scripts around a list of sections.

A `Section` is what one subsystem contributes (circuit discovery's curves and viewer, a patching
heatmap, a lens table, a feature dashboard...): its HTML body, the data its script reads (embedded as
strict JSON in `<script type="application/json" id="data-<id>">`), its script and its CSS. Scripts run
after the shared helpers in `window.MS`:

    MS.data(id)          the parsed data of section `id`
    MS.column(col)       a typed array from a {"b64": ..., "dtype": "u8|i8|u16|i16|u32|i32|f32|f64"} column
    MS.el(tag, attrs, parent)   an SVG element
    MS.fmt(x)            a number for people
    MS.tooltip(evt, text), MS.hideTooltip()   the page's one tooltip

Each section's script runs in its own function, so one failing section leaves the others working (its
error is shown inside it). Pages are self-contained: no network access, no external libraries.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

CSS = """
:root { --ink: #1d2330; --muted: #5a6275; --line: #e2e6ee; --faint: #eef0f4; --pos: #2563eb; --neg: #dc2626; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: var(--ink); background: #fafbfc; }
header { background: var(--ink); color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; color: #c9d1e0; font-size: 13px; }
nav.toc { font-size: 13px; margin-top: 8px; }
nav.toc a { color: #c9d1e0; margin-right: 14px; text-decoration: none; }
nav.toc a:hover { color: #fff; }
main { padding: 12px 24px 40px; width: 100%; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; margin: 14px 0; }
h2 { font-size: 16px; margin: 2px 0 10px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border-bottom: 1px solid var(--faint); padding: 3px 10px 3px 0; text-align: left; }
th { color: var(--muted); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: var(--muted); font-size: 12px; }
.warning { color: #8a4b00; background: #fff4e0; border: 1px solid #f0c36d; padding: 6px 10px; border-radius: 4px; }
.section-error { color: #991b1b; background: #fef2f2; border: 1px solid #fca5a5; padding: 6px 10px; border-radius: 4px; }
.controls { font-size: 13px; margin-bottom: 8px; display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; }
#ms-tooltip { position: fixed; pointer-events: none; background: var(--ink); color: #fff; font-size: 12px;
              padding: 5px 8px; border-radius: 4px; display: none; white-space: pre; z-index: 50; max-width: 60vw; }
"""

HELPERS = r"""
window.MS = (function () {
  const NS = 'http://www.w3.org/2000/svg';
  const TYPES = {u8: Uint8Array, i8: Int8Array, u16: Uint16Array, i16: Int16Array, u32: Uint32Array,
                 i32: Int32Array, f32: Float32Array, f64: Float64Array};
  const cache = {};
  function data(id) {
    if (!(id in cache)) {
      const node = document.getElementById('data-' + id);
      cache[id] = node ? JSON.parse(node.textContent) : null;
    }
    return cache[id];
  }
  const SIXBITS = new Uint8Array(128);
  'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'.split('').forEach((c, i) => { SIXBITS[c.charCodeAt(0)] = i; });
  function bytesOf(b64) {
    if (typeof Uint8Array.fromBase64 === 'function') return Uint8Array.fromBase64(b64);  // native where the browser has it
    const pad = b64.endsWith('==') ? 2 : b64.endsWith('=') ? 1 : 0;
    const out = new Uint8Array(b64.length / 4 * 3 - pad);
    let j = 0;
    for (let i = 0; i < b64.length; i += 4) {
      const v = (SIXBITS[b64.charCodeAt(i)] << 18) | (SIXBITS[b64.charCodeAt(i + 1)] << 12) |
                (SIXBITS[b64.charCodeAt(i + 2)] << 6) | SIXBITS[b64.charCodeAt(i + 3)];
      out[j++] = v >> 16;
      if (j < out.length) out[j++] = (v >> 8) & 255;
      if (j < out.length) out[j++] = v & 255;
    }
    return out;
  }
  function column(col) {
    const bytes = bytesOf(col.b64);
    return new TYPES[col.dtype](bytes.buffer, bytes.byteOffset, bytes.byteLength / TYPES[col.dtype].BYTES_PER_ELEMENT);
  }
  function el(tag, attrs, parent) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(x) {
    if (x === null || x === undefined || Number.isNaN(x)) return 'n/a';
    const a = Math.abs(x);
    if (a >= 1000) return Math.round(x).toLocaleString('en-US');
    if (a >= 1 || a === 0) return x.toFixed(2);
    return x.toPrecision(3);
  }
  function tip() { return document.getElementById('ms-tooltip'); }
  function tooltip(evt, text) {
    const t = tip();
    t.textContent = text;
    t.style.display = 'block';
    const w = t.offsetWidth, h = t.offsetHeight;
    let x = evt.clientX + 12, y = evt.clientY + 12;
    if (x + w > window.innerWidth - 4) x = Math.max(4, evt.clientX - w - 12);
    if (y + h > window.innerHeight - 4) y = Math.max(4, evt.clientY - h - 12);
    t.style.left = x + 'px';
    t.style.top = y + 'px';
  }
  function hideTooltip() { tip().style.display = 'none'; }
  return {data, column, el, fmt, tooltip, hideTooltip};
})();
"""

DTYPES = {"u8": np.uint8, "i8": np.int8, "u16": np.uint16, "i16": np.int16, "u32": np.uint32, "i32": np.int32,
          "f32": np.float32, "f64": np.float64}


@dataclass
class Section:
    """One part of a report page (see the module docstring)."""

    id: str
    title: str
    html: str
    data: dict | None = None
    script: str = ""
    css: str = ""
    assets: tuple[str, ...] = field(default=())  # names of files in report/assets appended to the script / CSS


def column(values, dtype: str) -> dict:
    """A typed-array column for `MS.column`: little-endian bytes of `values` as `dtype`, base64."""
    arr = np.ascontiguousarray(np.asarray(values).astype(DTYPES[dtype], copy=False).astype(
        np.dtype(DTYPES[dtype]).newbyteorder("<"), copy=False))
    return {"b64": base64.b64encode(arr.tobytes()).decode("ascii"), "dtype": dtype}


def asset(name: str) -> str:
    """The text of report/assets/`name`."""
    return resources.files("mechscope.report").joinpath("assets", name).read_text(encoding="utf-8")


def json_safe(obj):
    """`obj` with every NaN or infinity replaced by None (strict JSON, which a browser's JSON.parse needs)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def embed(obj) -> str:
    """`obj` as strict JSON that is safe inside a <script> element."""
    return json.dumps(json_safe(obj), allow_nan=False, separators=(",", ":")).replace("</", "<\\/")


def _script(section: Section) -> str:
    code = section.script + "".join("\n" + asset(a) for a in section.assets if a.endswith(".js"))
    if not code.strip():
        return ""
    sid = json.dumps(section.id)
    # Each section's code runs alone: an error is reported inside its section, the others still run.
    return (f"<script>\n(function () {{\ntry {{\n{code}\n}} catch (err) {{\n"
            f"  const box = document.getElementById({sid});\n"
            f"  if (box) box.insertAdjacentHTML('beforeend', '<p class=\"section-error\">this section failed to draw: ' +"
            f" String(err).replace(/[<&]/g, '') + '</p>');\n  console.error(err);\n}}\n}})();\n</script>")


def render_page(title: str, subtitle: str, sections: list[Section], warnings: tuple[str, ...] | list[str] = ()) -> str:
    """The whole self-contained page."""
    ids = [s.id for s in sections]
    if len(set(ids)) != len(ids):
        raise ValueError(f"section ids must be unique, got {ids}")
    css = CSS + "".join(s.css + "".join(asset(a) for a in s.assets if a.endswith(".css")) for s in sections)
    toc = "".join(f'<a href="#{html.escape(s.id)}">{html.escape(s.title)}</a>' for s in sections)
    notes = "".join(f'<p class="warning">warning: {html.escape(w)}</p>' for w in warnings)
    body = "\n".join(
        f'<section id="{html.escape(s.id)}"><h2>{html.escape(s.title)}</h2>\n{s.html}\n</section>' for s in sections)
    data = "\n".join(f'<script type="application/json" id="data-{html.escape(s.id)}">{embed(s.data)}</script>'
                     for s in sections if s.data is not None)
    scripts = "\n".join(filter(None, (_script(s) for s in sections)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{css}</style></head>
<body>
<header><h1>{html.escape(title)}</h1>
<p>{html.escape(subtitle)}</p>
<nav class="toc">{toc}</nav>
{notes}</header>
<main>
{body}
</main>
<div id="ms-tooltip"></div>
{data}
<script>{HELPERS}</script>
{scripts}
</body></html>
"""


__all__ = ["Section", "asset", "column", "embed", "json_safe", "render_page"]

"""The circuit viewer on the full span graph of a SmolLM2-shaped model (Graph(30, 9, 3), IOI's spans,
~660k span edges) in headless chromium: time to the first complete draw (from navigation start,
reading and decoding the payload included) and each interaction's redraw, next to the issue's budgets
(2 s, 200 ms). Run: PYTHONPATH=src python benchmarks/bench_viewer.py [--repeat 3] [--out timings.json]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from viewer_pages import browser, full_graph_payload, open_page, write_page  # noqa: E402

FIRST_BUDGET_MS, INTERACTION_BUDGET_MS = 2000.0, 200.0


def build_page(path: Path):
    """(page path, payload): random scores over the full span graph, seven nested circuits up to the
    full graph, the largest one saved (tests/viewer_pages.full_graph_payload)."""
    payload = full_graph_payload()
    return write_page(path, payload, None, "viewer benchmark"), payload


def interact(pg) -> dict[str, float]:
    """Each control once on the loaded page; {name: ms of its redraw} (measured in the page)."""
    def run(name, js):
        pg.evaluate(js)
        return pg.evaluate("MS.viewer.renderMs")

    t = {"first_draw": pg.evaluate("MS.viewer.firstDrawMs"), "first_render": pg.evaluate("MS.viewer.timings.first"),
         "decode": pg.evaluate("MS.viewer.decodeMs")}
    t["filter_kind"] = run("filter_kind", "MS.viewer.setKind('within', false)")
    t["filter_kind_back"] = run("filter_kind_back", "MS.viewer.setKind('within', true)")
    t["sign"] = run("sign", "MS.viewer.setSign('positive')")
    run("", "MS.viewer.setSign('both')")
    t["threshold"] = run("threshold", "MS.viewer.setThreshold(MS.viewer.state.threshold || 1e-3)")
    run("", "MS.viewer.setThreshold(0)")
    t["search"] = run("search", "MS.viewer.search('a12.h3')")
    run("", "MS.viewer.search('')")
    node = pg.evaluate("MS.viewer.drawnNodes().find(n => n.startsWith('a12@'))")
    t["pin"] = run("pin", f"MS.viewer.pin('{node}') || MS.viewer.unpin()")
    t["unpin"] = run("unpin", "MS.viewer.unpin()")
    t["zoom"] = run("zoom", "MS.viewer.zoom(2)")
    run("", "MS.viewer.resetView()")
    t["expand"] = run("expand", f"MS.viewer.expand('{node}')")
    t["collapse"] = run("collapse", f"MS.viewer.collapse('{node}')")
    t["slider"] = run("slider", "MS.viewer.select(MS.viewer.state.circuit - 1)")
    t["slider_back"] = run("slider_back", "MS.viewer.select(MS.viewer.state.circuit + 1)")
    t["mode_heads"] = run("mode_heads", "MS.viewer.setMode('heads')")
    t["zoom_heads"] = run("zoom_heads", "MS.viewer.zoom(2)")
    t["mode_spans"] = run("mode_spans", "MS.viewer.setMode('spans')")
    t["mode_layers"] = run("mode_layers", "MS.viewer.setMode('layers')")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="page loads; the median of each timing is shown")
    ap.add_argument("--out", help="write the medians to this JSON file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, payload = build_page(Path(tmp) / "full.html")
        print(f"{payload['edges']['n']:,} span edges, {len(payload['nodes']['name']):,} nodes, "
              f"page {path.stat().st_size / 1e6:.1f} MB")
        runs = []
        with browser(1280, 800) as (context, blocked):
            for _ in range(args.repeat):
                errors: list[str] = []
                pg = open_page(context, path, errors)
                runs.append(interact(pg))
                pg.close()
                assert not errors and not blocked, (errors, blocked)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for k, v in med.items():
        budget = FIRST_BUDGET_MS if k == "first_draw" else None if k in ("first_render", "decode") else INTERACTION_BUDGET_MS
        note = "" if budget is None else f"  (budget {budget:.0f} ms: {'ok' if v <= budget else 'OVER'})"
        print(f"{k:18s} {v:8.1f} ms{note}")
    if args.out:
        Path(args.out).write_text(json.dumps(med, indent=1))


if __name__ == "__main__":
    main()

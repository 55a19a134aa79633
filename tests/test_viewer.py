"""The report's circuit viewer (canvas) and attention viewer in headless chromium, offline: every
control changes what is drawn as the payload says it should (computed here with numpy from the same
payload), the pages fit 1280- and 1920-pixel windows, and the timing hooks report finite numbers
(benchmarks/bench_viewer.py measures them against the issue's budgets)."""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from viewer_pages import browser, column, expected_edges, group_name, open_page, paths_through, threshold_of, tiny_payloads, write_page


@pytest.fixture(scope="module")
def payloads(tiny_model_dirs):
    """A tiny llama's PEAP span circuits on IOI (20, 80 and 300 span edges; 80 saved) and the attention
    of three of its heads, through the report's payload functions."""
    return tiny_payloads(str(tiny_model_dirs["llama"]))


@pytest.fixture(scope="module")
def small_page(tmp_path_factory, payloads):
    circuit, attention, _ = payloads
    return write_page(tmp_path_factory.mktemp("viewer") / "viewer.html", circuit, attention)


@pytest.fixture(scope="module")
def chromium():
    with browser() as (context, blocked):
        yield context, blocked


@pytest.fixture
def page(small_page, chromium):
    """A fresh load of the small page at 1280x800; no page errors and no network request by the end."""
    context, blocked = chromium
    errors: list[str] = []
    pg = open_page(context, small_page, errors)
    pg.evaluate("document.getElementById('cv-canvas').scrollIntoView({block: 'start'})")
    yield pg
    pg.close()
    assert errors == [] and blocked == []


def drawn(pg) -> dict[tuple[str, str], float]:
    return {(p, c, k): s for p, c, k, s, _ in pg.evaluate("MS.viewer.drawnEdges()")}


def status(pg) -> dict:
    return pg.eval_on_selector("#cv-status", "e => ({...e.dataset})")


def same_edges(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, s in want.items():
        g = got[key]
        if math.isnan(s):
            assert g is None or math.isnan(g), key
        else:
            assert g is not None and math.isclose(g, s, rel_tol=1e-5, abs_tol=1e-7), key


def test_default_circuit_is_drawn_as_the_payload_says(page, payloads):
    circuit = payloads[0]
    default = circuit["default"]
    want = expected_edges(circuit, default, "heads")   # small: every head its own node
    s = status(page)
    assert s["mode"] == "heads" and int(s["circuit"]) == default
    assert int(s["edges"]) == len(want) and s["capped"] == "0"
    same_edges(drawn(page), want)
    nodes = {n for pair in want for n in pair[:2]}
    assert int(s["nodes"]) == len(nodes) and set(page.evaluate("MS.viewer.drawnNodes()")) == nodes
    assert page.input_value("#cv-select") == str(default)
    assert "saved" in page.inner_text("#cv-size-info")
    assert "every head its own node" in page.inner_text("#cv-status")
    assert math.isfinite(page.evaluate("MS.viewer.firstDrawMs")) and math.isfinite(page.evaluate("MS.viewer.renderMs"))


def test_slider_and_select_change_the_circuit(page, payloads):
    circuit = payloads[0]
    last = len(circuit["circuits"]) - 1
    page.locator("#cv-size").fill(str(last))
    assert int(status(page)["circuit"]) == last
    same_edges(drawn(page), expected_edges(circuit, last, "heads"))
    info = page.inner_text("#cv-size-info")
    assert f"{circuit['circuits'][last]['n_edges']:,} span edges" in info
    # no concrete count in the payload's entry: the sum over the circuit's edges
    assert circuit["circuits"][last]["concrete_edges"] is None
    mine = (column(circuit["edges"]["member"]) >> last) & 1 == 1
    total = column(circuit["edges"]["concrete"])[mine].astype(np.float64)
    assert f"{round(float(np.nansum(total))):,} concrete edges per example" in info
    page.select_option("#cv-select", "0")
    assert int(status(page)["circuit"]) == 0 and page.input_value("#cv-size") == "0"
    same_edges(drawn(page), expected_edges(circuit, 0, "heads"))
    assert math.isfinite(page.evaluate("MS.viewer.timings.slider"))


def test_edge_type_sign_and_threshold_filters(page, payloads):
    circuit = payloads[0]
    c = circuit["default"]
    page.uncheck("#cv-kind-within")
    same_edges(drawn(page), expected_edges(circuit, c, "heads", kinds=("k", "v", "q")))
    crossing = expected_edges(circuit, c, "heads", kinds=("k", "v", "q"))
    off = next(k for k in ("q", "k", "v") if expected_edges(circuit, c, "heads", kinds=(k,)))
    page.uncheck(f"#cv-kind-{off}")
    want = expected_edges(circuit, c, "heads", kinds=tuple(k for k in ("k", "v", "q") if k != off))
    assert len(want) < len(crossing)
    same_edges(drawn(page), want)
    page.check("#cv-kind-within")
    page.check(f"#cv-kind-{off}")
    page.select_option("#cv-sign", "negative")
    want = expected_edges(circuit, c, "heads", sign="negative")
    same_edges(drawn(page), want)
    assert all(s < 0 for s in drawn(page).values())
    page.select_option("#cv-sign", "both")
    # the slider position just above the median |score| of the circuit's edges
    median = np.nanmedian(np.abs([v for v in expected_edges(circuit, c, "heads").values()]))
    pos = next(p for p in range(1001) if threshold_of(circuit, p) > median)
    page.locator("#cv-threshold").fill(str(pos))
    thr = threshold_of(circuit, pos)
    want = expected_edges(circuit, c, "heads", threshold=thr)
    assert 0 < len(want) < len(expected_edges(circuit, c, "heads"))
    same_edges(drawn(page), want)
    assert page.inner_text("#cv-threshold-value") != "off"
    for name in ("filter", "sign", "threshold"):
        assert math.isfinite(page.evaluate(f"MS.viewer.timings.{name}"))


def test_aggregation_expand_and_collapse_by_clicking(page, payloads):
    circuit = payloads[0]
    c = len(circuit["circuits"]) - 1   # the largest circuit: every layer in several spans
    page.locator("#cv-size").fill(str(c))
    page.select_option("#cv-mode", "layers")
    want = expected_edges(circuit, c, "layers")
    same_edges(drawn(page), want)
    groups = sorted({n for pair in want for n in pair[:2] if re.fullmatch(r"a\d+@.+", n)})
    assert groups and set(groups) <= set(page.evaluate("MS.viewer.drawnNodes()"))
    group = groups[0]
    x, y = page.evaluate(f"MS.viewer.screenOf('{group}')")
    page.mouse.click(x, y)
    want = expected_edges(circuit, c, "layers", expanded={group})
    same_edges(drawn(page), want)
    layer, span = group.split("@")
    nodes = page.evaluate("MS.viewer.drawnNodes()")
    members = [n for n in nodes if n.startswith(layer + ".h") and n.endswith("@" + span)]
    assert group not in nodes and members
    x, y = page.evaluate(f"MS.viewer.screenOf('{members[0]}')")
    page.keyboard.down("Shift")
    page.mouse.click(x, y)
    page.keyboard.up("Shift")
    same_edges(drawn(page), expected_edges(circuit, c, "layers"))
    # across spans, then one level down twice (the second time through the hash instead of the dense table)
    page.select_option("#cv-mode", "spans")
    want = expected_edges(circuit, c, "spans")
    same_edges(drawn(page), want)
    layer = next(n for n in sorted({n for pair in want for n in pair[:2]}, key=len) if re.fullmatch(r"a\d+", n)
                 and len({g for g in groups if g.startswith(n + "@")}) >= 2)
    first, second = [g for g in groups if g.startswith(layer + "@")][:2]
    assert page.evaluate(f"MS.viewer.expand('{layer}')")
    same_edges(drawn(page), expected_edges(circuit, c, "spans", expanded={layer}))
    assert page.evaluate(f"MS.viewer.expand('{first}')")
    same_edges(drawn(page), expected_edges(circuit, c, "spans", expanded={layer, first}))
    page.evaluate(f"MS.viewer.state.denseMax = 0; MS.viewer.expand('{second}')")
    same_edges(drawn(page), expected_edges(circuit, c, "spans", expanded={layer, first, second}))
    page.click("#cv-collapse")
    same_edges(drawn(page), expected_edges(circuit, c, "spans"))
    for name in ("mode", "expand", "collapse"):
        assert math.isfinite(page.evaluate(f"MS.viewer.timings.{name}"))


def test_search_highlights_and_centres_matches(page, payloads):
    circuit = payloads[0]
    c = circuit["default"]
    nodes = sorted({n for pair in expected_edges(circuit, c, "heads") for n in pair[:2]})
    target = next(n for n in nodes if re.fullmatch(r"a\d+\.h\d+@.+", n))
    short = target.split("@")[0]
    page.fill("#cv-search", short)
    want = sorted(n for n in nodes if n.split("@")[0] == short)
    assert sorted(page.evaluate("MS.viewer.matches()")) == want
    assert int(status(page)["matches"]) == len(want)
    box = page.locator("#cv-canvas").bounding_box()
    xs = [page.evaluate(f"MS.viewer.screenOf('{n}')") for n in want]
    cx, cy = np.mean([p[0] for p in xs]), np.mean([p[1] for p in xs])
    assert abs(cx - (box["x"] + box["width"] / 2)) < 2 and abs(cy - (box["y"] + box["height"] / 2)) < 2
    page.fill("#cv-search", "logits")
    assert sorted(page.evaluate("MS.viewer.matches()")) == sorted(n for n in nodes if n.startswith("logits@"))
    # aggregated: the groups holding the head are the matches
    page.select_option("#cv-mode", "layers")
    page.fill("#cv-search", short)
    groups = {n for pair in expected_edges(circuit, c, "layers") for n in pair[:2]}
    assert sorted(page.evaluate("MS.viewer.matches()")) == sorted(
        {group_name(n, "layers") for n in want} & groups)
    assert page.evaluate("MS.viewer.matches()")
    page.fill("#cv-search", "no-such-node")
    assert page.evaluate("MS.viewer.matches()") == []
    assert math.isfinite(page.evaluate("MS.viewer.timings.search"))


def test_pin_highlights_paths_and_escape_unpins(page, payloads):
    edges = [(p, c) for p, c, _, _, _ in page.evaluate("MS.viewer.drawnEdges()")]
    node = next(n for n in page.evaluate("MS.viewer.drawnNodes()") if re.fullmatch(r"a\d+\.h\d+@.+", n))
    x, y = page.evaluate(f"MS.viewer.screenOf('{node}')")
    page.mouse.click(x, y)
    s = status(page)
    assert s["pinned"] == node
    want = paths_through(edges, node)
    assert want and len(want) < len(edges)
    assert {tuple(e) for e in page.evaluate("MS.viewer.highlighted()")} == want
    assert int(s["highlighted"]) == len(want)
    page.keyboard.press("Escape")
    assert status(page)["pinned"] == "" and page.evaluate("MS.viewer.highlighted()") == []
    page.mouse.click(x, y)
    assert status(page)["pinned"] == node
    box = page.locator("#cv-canvas").bounding_box()
    page.mouse.click(box["x"] + box["width"] - 3, box["y"] + 3)   # empty space
    assert status(page)["pinned"] == ""
    assert math.isfinite(page.evaluate("MS.viewer.timings.pin"))


def test_zoom_pan_and_reset(page):
    node = page.evaluate("MS.viewer.drawnNodes()")[0]
    before = page.evaluate(f"MS.viewer.screenOf('{node}')")
    box = page.locator("#cv-canvas").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, -400)
    page.wait_for_function("MS.viewer.state.scale > 1.5")
    page.wait_for_function("MS.viewer.timings.zoom !== undefined")
    zoomed = page.evaluate(f"MS.viewer.screenOf('{node}')")
    assert np.hypot(zoomed[0] - cx, zoomed[1] - cy) > np.hypot(before[0] - cx, before[1] - cy) * 1.4
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 30, steps=4)
    page.mouse.up()
    page.wait_for_function(f"Math.abs(MS.viewer.screenOf('{node}')[0] - {zoomed[0] + 60}) < 1")
    page.click("#cv-reset")   # (clicking it may scroll the page)
    assert page.evaluate("[MS.viewer.state.scale, MS.viewer.state.tx, MS.viewer.state.ty]") == [1, 0, 0]
    top = box["y"] - page.locator("#cv-canvas").bounding_box()["y"]
    after = page.evaluate(f"MS.viewer.screenOf('{node}')")
    assert after[0] == before[0] and math.isclose(after[1] + top, before[1], abs_tol=0.01)
    assert math.isfinite(page.evaluate("MS.viewer.timings.zoom"))


def test_tooltips_for_nodes_and_edges(page):
    node = next(n for n in page.evaluate("MS.viewer.drawnNodes()") if re.fullmatch(r"a\d+\.h\d+@.+", n))
    x, y = page.evaluate(f"MS.viewer.screenOf('{node}')")
    page.mouse.move(x, y)
    tip = page.locator("#ms-tooltip")
    page.wait_for_function(f"document.getElementById('ms-tooltip').textContent.startsWith('{node}')")
    assert tip.is_visible()
    # an edge: its curve's midpoint, away from every node
    t, (px, py) = page.evaluate("MS.viewer.edgeProbe()")
    parent, child, *_ = page.evaluate("MS.viewer.drawnEdges()")[t]
    page.mouse.move(px, py)
    page.wait_for_function("document.getElementById('ms-tooltip').textContent.includes('→')")
    text = tip.inner_text()
    assert f"{parent} → {child}" in text and "score" in text and "concrete edges" in text and "type" in text


def test_attention_viewer_shows_the_payload_patterns(page, payloads):
    _, attention, patterns = payloads
    T = attention["T"]

    def shown(which, x):
        n = len(attention["examples"][x][which]["tokens"])
        cells = page.evaluate(f"MS.attention.cells('{which}')")
        m = np.zeros((T, T))
        for q, k, w in cells:
            m[q, k] = w
        assert len(cells) == n * n
        return m

    for h, x in [(0, 0), (2, 1)]:
        page.select_option("#av-head", str(h))
        page.select_option("#av-example", str(x))
        assert np.allclose(shown("clean", x), patterns[x, 0, h] / 255, atol=1e-4)
        assert np.allclose(shown("counterfactual", x), patterns[x, 1, h] / 255, atol=1e-4)
    ex = attention["examples"][1]["counterfactual"]
    labels = page.eval_on_selector_all("#av-panels svg[data-which=counterfactual] text", "ts => ts.map(t => t.textContent)")
    assert sorted(labels) == sorted(2 * [re.sub(r"\s", "·", t) for t in ex["tokens"]])
    clean = attention["examples"][1]["clean"]
    q, k = len(clean["tokens"]) - 1, 1
    page.locator(f"#av-panels svg[data-which=clean] rect.av-cell[data-q='{q}'][data-k='{k}']").hover()
    text = page.inner_text("#ms-tooltip")
    assert json.dumps(clean["tokens"][q]) in text and json.dumps(clean["tokens"][k]) in text
    assert clean["spans"][q] in text and clean["spans"][k] in text
    assert f"weight {patterns[1, 0, 2, q, k] / 255:.3f}" in text
    # a head clicked in the circuit view selects it here (the largest circuit draws every head)
    page.select_option("#av-head", "0")
    page.locator("#cv-size").fill(str(len(payloads[0]["circuits"]) - 1))
    head = next(n for n in page.evaluate("MS.viewer.drawnNodes()") if n.split("@")[0] == attention["heads"][1])
    x, y = page.evaluate(f"MS.viewer.screenOf('{head}')")
    page.mouse.click(x, y)
    assert page.input_value("#av-head") == "1"
    assert page.get_attribute("#av-panels", "data-head") == attention["heads"][1]


def _check_layout(pg, shot: bytes, width: int) -> None:
    """Not cut off (no horizontal scroll, every control and the canvas inside the window's width) and
    not blank (enough pixels differ from the background)."""
    from matplotlib.image import imread

    assert pg.evaluate("document.documentElement.scrollWidth") <= width
    boxes = pg.evaluate("""() => [...document.querySelectorAll('#cv-canvas, .cv-controls > *, .av-controls > *, #av-panels')]
        .map(e => { const r = e.getBoundingClientRect(); return [e.id || e.className || e.tagName, r.left, r.right]; })""")
    for name, left, right in boxes:
        assert 0 <= left and right <= width + 0.5, (name, left, right)
    canvas = pg.locator("#cv-canvas").bounding_box()
    assert canvas["width"] > 0.9 * width - 80   # the canvas uses the window's width
    pixels = imread(io.BytesIO(shot), format="png")[..., :3]
    drawn = (np.abs(pixels - pixels[0, 0]).sum(-1) > 0.15).mean()
    assert drawn > 0.02, drawn


def screenshots(pg, tag: str) -> list[tuple[int, int]]:
    """Screenshots of the circuit section in 1280x800 and 1920x1080 windows, checked; saved under
    $MECHSCOPE_SCREENSHOTS when it is set."""
    keep = os.environ.get("MECHSCOPE_SCREENSHOTS")
    out = []
    for width, height in [(1280, 800), (1920, 1080)]:
        pg.set_viewport_size({"width": width, "height": height})
        pg.wait_for_function(f"MS.viewer.state && document.getElementById('cv-canvas').clientWidth > {width} * 0.9 - 80")
        pg.evaluate("MS.viewer.resetView()")
        shot = pg.locator("#circuit").screenshot()
        _check_layout(pg, shot, width)
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / f"viewer-{tag}-{width}x{height}.png").write_bytes(shot)
        out.append((width, height))
    return out


def test_pages_fit_1280_and_1920_windows(page):
    assert screenshots(page, "small") == [(1280, 800), (1920, 1080)]


def test_the_full_span_graph_of_a_smollm2_shaped_model(tmp_path, chromium):
    """~670k edges (Graph(30, 9, 3), IOI's nine spans): the largest circuit opens aggregated, every
    interaction reports a finite time, and the screenshots fit (~10 s, so not marked slow). Timing
    budgets: benchmarks/bench_viewer.py."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_viewer

    path, payload = bench_viewer.build_page(tmp_path / "full.html")
    assert payload["edges"]["n"] > 600_000
    context, blocked = chromium
    errors: list[str] = []
    pg = open_page(context, path, errors)
    s = status(pg)
    assert s["mode"] == "layers" and int(s["circuit"]) == payload["default"]
    assert s["capped"] == "0" and int(s["edges"]) > 1000
    timings = bench_viewer.interact(pg)
    assert all(math.isfinite(v) and v >= 0 for v in timings.values()), timings
    assert screenshots(pg, "full") == [(1280, 800), (1920, 1080)]
    out = os.environ.get("MECHSCOPE_TIMINGS_OUT")
    if out:
        Path(out).write_text(json.dumps(timings, indent=1))
    print("viewer timings (ms):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    pg.close()
    assert errors == [] and blocked == []

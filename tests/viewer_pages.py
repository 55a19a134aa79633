"""Pages for the circuit and attention viewers' browser tests and benchmark: contract-B/C payloads,
the page written through the real section functions and page shell, an offline headless chromium, and
an independent (numpy) reading of what the circuit viewer should draw."""

from __future__ import annotations

import base64
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CHROMIUM = "/usr/bin/chromium"
DTYPES = {"u32": "<u4", "u16": "<u2", "u8": "u1", "i8": "i1", "i16": "<i2", "i32": "<i4", "f32": "<f4", "f64": "<f8"}
KINDS = ("within", "k", "v", "q")


def column(col: dict) -> np.ndarray:
    """A contract-B column ({"b64", "dtype"}) as a numpy array."""
    return np.frombuffer(base64.b64decode(col["b64"]), dtype=DTYPES[col["dtype"]])


def write_page(path: Path, circuit: dict | None, attention: dict | None, title: str = "viewer test") -> Path:
    """An HTML page of the circuit and/or attention sections, through the report's page shell."""
    from mechscope.report import page
    from mechscope.report.sections import attention as attention_section
    from mechscope.report.sections import circuit as circuit_section

    sections = []
    if circuit is not None:
        sections.append(circuit_section.section(circuit))
    if attention is not None:
        sections.append(attention_section.section(attention))
    path.write_text(page.render_page(title, "mechscope viewer test", sections), encoding="utf-8")
    return path


@contextmanager
def browser(width: int = 1280, height: int = 800):
    """(context, blocked): a headless chromium context whose every non-file request is aborted and
    recorded in `blocked`."""
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "chromium is missing: run `make setup` (installs it with apt)"
    blocked: list[str] = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        context = b.new_context(viewport={"width": width, "height": height})

        def guard(route):
            url = route.request.url
            if url.startswith(("file:", "data:", "about:")):
                route.continue_()
            else:
                blocked.append(url)
                route.abort()

        context.route("**/*", guard)
        try:
            yield context, blocked
        finally:
            b.close()


def open_page(context, path: Path, errors: list[str]):
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(path.as_uri())
    page.wait_for_function("window.MS && MS.viewer ? MS.viewer.renders > 0 : window.MS && MS.attention",
                           timeout=120_000)
    return page


# ---- what the circuit viewer should draw, computed from the payload alone ----

def _short(name: str) -> tuple[str, str]:
    base, _, span = name.rpartition("@")
    return base, span


def group_name(name: str, mode: str, expanded: set[str] = frozenset()) -> str:
    """The visible node a payload node is drawn as: itself ("heads"), its layer's attention block in
    its span ("layers": a7@S for a7.h*, a7.h*.q, a7.g*.k/v), or across spans ("spans": a7, m7, input,
    logits); an expanded group shows the next finer level."""
    base, span = _short(name)
    m = re.fullmatch(r"a(\d+)\.(?:h\d+|h\d+\.q|g\d+\.[kv])", base)
    if mode == "heads":
        return name
    if mode == "spans":
        across = f"a{m.group(1)}" if m else base
        if across not in expanded:
            return across
    if m and f"a{m.group(1)}@{span}" not in expanded:
        return f"a{m.group(1)}@{span}"
    return name


def expected_edges(payload: dict, circuit: int, mode: str, kinds=KINDS, sign: str = "both",
                   threshold: float = 0.0, expanded: set[str] = frozenset()) -> dict[tuple[str, str], float]:
    """{(parent, child, key span): summed score (NaN when no edge has a score)} of the edges the viewer
    should draw (before its cap on the number of drawn edges); the key span is None for summed edges."""
    e = payload["edges"]
    names = payload["nodes"]["name"]
    member = column(e["member"])
    keep = (member & np.uint32(1 << circuit)) != 0 if payload["circuits"] else np.ones(e["n"], bool)
    kind = column(e["kind"])
    keep &= np.isin(kind, [KINDS.index(k) for k in kinds])
    score = column(e["score"]).astype(np.float64)
    if sign != "both" or threshold > 0:
        keep &= ~np.isnan(score)
    if sign == "positive":
        keep &= score > 0
    if sign == "negative":
        keep &= score < 0
    if threshold > 0:
        keep &= np.abs(score) >= threshold
    vis = [group_name(n, mode, expanded) for n in names]
    spans = payload["spans"]
    out: dict[tuple[str, str, str | None], float] = {}
    for p, c, s, ks in zip(column(e["parent"])[keep], column(e["child"])[keep], score[keep], column(e["key_span"])[keep]):
        a, b = vis[p], vis[c]
        if a == b:
            continue
        key = (a, b, spans[ks] if mode == "heads" and ks >= 0 else None)   # one edge per key span when not summed
        old = out.get(key)
        out[key] = s if old is None or np.isnan(old) else (old if np.isnan(s) else old + s)
    return out


def paths_through(edges: list[tuple[str, str]], node: str) -> set[tuple[str, str]]:
    """The edges on a path into `node` (from its ancestors) or out of it (to its descendants)."""
    def reach(forward: bool) -> set[str]:
        seen, todo = {node}, [node]
        while todo:
            v = todo.pop()
            for p, c in edges:
                a, b = (p, c) if forward else (c, p)
                if a == v and b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen
    down, up = reach(True), reach(False)
    return {(p, c) for p, c in edges if (p in up and c in up) or (p in down and c in down)}


def threshold_of(payload: dict, position: int) -> float:
    """The |score| a position (0..1000) of the threshold slider stands for: log scale between the
    smallest non-zero |score| (at least 1e-8 of the largest) and the largest; 0 = off."""
    a = np.abs(column(payload["edges"]["score"]).astype(np.float64))
    a = a[np.isfinite(a) & (a > 0)]
    hi = a.max()
    lo = max(a.min(), hi * 1e-8)
    return 0.0 if position <= 0 else float(np.exp(np.log(lo) + position / 1000 * (np.log(hi) - np.log(lo))))


# ---- payloads ----

IOI_SPANS = ("bos", "intro", "name_1", "and", "name_2", "context", "s2", "action", "end")


def random_span_scores(graph, spans=IOI_SPANS, seed: int = 0):
    """Positional (PEAP-shaped) EdgeScores of random numbers over `graph` and `spans`: heavy-tailed
    scores of both signs, a few missing, concrete counts per span, the last token in the last span."""
    import torch

    from mechscope.attribution.scores import EdgeScores

    gen = torch.Generator().manual_seed(seed)
    S, L, H = len(spans), graph.n_layers, graph.n_heads

    def draw(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x * torch.exp(1.5 * torch.randn(*shape, generator=gen, dtype=torch.float64))

    values = draw(S, graph.n_edges)
    values[torch.rand(S, graph.n_edges, generator=gen) < 0.01] = float("nan")
    tokens = 1 + torch.randint(0, 4, (S,), generator=gen).double()
    last = torch.zeros(S, dtype=torch.float64)
    last[-1] = 1
    return EdgeScores(graph, values, "peap", "logit_diff", "mean", "random", 1, spans=tuple(spans),
                      crossing={k: draw(L, H, S, S) for k in ("k", "v", "q")},
                      concrete={"within": tokens, "last": last, "crossing": tokens[:, None] * tokens[None, :]})


def full_graph_payload(seed: int = 0) -> dict:
    """The circuit viewer's payload for SmolLM2's shape (Graph(30, 9, 3)) over IOI's nine spans:
    nested top-n circuits of random scores up to the full span graph (~660k edges), the full one saved."""
    import torch

    from mechscope.circuits.span_circuit import SpanCircuit
    from mechscope.graph import Graph
    from mechscope.report.sections.circuit_data import circuit_payload

    scores = random_span_scores(Graph(30, 9, 3), IOI_SPANS, seed)
    full = SpanCircuit.full(scores.graph, scores.spans, scores.concrete["last"] > 0)
    # the full circuit's edges with |score| >= a cut that keeps about n within edges (unpruned: random
    # scores leave few connected paths)
    within = scores.values.abs().nan_to_num(nan=0.0)
    circuits = []
    for n in (1_000, 3_000, 10_000, 30_000, 100_000, 300_000):
        cut = float(torch.kthvalue(-within.flatten(), n).values.neg())
        crossing = {k: full.crossing[k] & (scores.crossing[k].abs() >= cut) for k in full.crossing}
        circuits.append(SpanCircuit(full.graph, full.spans, full.within & (within >= cut), crossing, full.logit_spans))
    circuits.append(full)
    info = [{"normalized": i / len(circuits), "soft": None, "hard": None} for i in range(len(circuits))]
    return circuit_payload(circuits, scores, scores.concrete, info, saved=len(circuits) - 1)


def tiny_payloads(model_dir: str):
    """(circuit payload, attention payload, patterns u8 [examples, 2, heads, T, T]) of a tiny model on
    IOI: PEAP scores, three greedy span circuits; attention of three heads of the largest circuit."""
    import mechscope
    from mechscope.attribution import attribute
    from mechscope.circuits.span_circuit import span_greedy
    from mechscope.report.sections.attention_data import attention_payload
    from mechscope.report.sections.circuit_data import circuit_payload
    from mechscope.tasks import make_task

    model = mechscope.load_model(model_dir, device="cpu")
    data = make_task("ioi", model.tokenizer, 6, seed=0)
    scores = attribute(model, data, "peap", batch_size=6, progress=False)
    circuits = [span_greedy(scores, n) for n in (20, 80, 300)]
    names = {n.split("@")[0] for n in circuit_payload(circuits[-1:], scores)["nodes"]["name"]}
    heads = sorted({tuple(map(int, re.fullmatch(r"a(\d+)\.h(\d+)", n).groups())) for n in names
                    if re.fullmatch(r"a\d+\.h\d+", n)})[:3]
    attention = attention_payload(model, data, heads, n_examples=2)
    circuit = circuit_payload(circuits, scores, scores.concrete, [{"normalized": 0.5}, {"normalized": 0.8}, {}],
                              saved=1, attention_heads=attention["heads"])
    T = attention["T"]
    patterns = column(attention["patterns"]).reshape(-1, 2, len(heads), T, T)
    return circuit, attention, patterns

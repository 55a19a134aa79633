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
DTYPES = {"u32": "<u4", "u16": "<u2", "u8": "u1", "i8": "i1", "i16": "<i2", "f32": "<f4"}
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
    path.write_text(page.render_page(title, sections), encoding="utf-8")
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

def attention_payload(heads=("a0.h1", "a1.h0", "a1.h3"), n_examples: int = 2, seed: int = 0):
    """(contract-C payload, its patterns as uint8 [examples, 2, heads, T, T]) with random causal patterns."""
    tokens = ["<s>", " When", " Mary", " and", " John", " went", " John"]
    spans = ["bos", "intro", "name_1", "and", "name_2", "context", "s2"]
    T = len(tokens)
    rng = np.random.default_rng(seed)
    p = rng.random((n_examples, 2, len(heads), T, T)) * np.tril(np.ones((T, T)))
    q = np.round(p / p.sum(-1, keepdims=True) * 255).astype(np.uint8)
    examples = [{"label": f"ex {i}", "clean": {"tokens": tokens, "spans": spans},
                 "counterfactual": {"tokens": tokens[:-1] + [" Bob"], "spans": spans}} for i in range(n_examples)]
    return {"heads": list(heads), "examples": examples, "T": T,
            "patterns": {"b64": base64.b64encode(q.tobytes()).decode(), "dtype": "u8"}}, q


# INTERIM synthetic contract-B payload (replaced by circuit_payload after the merge)
def _col(a, dtype):
    np_t = {"u32": "<u4", "u16": "<u2", "u8": "u1", "i8": "i1", "i16": "<i2", "f32": "<f4"}[dtype]
    return {"b64": base64.b64encode(np.ascontiguousarray(a, dtype=np_t).tobytes()).decode(), "dtype": dtype}

def synthetic_payload(n_layers=2, n_heads=4, n_kv=2, spans=("a", "b", "c"), n_circuits=4, seed=0, saved=None):
    from mechscope.graph import Graph
    g = Graph(n_layers, n_heads, n_kv)
    rng = np.random.default_rng(seed)
    names, kind, layer, index, span = [], [], [], [], []
    up_of, down_of = {}, {}
    for si, s in enumerate(spans):
        def add(n, k, l, i):
            names.append(f"{n}@{s}"); kind.append(k); layer.append(l); index.append(i); span.append(si)
            return len(names) - 1
        up_of[(si, "input")] = add("input", 0, -1, -1)
        for l in range(n_layers):
            for h in range(n_heads):
                up_of[(si, f"a{l}.h{h}")] = add(f"a{l}.h{h}", 1, l, h)
            up_of[(si, f"m{l}")] = down_of[(si, f"m{l}.in")] = add(f"m{l}", 2, l, -1)
            for h in range(n_heads):
                down_of[(si, f"a{l}.h{h}.q")] = add(f"a{l}.h{h}.q", 3, l, h)
            for kk, c in (("k", 4), ("v", 5)):
                for gg in range(n_kv):
                    down_of[(si, f"a{l}.g{gg}.{kk}")] = add(f"a{l}.g{gg}.{kk}", c, l, gg)
        down_of[(si, "logits")] = add("logits", 6, n_layers, -1)
    P, C, K, KS = [], [], [], []
    eu, ed = g.edge_up.numpy(), g.edge_down.numpy()
    for si in range(len(spans)):
        up = np.array([up_of[(si, n)] for n in g.upstream_names])
        dn = np.array([down_of[(si, n)] for n in g.downstream_names])
        P.append(up[eu]); C.append(dn[ed]); K.append(np.zeros(len(eu), int)); KS.append(np.full(len(eu), -1))
    group = n_heads // n_kv
    for l in range(n_layers):
        for h in range(n_heads):
            for qs in range(len(spans)):
                for ks in range(qs + 1):
                    for kk, c in (("k", 1), ("v", 2)):
                        P.append([down_of[(ks, f"a{l}.g{h // group}.{kk}")]]); C.append([up_of[(qs, f"a{l}.h{h}")]])
                        K.append([c]); KS.append([ks])
                    P.append([down_of[(qs, f"a{l}.h{h}.q")]]); C.append([up_of[(qs, f"a{l}.h{h}")]]); K.append([3]); KS.append([ks])
    P, C, K, KS = (np.concatenate([np.asarray(x) for x in a]) for a in (P, C, K, KS))
    n = len(P)
    score = rng.standard_normal(n) * np.exp(rng.standard_normal(n) * 1.5)
    score[rng.random(n) < 0.02] = np.nan
    order = np.argsort(-np.nan_to_num(np.abs(score), nan=-1), kind="stable")
    P, C, K, KS, score = P[order], C[order], K[order], KS[order], score[order]
    concrete = rng.integers(1, 5, n).astype(float)
    sizes = np.unique(np.geomspace(max(4, n // 200), n, n_circuits).astype(int))
    member = np.zeros(n, np.uint32)
    circuits = []
    for i, k in enumerate(sizes):
        member[:k] |= np.uint32(1 << i)
        circuits.append({"label": f"{k} edges", "n_edges": int(k), "concrete_edges": float(concrete[:k].sum()),
                         "normalized": float(i / len(sizes)), "soft": 0.5, "hard": None, "saved": False})
    default = len(circuits) // 2 if saved is None else saved
    circuits[default]["saved"] = True
    return {"spans": list(spans), "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
            "query_edges": "per_key",
            "nodes": {"name": names, "kind": kind, "layer": layer, "index": index, "span": span},
            "edges": {"n": n, "parent": _col(P, "u32"), "child": _col(C, "u32"), "kind": _col(K, "u8"),
                      "key_span": _col(KS, "i16"), "score": _col(score, "f32"), "concrete": _col(concrete, "f32"),
                      "member": _col(member, "u32")},
            "circuits": circuits, "default": default, "attention_heads": ["a0.h1", "a1.h0"]}

"""What the report shows, as plain JSON-ready data: the span-level circuit graph (nodes laid out by
layer and span, edges with score, kind and concrete token-edge count, and the display sizes each edge
belongs to), the top edges, and attention patterns of the circuit's heads on an example prompt."""

from __future__ import annotations

import torch

from ..circuits.span_circuit import SpanCircuit, span_counts
from ..devices import model_device


def _edge_scores(scores):
    """Span-level score lookups: within [n_spans, n_edges] and crossing (None for non-positional scores)."""
    if scores.positional:
        return scores.values, scores.crossing
    return scores.values[None], None


def graph_data(scores, circuits: list[SpanCircuit], evaluation) -> dict:
    """Nodes and edges of the union of `circuits` (nested display sizes), each edge with a bitmask of
    the sizes it belongs to."""
    g = circuits[0].graph
    spans = list(circuits[0].spans)
    counts = span_counts(evaluation, circuits[0].span_map(evaluation), len(spans))
    within_scores, crossing_scores = _edge_scores(scores)
    edges: dict[tuple, dict] = {}
    owner_kind = {}
    for l in range(g.n_layers):
        for h in range(g.n_heads):
            owner_kind[g.q_slice(l).start + h] = ("q", l, h)
        for kind in ("k", "v"):
            sl = g.k_slice(l) if kind == "k" else g.v_slice(l)
            for grp in range(g.n_kv_heads):
                owner_kind[sl.start + grp] = (kind, l, grp)
        owner_kind[g.mlp_in_index(l)] = ("mlp", l, None)

    def up_node(u: int, s: int) -> str:
        return f"{g.upstream_names[u]}@{spans[s]}"

    def down_node(v: int, s: int) -> str:
        if v == g.logits_index:
            return f"logits@{spans[s]}"
        kind, l, i = owner_kind[v]
        if kind == "mlp":
            return f"m{l}@{spans[s]}"
        if kind == "q":
            return f"a{l}.h{i}.q@{spans[s]}"
        return f"a{l}.g{i}.{kind}@{spans[s]}"

    logit_edge = (g.edge_down == g.logits_index).tolist()
    for bit, c in enumerate(circuits):
        for s, e in c.within.nonzero().tolist():
            u, v = int(g.edge_up[e]), int(g.edge_down[e])
            key = ("w", s, e)
            if key not in edges:
                concrete = counts["last"][s] if logit_edge[e] else counts["tokens"][s]
                score = within_scores[min(s, within_scores.shape[0] - 1), e]
                edges[key] = {"source": up_node(u, s), "target": down_node(v, s), "kind": "within",
                              "score": float(score), "concrete": float(concrete), "sizes": 0}
            edges[key]["sizes"] |= 1 << bit
        for kind in ("k", "v", "q"):
            for idx in c.crossing[kind].nonzero().tolist():
                key = (kind, *idx)
                if key not in edges:
                    edges[key] = _crossing_edge(kind, idx, spans, g.group_size, crossing_scores, counts)
                edges[key]["sizes"] |= 1 << bit
    node_names = sorted({e["source"] for e in edges.values()} | {e["target"] for e in edges.values()})
    nodes = [_layout(name, spans, g) for name in node_names]
    used_rows = sorted({n["row"] for n in nodes})
    row_index = {r: i for i, r in enumerate(used_rows)}
    for n in nodes:
        n["y"] = row_index[n["row"]]
    return {
        "spans": spans,
        "n_rows": len(used_rows),
        "sizes": [c.n_edges for c in circuits],
        "nodes": nodes,
        # Crossing edges of a non-positional circuit have no score of their own (None).
        "edges": sorted(edges.values(), key=lambda e: -abs(e["score"]) if e["score"] is not None else 0),
    }


def _crossing_edge(kind: str, idx: list[int], spans: list[str], group_size: int, crossing_scores, counts) -> dict:
    """One crossing edge of a span circuit as the report draws it. idx: (layer, head, key span, query
    span), or (layer, head, span) for a whole-row query edge. A query edge joins the head's query input
    and output at the query span; a per-key one also names the key span its scores are against
    (`key_span`; None for whole-row ones)."""
    l, h, b = idx[0], idx[1], idx[-1]
    a = idx[2] if len(idx) == 4 else None
    score = float(crossing_scores[kind][tuple(idx)]) if crossing_scores is not None else None
    if kind == "q":
        source = f"a{l}.h{h}.q@{spans[b]}"
        concrete = counts["tokens"][b] if a is None else counts["pairs"][a, b]
    else:
        source = f"a{l}.g{h // group_size}.{kind}@{spans[a]}"
        concrete = counts["pairs"][a, b]
    edge = {"source": source, "target": f"a{l}.h{h}@{spans[b]}", "kind": kind, "score": score,
            "concrete": float(concrete), "sizes": 0}
    if kind == "q":
        edge["key_span"] = None if a is None else spans[a]
    return edge


def _layout(name: str, spans: list[str], g) -> dict:
    """Position of a node: x = span column + offset of the component inside it; row by layer and role
    (attention inputs, heads, MLP), the input at the bottom and the logits at the top."""
    comp, span = name.split("@", 1)
    col = spans.index(span)
    heads = g.n_heads
    if comp == "input":
        row, off, kind, layer = 0, 0.5, "input", -1
    elif comp == "logits":
        row, off, kind, layer = 3 * g.n_layers + 1, 0.5, "logits", g.n_layers
    elif comp.startswith("m"):
        layer = int(comp[1:])
        row, off, kind = 3 * layer + 3, 0.5, "mlp"
    else:
        parts = comp.split(".")
        layer = int(parts[0][1:])
        if len(parts) == 2:  # a head
            h = int(parts[1][1:])
            row, off, kind = 3 * layer + 2, (h + 0.5) / heads, "head"
        else:  # an attention input: q of a head, k / v of a key-value group
            idx, kind = int(parts[1][1:]), parts[2]
            row = 3 * layer + 1
            if kind == "q":
                off = (idx + 0.5) / heads
            else:
                centre = (idx + 0.5) / g.n_kv_heads
                off = centre + (-0.25 if kind == "k" else 0.25) / g.n_kv_heads
    return {"id": name, "label": comp, "span": span, "kind": kind, "layer": layer, "row": row, "x": col + off}


def top_edges(graph: dict, k: int = 25) -> list[dict]:
    """The `k` edges of largest |score| among those drawn."""
    ranked = [e for e in graph["edges"] if e["score"] is not None]
    return sorted(ranked, key=lambda e: -abs(e["score"]))[:k]


@torch.no_grad()
def attention_patterns(model, dataset, index: int, heads: list[tuple[int, int]]) -> dict:
    """Attention patterns [query, key] of `heads` ((layer, head) pairs) on example `index`'s clean
    prompt, with its tokens and span names."""
    ex = dataset.examples[index]
    tokens = torch.tensor([ex.clean], device=model_device(model))
    layers = sorted({l for l, _ in heads})
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    span_names = dataset.schema.spans
    return {
        "tokens": [model.tokenizer.decode([t]) for t in ex.clean],
        "spans": [span_names[s] for s in ex.span_of_positions()],
        "heads": [
            {"name": f"a{l}.h{h}",
             "pattern": [[round(float(x), 4) for x in row] for row in cache[f"blocks.{l}.attn.hook_pattern"][0, h]]}
            for l, h in heads
        ],
    }


def circuit_heads(graph: dict, limit: int = 12) -> list[tuple[int, int]]:
    """Heads in the drawn circuits, those with the largest total |score| of their edges first."""
    weight: dict[tuple[int, int], float] = {}
    for e in graph["edges"]:
        for end in (e["source"], e["target"]):
            comp = end.split("@")[0]
            parts = comp.split(".")
            if len(parts) == 2 and parts[0].startswith("a") and parts[1].startswith("h"):
                key = (int(parts[0][1:]), int(parts[1][1:]))
                s = abs(e["score"]) if e["score"] is not None else 0.0
                weight[key] = weight.get(key, 0.0) + s
    return [k for k, _ in sorted(weight.items(), key=lambda kv: -kv[1])[:limit]]

"""The circuit viewer's data: the union of the circuits to step through (e.g. every circuit on a
faithfulness curve) as typed-array columns, each edge with a bit per circuit it belongs to, and one
entry per circuit with its size and faithfulness."""

from __future__ import annotations

from typing import Sequence

from ...circuits.circuit import CircuitError
from ...circuits.edge_table import circuit_edges
from ..page import column

MAX_CIRCUITS = 32  # bits of the member column


def circuit_payload(circuits: Sequence, scores=None, counts: dict | None = None, info: Sequence[dict] | None = None,
                    saved: int | None = None, default: int | None = None, attention_heads: Sequence[str] = ()) -> dict:
    """The viewer's payload (see the report contract) for `circuits` (SpanCircuit or Circuit, smallest
    first). `info[i]` may give circuit i's `label`, `concrete_edges`, `normalized`, `soft` and `hard`;
    `saved` is the circuit marked as the saved one (None: none is); `default` the one shown first (the
    saved one, else the largest)."""
    if not circuits:
        raise CircuitError("the circuit viewer needs at least one circuit")
    if len(circuits) > MAX_CIRCUITS:
        raise CircuitError(f"the circuit viewer steps through at most {MAX_CIRCUITS} circuits, got {len(circuits)}")
    info = list(info) if info is not None else [{} for _ in circuits]
    if len(info) != len(circuits):
        raise CircuitError(f"{len(info)} info entries for {len(circuits)} circuits")
    if default is None:
        default = len(circuits) - 1 if saved is None else saved
    for name, i in (("default", default), ("saved", saved)):
        if i is not None and not 0 <= i < len(circuits):
            raise CircuitError(f"{name} circuit {i} is not one of the {len(circuits)} circuits")
    edges = circuit_edges(circuits, scores, counts)
    g, nodes = edges.graph, edges.nodes
    entries = []
    for i, (c, extra) in enumerate(zip(circuits, info)):
        n = int(((edges.member >> i) & 1).sum())
        entries.append({
            "label": extra.get("label", f"{n:,} span edges"),
            "n_edges": n,
            "concrete_edges": extra.get("concrete_edges"),
            "normalized": extra.get("normalized"),
            "soft": extra.get("soft"),
            "hard": extra.get("hard"),
            "saved": i == saved,
        })
    return {
        "spans": list(edges.spans),
        "n_layers": g.n_layers,
        "n_heads": g.n_heads,
        "n_kv_heads": g.n_kv_heads,
        "query_edges": edges.query_edges,
        "nodes": {"name": nodes.names, "kind": nodes.kind.tolist(), "layer": nodes.layer.tolist(),
                  "index": nodes.index.tolist(), "span": nodes.span.tolist()},
        "edges": {
            "n": len(edges),
            "parent": column(edges.parent.numpy(), "u32"),
            "child": column(edges.child.numpy(), "u32"),
            "kind": column(edges.kind.numpy(), "u8"),
            "key_span": column(edges.key_span.numpy(), "i8" if len(edges.spans) < 128 else "i16"),
            "score": column(edges.score.numpy(), "f32"),
            "concrete": column(edges.concrete.numpy(), "f32"),
            # the narrowest type that holds a bit per circuit
            "member": column(edges.member.numpy(), "u8" if len(circuits) <= 8 else "u16" if len(circuits) <= 16 else "u32"),
        },
        "circuits": entries,
        "default": default,
        "attention_heads": list(attention_heads),
    }

"""EAP-IG's graph JSON (the `Graph.to_json` / `Graph.from_json` files of hannamw/EAP-IG), written and
read for non-positional circuits (docs/formats.md §9).

EAP-IG names the same upstream nodes as we do (`input`, `a{l}.h{h}`, `m{l}`) and one downstream node
per head input and MLP: an edge into a head is `PARENT->a{l}.h{h}<q>` (or `<k>`, `<v>`), into an MLP
`PARENT->m{l}`, into the logits `PARENT->logits`. Our graph gives each key-value group one key and
one value input (`a{l}.g{g}.k`), shared by the group's query heads (grouped-query attention); EAP-IG
gives every head its own. The mapping:

* writing: a group's key (value) edge is written on every head of the group, each with the group
  edge's membership and its whole score (not a share: a threshold on |score| then keeps or drops the
  group's heads together, as it keeps or drops the group edge);
* reading: the heads of a group must agree (all in the graph or none; `groups="exact"`, the default),
  else CircuitError names the edge; `groups="any"` keeps a group edge when any of its heads' edges is
  in the graph, `groups="all"` when all are. A group edge's score is its heads' common score, or the mean of
  their scores where they differ.

A file lists every edge of the graph with `in_graph` and `score`; EAP-IG needs a number for every
edge, so an edge without a score is written with 0.0 and the file says so (`mechscope.scored`).
`nodes` hold `in_graph` for each node: the logits always, the input when it sends a circuit edge, a
head or MLP when it sends one and reads one (a head reads through its query input or its group's key
or value input; a group edge written on a head outside the circuit is then dropped by EAP-IG's own
`prune`, and read back here as the group edge it came from). `cfg` holds
`n_layers`, `n_heads`, `parallel_attn_mlp`, `n_key_value_heads` and, when known, `d_model` (EAP-IG's
`Graph.from_json` needs it). The circuit's model, method, task and info travel in a `mechscope` field
that EAP-IG ignores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..data.dataset import parse_json_object, read_text_file
from ..devices import HOST
from ..errors import ParameterError
from ..fileio import write_json
from ..graph import Graph, GraphError
from .circuit import Circuit, CircuitError

EAPIG_FORMAT = "mechscope-eapig/1"
GROUP_RULES = ("exact", "any", "all")


def _children(graph: Graph) -> list[list[str]]:
    """For each of our downstream nodes, the EAP-IG child names it stands for (a key or value input:
    one per head of its group, with the `<k>` / `<v>` suffix)."""
    out: list[list[str]] = []
    for name in graph.downstream_names:
        if name == "logits":
            out.append(["logits"])
        elif name.endswith(".in"):
            out.append([name[: -len(".in")]])
        else:
            layer, unit, kind = name.split(".")
            if kind == "q":
                out.append([f"{layer}.{unit}<q>"])
            else:
                g = int(unit[1:])
                heads = range(g * graph.group_size, (g + 1) * graph.group_size)
                out.append([f"{layer}.h{h}<{kind}>" for h in heads])
    return out


def eapig_edge_names(graph: Graph) -> list[tuple[str, int]]:
    """Every EAP-IG edge of `graph` as (its name, the index of our edge it belongs to); a key or value
    edge of a group appears once per head of the group."""
    children = _children(graph)
    up, down = graph.edge_up.tolist(), graph.edge_down.tolist()
    return [(f"{graph.upstream_names[u]}->{child}", e) for e, (u, d) in enumerate(zip(up, down))
            for child in children[d]]


def _node_flags(circuit: Circuit) -> dict[str, bool]:
    """EAP-IG's node membership: the logits always; the input when it sends a circuit edge; a head or
    MLP when it sends one and reads one (a head through its query input or its group's key or value
    input)."""
    g = circuit.graph
    sends = torch.zeros(g.n_upstream, dtype=torch.bool, device=HOST)
    sends[g.edge_up[circuit.edges]] = True
    read = torch.zeros(g.n_downstream, dtype=torch.bool, device=HOST)
    read[g.edge_down[circuit.edges]] = True
    reads = torch.zeros(g.n_upstream, dtype=torch.bool, device=HOST)
    reads[0] = True
    for d, owners in enumerate(g.downstream_owner()):
        if bool(read[d]):
            reads[owners] = True
    flags = dict(zip(g.upstream_names, (sends & reads).tolist()))
    flags["logits"] = True
    return flags


def _refuse_span_circuit(circuit) -> None:
    if not isinstance(circuit, Circuit):
        spans = getattr(circuit, "spans", None)
        what = f"a span circuit (spans {list(spans)})" if spans is not None else type(circuit).__name__
        raise CircuitError(f"EAP-IG graphs have no positions: {what} cannot be written as EAP-IG JSON; export "
                           "a non-positional circuit (eap, eap-ig, exact), or this one as csv, graphml or dot")


def to_eapig_json(circuit: Circuit, scores=None, d_model: int | None = None) -> dict:
    """`circuit` as EAP-IG's graph JSON (a dict). Edge scores come from `scores` (EdgeScores of the
    circuit's graph), else from the circuit's own (`circuit.scores`), else 0.0 (unscored).
    `d_model` (the model's width) goes into `cfg` when given: EAP-IG's loader needs it."""
    _refuse_span_circuit(circuit)
    g = circuit.graph
    if scores is not None:
        from .circuit_scores import edge_scores_for

        values = edge_scores_for(g, scores, CircuitError)
    else:
        values = circuit.scores
    scored = values is not None
    score_list = values.nan_to_num(nan=0.0).tolist() if scored else [0.0] * g.n_edges
    member = circuit.edges.tolist()
    cfg = {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_attn_mlp": g.parallel_attn_mlp,
           "n_key_value_heads": g.n_kv_heads}
    if d_model is not None:
        cfg["d_model"] = int(d_model)
    return {
        "cfg": cfg,
        "nodes": {name: {"in_graph": flag} for name, flag in _node_flags(circuit).items()},
        "edges": {name: {"score": score_list[e], "in_graph": member[e]} for name, e in eapig_edge_names(g)},
        "mechscope": {"format": EAPIG_FORMAT, "model": circuit.model, "method": circuit.method,
                      "task": circuit.task, "info": circuit.info, "scored": scored},
    }


def save_eapig(circuit: Circuit, path: str | os.PathLike, scores=None, d_model: int | None = None) -> Path:
    """Write `circuit` as an EAP-IG graph JSON file, atomically (`to_eapig_json`)."""
    return write_json(path, to_eapig_json(circuit, scores, d_model))


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _graph_of(path: Path, cfg) -> Graph:
    if not isinstance(cfg, dict):
        raise CircuitError(f"{path}: field 'cfg' must be a JSON object")
    spec = {}
    for key, theirs in (("n_layers", "n_layers"), ("n_heads", "n_heads"), ("n_kv_heads", "n_key_value_heads")):
        value = cfg.get(theirs)
        if value is None and key == "n_kv_heads":
            value = spec["n_heads"]  # no grouping
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CircuitError(f"{path}: field 'cfg': '{theirs}' must be a positive integer, not {value!r}")
        spec[key] = value
    parallel = cfg.get("parallel_attn_mlp", False)
    if not isinstance(parallel, bool):
        raise CircuitError(f"{path}: field 'cfg': 'parallel_attn_mlp' must be true or false, not {parallel!r}")
    try:
        return Graph(**spec, parallel_attn_mlp=parallel)
    except GraphError as exc:
        raise CircuitError(f"{path}: field 'cfg': {exc}") from None


def _metadata(path: Path, data: dict) -> dict:
    meta = data.get("mechscope", {})
    if not isinstance(meta, dict):
        raise CircuitError(f"{path}: field 'mechscope' must be a JSON object")
    for key, kind, what in (("model", str, "a string"), ("method", str, "a string"), ("task", str, "a string"),
                            ("info", dict, "a JSON object"), ("scored", bool, "true or false")):
        if key in meta and not isinstance(meta[key], kind):
            raise CircuitError(f"{path}: field 'mechscope': '{key}' must be {what}")
    return meta


def load_eapig(path: str | os.PathLike, groups: str = "exact") -> Circuit:
    """The circuit of an EAP-IG graph JSON file: our edges whose EAP-IG edges have `in_graph` true, with
    their scores. `groups` says how a key-value group's edge is read from its heads' edges: `exact`
    (they must agree), `any` or `all`. CircuitError names the file and field of malformed input."""
    if groups not in GROUP_RULES:
        raise ParameterError(f"unknown groups rule '{groups}'; choose one of {', '.join(GROUP_RULES)}")
    path = Path(path)
    data = parse_json_object(read_text_file(path, "EAP-IG graph file", CircuitError), str(path), CircuitError)
    for key in ("cfg", "edges"):
        if key not in data:
            raise CircuitError(f"{path}: missing field '{key}' (not an EAP-IG graph file)")
    graph = _graph_of(path, data["cfg"])
    meta = _metadata(path, data)
    items = data["edges"]
    if not isinstance(items, dict):
        raise CircuitError(f"{path}: field 'edges' must be a JSON object of edge name: {{score, in_graph}}")
    ours = dict(eapig_edge_names(graph))
    n_heads = torch.zeros(graph.n_edges, dtype=torch.long, device=HOST)  # heads listed per edge
    n_in = torch.zeros(graph.n_edges, dtype=torch.long, device=HOST)  # of which in the graph
    total = torch.zeros(graph.n_edges, dtype=torch.float64, device=HOST)  # their scores' sum
    size = torch.bincount(torch.tensor(list(ours.values()), dtype=torch.long, device=HOST), minlength=graph.n_edges)
    heads, flags, values = [], [], []
    for name, item in items.items():
        e = ours.get(name)
        if e is None:
            raise CircuitError(f"{path}: field 'edges': '{name}' is not an edge of a graph of this shape "
                               f"({graph.n_layers} layers, {graph.n_heads} heads)")
        if not isinstance(item, dict) or not isinstance(item.get("in_graph"), bool):
            raise CircuitError(f"{path}: field 'edges': '{name}' must be an object with 'in_graph' true or false")
        score = item.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise CircuitError(f"{path}: field 'edges': '{name}': 'score' must be a number, not {score!r}")
        heads.append(e)
        flags.append(item["in_graph"])
        values.append(math.nan if score is None else float(score))
    index = torch.tensor(heads, dtype=torch.long, device=HOST)
    n_heads.index_add_(0, index, torch.ones_like(index))
    n_in.index_add_(0, index, torch.tensor(flags, dtype=torch.long, device=HOST))
    total.index_add_(0, index, torch.tensor(values, dtype=torch.float64, device=HOST))
    if groups == "exact":
        mixed = ((n_in > 0) & (n_in < size)).nonzero().flatten()
        if len(mixed):
            e = int(mixed[0])
            raise CircuitError(f"{path}: field 'edges': the heads of key-value group edge '{graph.edge_name(e)}' "
                               f"disagree ({int(n_in[e])} of {int(size[e])} in the graph; {len(mixed)} such group "
                               "edges); read it with groups='any' or groups='all'")
    edges = n_in > 0 if groups == "any" else n_in == size
    scores = None
    if meta.get("scored", True):
        # the heads' common score when they agree (exactly: no rounding of a mean), else their mean
        given = torch.tensor(values, dtype=torch.float64, device=HOST)
        low = torch.full_like(total, math.inf).scatter_reduce(0, index, given, "amin")
        high = torch.full_like(total, -math.inf).scatter_reduce(0, index, given, "amax")
        scores = torch.where(n_heads > 0, total / n_heads.clamp(min=1), math.nan)
        scores = torch.where(low == high, low, scores)
    return Circuit(graph, edges, model=meta.get("model", ""), method=meta.get("method", ""),
                   info=dict(meta.get("info", {})), task=meta.get("task", ""), scores=scores)

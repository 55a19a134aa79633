"""Exports and imports: scores and circuits as pandas tables, networkx graphs, DOT text, EAP-IG's graph
JSON, and circuit.json's task and scores. Each export is checked against an enumeration written here
from the scores' tensors or the circuit's own JSON, not from the edge table the exports read."""

from __future__ import annotations

import json
import math
import re
import warnings

import networkx as nx
import pandas as pd
import pytest
import torch
from test_attribution import ioi_like
from typer.testing import CliRunner

import mechscope
from mechscope.attribution import attribute
from mechscope.attribution.scores import EdgeScores
from mechscope.circuits.circuit import Circuit, CircuitError
from mechscope.circuits.eapig import load_eapig, save_eapig, to_eapig_json
from mechscope.circuits.exports import quote
from mechscope.circuits.span_circuit import SpanCircuit, load_any_circuit
from mechscope.cli import app
from mechscope.errors import MechscopeWarning
from mechscope.graph import Graph


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    """The tiny Llama (4 heads in 2 key-value groups) and IOI-shaped pairs with spans."""
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    return model, ioi_like(model.tokenizer, 6, seed=1)


@pytest.fixture(scope="module")
def scored(llama):
    model, data = llama
    return {
        "per_key": attribute(model, data, "peap", progress=False),
        "whole_row": attribute(model, data, "peap", query_edges="whole_row", progress=False),
        "eap": attribute(model, data, "eap", progress=False),
    }


# ------------------------------------------------------------------------------------------------
# An independent enumeration of a span graph's edges: (parent, child, key span) -> (score, concrete)
# ------------------------------------------------------------------------------------------------


def down_node(name: str) -> str:
    """Our downstream node name as an export node (an MLP's input is the MLP's node)."""
    return name[: -len(".in")] if name.endswith(".in") else name


def expected_edges(scores: EdgeScores) -> dict[tuple, tuple[float, float]]:
    g = scores.graph
    nan = math.nan
    if not scores.positional:
        return {(f"{g.upstream_names[int(g.edge_up[e])]}@*", f"{down_node(g.downstream_names[int(g.edge_down[e])])}@*",
                 None): (float(scores.values[e]), nan) for e in range(g.n_edges)}
    spans = scores.spans
    c = scores.concrete
    last = c["last"]
    out = {}
    for s, span in enumerate(spans):
        for e in range(g.n_edges):
            up, down = g.upstream_names[int(g.edge_up[e])], g.downstream_names[int(g.edge_down[e])]
            if down == "logits" and not last[s] > 0:
                continue
            count = float(last[s]) if down == "logits" else float(c["within"][s])
            out[(f"{up}@{span}", f"{down_node(down)}@{span}", None)] = (float(scores.values[s, e]), count)
    per_key = scores.query_edges == "per_key"
    for l in range(g.n_layers):
        for h in range(g.n_heads):
            grp = h // g.group_size
            for b, query in enumerate(spans):
                head = f"a{l}.h{h}@{query}"
                if not per_key:
                    out[(f"a{l}.h{h}.q@{query}", head, None)] = (float(scores.crossing["q"][l, h, b]),
                                                                  float(c["within"][b]))
                for a, key in enumerate(spans[: b + 1]):
                    pairs = float(c["crossing"][a, b])
                    for kind in ("k", "v"):
                        out[(f"a{l}.g{grp}.{kind}@{key}", head, None)] = (float(scores.crossing[kind][l, h, a, b]), pairs)
                    if per_key:
                        out[(f"a{l}.h{h}.q@{query}", head, key)] = (float(scores.crossing["q"][l, h, a, b]), pairs)
    return out


def frame_edges(df: pd.DataFrame) -> dict[tuple, tuple[float, float]]:
    keys = [(p, c, k) for p, c, k in zip(df["parent"], df["child"], df["key_span"])]
    assert len(set(keys)) == len(keys)
    return dict(zip(keys, zip(df["score"].tolist(), df["concrete"].tolist())))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("kind", ["per_key", "whole_row", "eap"])
def test_scores_to_frame_holds_every_score_exactly(scored, kind):
    scores = scored[kind]
    df = scores.to_frame()
    assert list(df.columns) == ["edge", "parent", "child", "type", "parent_span", "child_span", "key_span", "score",
                                "concrete"]
    assert df["edge"].is_unique
    got, want = frame_edges(df), expected_edges(scores)
    assert set(got) == set(want)
    for key, (score, concrete) in want.items():
        assert same(got[key][0], score) and same(got[key][1], concrete), (key, got[key], (score, concrete))
    # columns agree with the node names; rows are sorted by |score|
    assert (df["parent"].str.split("@").str[1] == df["parent_span"]).all()
    assert (df["child"].str.split("@").str[1] == df["child_span"]).all()
    assert (df["score"].abs().diff().dropna() <= 0).all()
    counts = df["type"].value_counts()
    if kind == "eap":
        assert set(df["type"]) == {"within"} and (df["child_span"] == "*").all()
    else:
        assert counts["k"] == counts["v"] > 0
        assert df["key_span"].notna().sum() == (counts["q"] if kind == "per_key" else 0)


# ------------------------------------------------------------------------------------------------
# circuit.json: task and scores
# ------------------------------------------------------------------------------------------------


def test_circuit_json_keeps_task_and_scores(tmp_path, scored):
    circuit = scored["eap"].top_n(20)
    circuit.task = "ioi"
    circuit.set_scores(scored["eap"])
    back = Circuit.load(circuit.save(tmp_path / "c.json"))
    assert back.task == "ioi" and torch.equal(back.edges, circuit.edges)
    assert torch.equal(back.scores[back.edges], circuit.scores[circuit.edges])
    assert back.scores[~back.edges].isnan().all()  # only the circuit's edges are saved
    data = json.loads((tmp_path / "c.json").read_text())
    assert set(data["scores"]) == set(data["edges"])

    for kind in ("per_key", "whole_row"):
        span = scored[kind].greedy(60)
        span.task = "ioi"
        span.set_scores(scored[kind])
        back = SpanCircuit.load(span.save(tmp_path / f"{kind}.json"))
        assert back.task == "ioi" and back.query_edges == kind
        for key in ("within", "k", "v", "q"):
            mask = span.within if key == "within" else span.crossing[key]
            assert torch.equal(back.scores[key][mask], span.scores[key][mask]), (kind, key)
            assert back.scores[key][~mask].isnan().all()


def test_old_circuit_files_without_task_or_scores_still_load(tmp_path, scored):
    for circuit in (scored["eap"].top_n(20), scored["per_key"].greedy(40)):
        data = circuit.to_json()
        assert "scores" not in data  # no scores kept: none written
        del data["task"]
        path = tmp_path / "old.json"
        path.write_text(json.dumps(data))
        back = load_any_circuit(path)
        assert back.task == "" and back.scores is None and back.n_edges == circuit.n_edges


def test_bad_scores_in_circuit_json_are_one_line_errors(tmp_path, scored):
    circuit = scored["eap"].top_n(10).set_scores(scored["eap"])
    data = circuit.to_json()
    first = data["edges"][0]
    for scores, message in (([1, 2], "field 'scores' must be a JSON object"),
                            ({"input->nowhere": 1.0}, "field 'scores': edge 'input->nowhere' is not in a graph"),
                            ({first: "big"}, f"field 'scores': edge '{first}' must be a number or null")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**data, "scores": scores}))
        with pytest.raises(CircuitError, match=re.escape(message)):
            Circuit.load(path)
    span = scored["per_key"].greedy(30).set_scores(scored["per_key"])
    data = span.to_json()
    data["scores"]["crossing"] = data["scores"]["crossing"][:-1]
    path = tmp_path / "bad_span.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CircuitError, match="'crossing' must be a list of"):
        SpanCircuit.load(path)
    with pytest.raises(CircuitError, match="spans"):
        span.set_scores(scored["eap"])  # non-positional scores for a circuit over many spans


def test_discover_circuit_saves_task_and_scores(llama, tmp_path):
    from mechscope.circuits.discovery import discover_circuit

    model, _ = llama
    from mechscope.tasks import make_task

    data = make_task("ioi", model.tokenizer, 8, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MechscopeWarning)
        run = discover_circuit(model, data, "eap", fractions=(0.1, 1.0), progress=False)
    back = load_any_circuit(run.circuit.save(tmp_path / "circuit.json"))
    assert back.task == "ioi"
    expected = run.scores["eap"].values.double()
    assert torch.equal(back.scores[back.edges], expected[back.edges])


# ------------------------------------------------------------------------------------------------
# EAP-IG's graph JSON
# ------------------------------------------------------------------------------------------------


def random_circuit(graph: Graph, seed: int) -> Circuit:
    gen = torch.Generator().manual_seed(seed)
    c = Circuit(graph, torch.rand(graph.n_edges, generator=gen) < 0.3, model="tiny", method="eap", task="ioi",
                info={"selection": "top_n"})
    c.scores = torch.randn(graph.n_edges, generator=gen, dtype=torch.float64)
    return c


def eapig_edge_count(g: Graph) -> int:
    """Edges of EAP-IG's graph of this shape, from its construction: each attention layer reads the
    residual stream (input and every earlier head and MLP) at each head's q, k and v; each MLP reads it
    with (or, in parallel models, without) its own layer's heads; the logits read everything."""
    per_layer = g.n_heads + 1
    total = 0
    for l in range(g.n_layers):
        before = 1 + l * per_layer
        total += before * 3 * g.n_heads
        total += before + (0 if g.parallel_attn_mlp else g.n_heads)
    return total + 1 + g.n_layers * per_layer


@pytest.mark.parametrize("shape", [(2, 4, 2, False), (3, 6, 3, False), (2, 4, 4, False), (2, 6, 2, True)],
                         ids=["gqa", "gqa3", "mha", "parallel-gqa"])
def test_eapig_round_trip_is_identical(tmp_path, shape):
    g = Graph(*shape[:3], parallel_attn_mlp=shape[3])
    circuit = random_circuit(g, seed=sum(shape))
    data = to_eapig_json(circuit, d_model=64)
    assert len(data["edges"]) == eapig_edge_count(g)
    assert data["cfg"] == {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_attn_mlp": g.parallel_attn_mlp,
                           "n_key_value_heads": g.n_kv_heads, "d_model": 64}
    assert all(re.fullmatch(r"(input|a\d+\.h\d+|m\d+)->(a\d+\.h\d+<[qkv]>|m\d+|logits)", n) for n in data["edges"])
    back = load_eapig(save_eapig(circuit, tmp_path / "graph.json"))
    assert torch.equal(back.edges, circuit.edges)
    assert torch.equal(back.scores, circuit.scores)
    assert (back.graph.spec(), back.model, back.method, back.task, back.info) == (
        g.spec(), "tiny", "eap", "ioi", {"selection": "top_n"})
    # a group's key edge is on every head of the group, with the group edge's score and membership
    e = next(e for e in range(g.n_edges) if g.downstream_names[int(g.edge_down[e])].endswith(".k"))
    up, down = g.upstream_names[int(g.edge_up[e])], g.downstream_names[int(g.edge_down[e])]
    layer, group = down.split(".")[:2]
    grp = int(group[1:])
    for h in range(grp * g.group_size, (grp + 1) * g.group_size):
        item = data["edges"][f"{up}->{layer}.h{h}<k>"]
        assert item == {"score": float(circuit.scores[e]), "in_graph": bool(circuit.edges[e])}


def test_eapig_round_trip_of_found_circuits(tmp_path, scored):
    for circuit in (scored["eap"].top_n(25), scored["eap"].greedy(25)):
        back = load_eapig(save_eapig(circuit, tmp_path / "g.json", scores=scored["eap"]))
        assert torch.equal(back.edges, circuit.edges)
        assert torch.equal(back.scores, scored["eap"].values.double())
        data = json.loads((tmp_path / "g.json").read_text())
        nodes = {n for n, v in data["nodes"].items() if v["in_graph"]}
        assert nodes == set(circuit.nodes()) | {"logits"}  # pruned: each node used sends an edge


def test_eapig_groups_that_disagree(tmp_path):
    g = Graph(2, 4, 2)
    circuit = random_circuit(g, seed=0)
    data = to_eapig_json(circuit)
    e = next(e for e in range(g.n_edges) if g.downstream_names[int(g.edge_down[e])] == "a1.g0.v")
    up = g.upstream_names[int(g.edge_up[e])]
    data["edges"][f"{up}->a1.h0<v>"]["in_graph"] = True
    data["edges"][f"{up}->a1.h1<v>"]["in_graph"] = False
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CircuitError, match=re.escape(f"the heads of key-value group edge '{up}->a1.g0.v' disagree")):
        load_eapig(path)
    assert bool(load_eapig(path, groups="any").edges[e]) and not bool(load_eapig(path, groups="all").edges[e])
    others = torch.ones(g.n_edges, dtype=torch.bool)
    others[e] = False
    assert torch.equal(load_eapig(path, groups="any").edges[others], circuit.edges[others])


def test_foreign_eapig_file_without_our_fields(tmp_path):
    """A file as EAP-IG writes it: no `mechscope` field, no n_key_value_heads (one per head)."""
    g = Graph(2, 3, 3)
    circuit = random_circuit(g, seed=5)
    data = to_eapig_json(circuit)
    del data["mechscope"], data["cfg"]["n_key_value_heads"]
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps(data))
    back = load_eapig(path)
    assert torch.equal(back.edges, circuit.edges) and torch.allclose(back.scores, circuit.scores)
    assert back.graph.spec() == g.spec() and back.method == ""


def test_eapig_bad_input(tmp_path, scored):
    g = Graph(2, 4, 2)
    good = to_eapig_json(random_circuit(g, seed=1))
    name = next(iter(good["edges"]))
    cases = [
        ({k: v for k, v in good.items() if k != "cfg"}, "missing field 'cfg' (not an EAP-IG graph file)"),
        ({**good, "cfg": {**good["cfg"], "n_heads": 0}}, "field 'cfg': 'n_heads' must be a positive integer"),
        ({**good, "cfg": {**good["cfg"], "n_key_value_heads": 3}}, "field 'cfg': 4 heads do not divide into 3"),
        ({**good, "edges": {**good["edges"], "input->a9.h0<q>": {"score": 1, "in_graph": True}}},
         "field 'edges': 'input->a9.h0<q>' is not an edge"),
        ({**good, "edges": {**good["edges"], name: {"score": 1.0, "in_graph": 1}}},
         f"field 'edges': '{name}' must be an object with 'in_graph' true or false"),
        ({**good, "edges": {**good["edges"], name: {"score": "x", "in_graph": True}}},
         f"field 'edges': '{name}': 'score' must be a number"),
        ({**good, "edges": []}, "field 'edges' must be a JSON object"),
        ({**good, "mechscope": {"task": 3}}, "field 'mechscope': 'task' must be a string"),
    ]
    for i, (data, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(CircuitError, match=re.escape(f"{path}: {message}")):
            load_eapig(path)
    with pytest.raises(CircuitError, match="no such"):
        load_eapig(tmp_path / "missing.json")
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(CircuitError, match="text.json"):
        load_eapig(tmp_path / "text.json")
    with pytest.raises(CircuitError, match="EAP-IG graphs have no positions: a span circuit"):
        to_eapig_json(scored["per_key"].greedy(20))


# ------------------------------------------------------------------------------------------------
# networkx and DOT
# ------------------------------------------------------------------------------------------------


def span_circuit_edges(circuit: SpanCircuit) -> set[tuple[str, str]]:
    """(parent, child) of every edge, read from the circuit's JSON (per-key query edges merged)."""
    data = circuit.to_json()
    out = set()
    for span, names in data["within"].items():
        for name in names:
            up, down = name.split("->")
            out.add((f"{up}@{span}", f"{down_node(down)}@{span}"))
    for item in data["crossing"]:
        m = re.fullmatch(r"(.+):a(\d+)\.h(\d+)\.([kvq]) -> (.+):a\d+\.h\d+", item)
        key, l, h, kind, query = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)
        parent = (f"a{l}.h{h}.q@{query}" if kind == "q"
                  else f"a{l}.g{h // circuit.graph.group_size}.{kind}@{key}")
        out.add((parent, f"a{l}.h{h}@{query}"))
    return out


def circuit_edges_named(circuit: Circuit) -> tuple[set, set]:
    """(within edges from Circuit.edge_names(), crossing edges q/k/v -> head between used nodes)."""
    g = circuit.graph
    within = set()
    for name in circuit.edge_names():
        up, down = name.split("->")
        within.add((f"{up}@*", f"{down_node(down)}@*"))
    senders = {u for u, _ in within}
    readers = {d for _, d in within}
    crossing = set()
    for l in range(g.n_layers):
        for h in range(g.n_heads):
            head = f"a{l}.h{h}@*"
            for node in (f"a{l}.h{h}.q@*", f"a{l}.g{h // g.group_size}.k@*", f"a{l}.g{h // g.group_size}.v@*"):
                if head in senders and node in readers:
                    crossing.add((node, head))
    return within, crossing


def test_span_circuit_to_networkx(scored):
    for kind in ("per_key", "whole_row"):
        scores = scored[kind]
        circuit = scores.greedy(80)
        graph = circuit.to_networkx(scores)
        assert isinstance(graph, nx.DiGraph)
        assert set(graph.edges) == span_circuit_edges(circuit)
        want = expected_edges(scores)
        for u, v, attrs in graph.edges(data=True):
            if attrs["type"] == "q" and kind == "per_key":
                keys = attrs["key_spans"].split(",")
                assert math.isclose(attrs["score"], sum(want[(u, v, k)][0] for k in keys), rel_tol=1e-12)
                assert len(keys) == int(circuit.crossing["q"][int(u[1:].split(".")[0]), int(u.split(".")[1][1:]),
                                                            :, circuit.spans.index(v.split("@")[1])].sum())
            else:
                assert attrs["score"] == want[(u, v, None)][0]
            parent_kind = graph.nodes[u]["kind"]
            assert attrs["type"] == (parent_kind if parent_kind in ("q", "k", "v") else "within")
        for node, attrs in graph.nodes(data=True):
            assert attrs["span"] == node.split("@")[1] and attrs["kind"] in ("input", "head", "mlp", "q", "k", "v",
                                                                             "logits")
    bare = scored["per_key"].greedy(40).to_networkx()  # no scores: none on the edges
    assert not any("score" in a for _, _, a in bare.edges(data=True))


def test_circuit_to_networkx_has_exactly_its_edges(scored, tmp_path):
    scores = scored["eap"]
    g = scores.graph
    unpruned = Circuit(g, torch.rand(g.n_edges, generator=torch.Generator().manual_seed(0)) < 0.25)
    for circuit in (scores.top_n(30), unpruned):
        graph = circuit.to_networkx(scores)
        within, crossing = circuit_edges_named(circuit)
        assert {(u, v) for u, v, t in graph.edges(data="type") if t == "within"} == within
        assert {(u, v) for u, v, t in graph.edges(data="type") if t != "within"} == crossing
        for u, v, t in graph.edges(data="type"):
            assert t == "within" or t == (u.split("@")[0].split(".")[-1])
        nx.write_graphml(graph, tmp_path / "c.graphml")
        assert nx.read_graphml(tmp_path / "c.graphml").number_of_edges() == graph.number_of_edges()


def test_dot_text(scored):
    for circuit, scores in ((scored["per_key"].greedy(60), scored["per_key"]), (scored["eap"].top_n(30), None)):
        text = circuit.to_dot(scores)
        arrows = [line for line in text.splitlines() if "->" in line]
        n_edges = circuit.n_edges if isinstance(circuit, SpanCircuit) else sum(map(len, circuit_edges_named(circuit)))
        assert len(arrows) == n_edges
        assert all(re.fullmatch(r'  "[^"]+" -> "[^"]+" \[.*\];', line) for line in arrows)
        node_lines = [line for line in text.splitlines() if re.match(r'  "[^"]+" \[shape=', line)]
        names = {re.match(r'  "([^"]+)"', line).group(1) for line in node_lines}
        ends = {n for line in arrows for n in re.findall(r'"([^"]+)" ->|-> "([^"]+)"', line)[0] if n}
        assert ends <= names
        assert text.startswith("digraph ") and text.rstrip().endswith("}") and "rank=same" in text
        assert ("label=" in "".join(arrows)) == (scores is not None)
    assert quote('say "hi"\\') == '"say \\"hi\\"\\\\"'


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def test_export_command(tmp_path, scored):
    scores = scored["eap"]
    circuit = scores.top_n(30).set_scores(scores)
    circuit.save(tmp_path / "circuit.json")
    scores.save(tmp_path / "scores.safetensors")
    runner = CliRunner()
    for to in ("eapig", "dot", "graphml", "csv"):
        out = tmp_path / f"out.{to}"
        extra = ["--scores", str(tmp_path / "scores.safetensors")] if to == "dot" else []
        result = runner.invoke(app, ["export", str(tmp_path / "circuit.json"), "--to", to, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
    assert torch.equal(load_eapig(tmp_path / "out.eapig").edges, circuit.edges)
    frame = pd.read_csv(tmp_path / "out.csv")
    assert len(frame) == len(circuit.to_frame())
    assert frame.set_index("edge")["score"].to_dict() == pytest.approx(
        circuit.to_frame().set_index("edge")["score"].to_dict(), nan_ok=True)
    assert nx.read_graphml(tmp_path / "out.graphml").number_of_edges() == circuit.to_networkx().number_of_edges()
    assert (tmp_path / "out.dot").read_text() == circuit.to_dot(scores)

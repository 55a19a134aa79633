"""`circuit_figure` and `mechscope figure`: static figures of a circuit (SVG, PDF, PNG) on a 4-layer tiny
Llama with IOI scores. The labels a figure must show are enumerated here from the circuit's own masks,
independently of the edge table the figure is drawn from."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import matplotlib
import matplotlib.image
import pytest
import tiny
import torch
from typer.testing import CliRunner

import mechscope
from mechscope.attribution.scores import EdgeScores
from mechscope.circuits.circuit import greedy
from mechscope.circuits.edge_table import circuit_edges
from mechscope.circuits.span_circuit import span_greedy
from mechscope.cli import app
from mechscope.errors import ParameterError
from mechscope.graph import Graph
from mechscope.report import circuit_figure
from mechscope.report.circuit_figure import figure_edges
from mechscope.tasks import make_task

runner = CliRunner()
SVG = "{http://www.w3.org/2000/svg}"
LEGEND = ("attention head (aL.hH)", "MLP (mL)", "query input (q)", "key input (k)", "value input (v)",
          "input / logits", "positive score", "negative score", "no score of its own", "within position",
          "inside attention (q/k/v -> head)")


@pytest.fixture(scope="module")
def llama4(tmp_path_factory, tiny_tokenizer):
    path = tiny.save_model_dir(tmp_path_factory.mktemp("llama4") / "llama", "llama", tiny_tokenizer, seed=1, n_layers=4)
    model = mechscope.load_model(str(path), device="cpu")
    data = make_task("ioi", model.tokenizer, 12, seed=0)
    peap = mechscope.attribute(model, data, "peap", progress=False)
    eap = mechscope.attribute(model, data, "eap", progress=False)
    return model, peap, eap


def circuit_of_about(scores, n_edges: int):
    """The smallest greedy span circuit with at least `n_edges` span edges."""
    budget = n_edges
    while True:
        c = span_greedy(scores, budget)
        if c.n_edges >= n_edges:
            return c
        budget = int(budget * 1.3) + 1


def svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()  # parses: well-formed XML
    return [("".join(t.itertext())).strip() for t in root.iter(f"{SVG}text")]


def drawn_edges(path) -> int:
    root = ET.parse(path).getroot()
    return sum(1 for g in root.iter(f"{SVG}g") if re.fullmatch(r"edge-\d+", g.get("id", "")))


def expected_labels(circuit) -> set[str]:
    """Head, MLP, input and logits labels of the circuit's nodes, from its within and crossing masks."""
    g = circuit.graph
    out = set()
    for _, e in circuit.within.nonzero().tolist():
        out.add(g.upstream_names[int(g.edge_up[e])])
        down = g.downstream_names[int(g.edge_down[e])]
        if down == "logits" or down.endswith(".in"):
            out.add(down.removesuffix(".in"))
    for kind in ("k", "v", "q"):
        for idx in circuit.crossing[kind].nonzero().tolist():
            out.add(f"a{idx[0]}.h{idx[1]}")
    return out


NODE_LABEL = re.compile(r"a\d+\.h\d+|m\d+|a\d+|input|logits")


def test_svg_shows_every_node_label_the_legend_and_text_as_text(llama4, tmp_path):
    _, peap, _ = llama4
    c = circuit_of_about(peap, 30)
    assert c.n_edges < 400
    before = matplotlib.rcParams["svg.fonttype"]
    path = circuit_figure(c, tmp_path / "c.svg", scores=peap, faithfulness={"normalized": 0.8125, "soft": 0.5})
    assert matplotlib.rcParams["svg.fonttype"] == before  # set for the figure only
    texts = svg_texts(path)
    labels = {t for t in texts if NODE_LABEL.fullmatch(t)}
    assert labels == expected_labels(c)
    for entry in LEGEND:
        assert entry in texts, entry
    caption = " ".join(texts)
    assert f"{c.n_edges:,} span edges" in caption
    assert "normalized 0.812" in caption and "soft 0.500" in caption
    # the concrete size from the scores' counts
    concrete = float(circuit_edges([c], peap).concrete.sum())
    assert f"{concrete:,.0f} concrete token-level edges" in caption
    for span in {peap.spans[s] for s in c.within.any(1).nonzero().flatten().tolist()}:
        assert span in texts


def test_a_non_positional_circuit_is_one_column(llama4, tmp_path):
    _, _, eap = llama4
    c = greedy(eap, 40)
    texts = svg_texts(circuit_figure(c, tmp_path / "eap.svg", scores=eap, aggregate="none"))
    assert "all positions" in texts
    assert {t for t in texts if NODE_LABEL.fullmatch(t)} == expected_labels(mechscope.SpanCircuit.from_circuit(c))


def test_pdf_and_png(llama4, tmp_path):
    _, peap, _ = llama4
    c = circuit_of_about(peap, 30)
    pdf = circuit_figure(c, tmp_path / "c.pdf", scores=peap)
    assert pdf.read_bytes()[:5] == b"%PDF-"
    png = circuit_figure(c, tmp_path / "c.PNG", scores=peap)
    image = matplotlib.image.imread(png)[..., :3]
    assert image.shape[0] > 300 and image.shape[1] > 300
    ink = (image < 0.9).any(-1).mean()
    assert 0.01 < ink < 0.6  # drawn on, and not a filled rectangle
    assert len({tuple(p) for p in image.reshape(-1, 3)[:: 97].tolist()}) > 10  # several colours


def test_layers_merge_heads_and_sum_their_scores(llama4, tmp_path):
    _, peap, _ = llama4
    c = circuit_of_about(peap, 120)
    edges = circuit_edges([c], peap)
    every, merged = figure_edges(edges, "none"), figure_edges(edges, "layers")
    assert merged.aggregated and not every.aggregated
    assert len(merged.labels) < len(every.labels)
    assert not any(re.fullmatch(r"a\d+\.h\d+(\.[qkv])?|a\d+\.g\d+\.[kv]", x) for x in merged.labels)
    # one merged edge against a direct sum over the scores: the MLP of layer 0 into layer 1's attention
    # (its heads' q, k and v inputs) at one span
    g = c.graph
    into_layer1 = torch.zeros(g.n_edges, dtype=torch.bool)
    into_layer1[torch.isin(g.edge_down, torch.arange(g.q_slice(1).start, g.v_slice(1).stop))] = True
    from_m0 = g.edge_up == g.mlp_index(0)
    chosen = (c.within & from_m0 & into_layer1).sum(1)
    s = int(chosen.argmax())
    assert chosen[s] >= 2, "the circuit should feed several of layer 1's inputs from m0 at one span"
    direct = float(peap.values[s][c.within[s] & from_m0 & into_layer1].double().sum())
    names = merged.names()
    p, q = names.index(f"m0@{c.spans[s]}"), names.index(f"a1@{c.spans[s]}")
    row = ((merged.parent == p) & (merged.child == q) & (merged.style == 0)).nonzero().flatten()
    assert len(row) == 1
    assert float(merged.score[row[0]]) == pytest.approx(direct, rel=1e-9, abs=1e-12)
    texts = svg_texts(circuit_figure(c, tmp_path / "layers.svg", scores=peap, aggregate="layers"))
    assert "a1" in texts and not any(re.fullmatch(r"a\d+\.h\d+", t) for t in texts)
    assert "a layer's heads and their q/k/v (aL)" in texts
    assert any("merged per span" in t for t in texts)


def test_max_edges_caps_the_drawn_edges(llama4, tmp_path):
    _, peap, _ = llama4
    c = circuit_of_about(peap, 120)
    path = circuit_figure(c, tmp_path / "cap.svg", scores=peap, aggregate="none", max_edges=50)
    assert drawn_edges(path) == 50
    assert any(f"the top 50 of {c.n_edges:,} edges by |score| drawn" in t for t in svg_texts(path))
    # the 50 drawn are the 50 largest |score|
    view = figure_edges(circuit_edges([c], peap), "none", 50)
    every = figure_edges(circuit_edges([c], peap), "none", 10_000)
    assert torch.equal(view.score.abs(), every.score[:50].abs())
    # auto merges heads once the circuit has more edges than max_edges, and not below
    assert drawn_edges(circuit_figure(c, tmp_path / "all.svg", scores=peap)) == c.n_edges
    auto = svg_texts(circuit_figure(c, tmp_path / "auto.svg", scores=peap, max_edges=c.n_edges - 1))
    assert not any(re.fullmatch(r"a\d+\.h\d+", t) for t in auto) and "a0" in auto


@pytest.mark.parametrize("name, kwargs, message", [
    ("c.gif", {}, "give a path ending in .svg, .pdf, .png (not '.gif')"),
    ("c", {}, "(not 'no suffix')"),
    ("c.svg", {"aggregate": "heads"}, "unknown aggregate 'heads'"),
    ("c.svg", {"max_edges": 0}, "max_edges must be at least 1"),
])
def test_bad_arguments_leave_no_file(llama4, tmp_path, name, kwargs, message):
    _, peap, _ = llama4
    c = circuit_of_about(peap, 30)
    with pytest.raises(ParameterError, match=re.escape(message)):
        circuit_figure(c, tmp_path / name, scores=peap, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_scores_of_another_graph_are_refused(llama4, tmp_path):
    _, peap, _ = llama4
    c = circuit_of_about(peap, 30)
    other = EdgeScores(Graph(3, 4, 2), torch.zeros(Graph(3, 4, 2).n_edges), method="eap", metric="m",
                       ablation="counterfactual", model="", n_examples=1)
    with pytest.raises(ParameterError, match="another graph than the circuit's \\(layers 3 vs 4"):
        circuit_figure(c, tmp_path / "c.svg", scores=other)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_figure(llama4, tmp_path):
    _, peap, _ = llama4
    c = circuit_of_about(peap, 30)
    circuit, scores = c.save(tmp_path / "circuit.json"), peap.save(tmp_path / "scores.safetensors")
    out = tmp_path / "fig.svg"
    result = runner.invoke(app, ["figure", str(circuit), "--out", str(out), "--scores", str(scores),
                                 "--aggregate", "none", "--title", "IOI"])
    assert result.exit_code == 0, result.output
    texts = svg_texts(out)
    assert "IOI" in texts and {t for t in texts if NODE_LABEL.fullmatch(t)} == expected_labels(c)
    pdf = tmp_path / "fig.pdf"
    result = runner.invoke(app, ["figure", str(circuit), "--out", str(pdf), "--max-edges", "10"])
    assert result.exit_code == 0, result.output
    assert pdf.read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("case", ["suffix", "missing", "other graph", "aggregate"])
def test_cli_refuses_bad_input_before_drawing(llama4, tmp_path, case):
    _, peap, _ = llama4
    circuit = circuit_of_about(peap, 30).save(tmp_path / "circuit.json")
    other = EdgeScores(Graph(3, 4, 2), torch.zeros(Graph(3, 4, 2).n_edges), method="eap", metric="m",
                       ablation="counterfactual", model="", n_examples=1).save(tmp_path / "other.safetensors")
    out = tmp_path / ("fig.jpg" if case == "suffix" else "fig.svg")
    args = {"suffix": [str(circuit)], "missing": [str(tmp_path / "nope.json")],
            "other graph": [str(circuit), "--scores", str(other)],
            "aggregate": [str(circuit), "--aggregate", "heads"]}[case]
    before = sorted(tmp_path.iterdir())
    result = runner.invoke(app, ["figure", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")], result.output
    assert "Traceback" not in result.output
    assert sorted(tmp_path.iterdir()) == before


def test_the_report_figures_quote_size(llama4, tmp_path):
    """report.write draws circuit.png and circuit.svg of the given circuit, with its concrete size on
    the report's examples (as `concrete_edges` counts them) and the report's title."""
    import mechscope.report

    model, peap, _ = llama4
    evaluation = make_task("ioi", model.tokenizer, 6, seed=3)
    c = circuit_of_about(peap, 30)
    out = mechscope.report.write(tmp_path / "r", scores=peap, circuit=c, dataset=evaluation, title="peap circuit: ioi")
    assert {"circuit.png", "circuit.svg"} <= {p.name for p in out.iterdir()}
    caption = " ".join(svg_texts(out / "circuit.svg"))
    assert f"{c.concrete_edges(evaluation)['total']:,.0f} concrete token-level edges" in caption
    assert "peap circuit: ioi" in caption


def test_an_empty_circuit_is_drawn(llama4, tmp_path):
    _, peap, _ = llama4
    empty = mechscope.SpanCircuit.empty(peap.graph, peap.spans)
    path = circuit_figure(empty, tmp_path / "empty.svg", scores=peap)
    assert drawn_edges(path) == 0 and any("0 span edges" in t for t in svg_texts(path))

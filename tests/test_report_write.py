"""`mechscope.report.write`: a report from the user's own objects. Each subset of inputs gives exactly
its sections and files; edges.csv and the embedded data hold the objects' numbers; bad input is a
clear error that leaves nothing behind."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from html.parser import HTMLParser

import pytest
import torch

import mechscope
import mechscope.report
from mechscope.circuits.edge_table import circuit_edges, score_edges
from mechscope.circuits.evaluation import faithfulness_curve
from mechscope.circuits.span_circuit import SpanCircuit
from mechscope.errors import MechscopeWarning, ParameterError
from mechscope.report import ReportError, write
from mechscope.tasks import make_task



class _Page(HTMLParser):
    """Section ids, embedded data (strictly parsed) and the edges table's rows of a report page."""

    def __init__(self):
        super().__init__()
        self.sections, self.data, self.rows = [], {}, []
        self._data_id = None
        self._in_edges = self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
            self._in_edges = a["id"] == "edges"
        elif tag == "script" and a.get("type") == "application/json":
            self._data_id = a["id"].removeprefix("data-")
        elif tag == "tr" and self._in_edges:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._row.append(a.get("data-v"))

    def handle_endtag(self, tag):
        if tag == "script":
            self._data_id = None
        elif tag == "tr" and self._row:
            self.rows.append(self._row)
            self._row = None
        elif tag == "section":
            self._in_edges = False

    def handle_data(self, text):
        if self._data_id:
            def refuse(constant):
                raise AssertionError(f"non-standard JSON constant {constant}")

            self.data[self._data_id] = json.loads(text, parse_constant=refuse)


def parse(out) -> _Page:
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def run(tiny_model_dirs):
    """A tiny Llama, an IOI dataset, PEAP and EAP scores and a PEAP curve that kept its circuits."""
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    data = make_task("ioi", model.tokenizer, 10, seed=0)
    peap = mechscope.attribute(model, data, "peap", batch_size=10, progress=False)
    eap = mechscope.attribute(model, data, "eap", batch_size=10, progress=False)
    with warnings.catch_warnings():  # a random model's signal is weak
        warnings.simplefilter("ignore", MechscopeWarning)
        curve = faithfulness_curve(model, peap, data, fractions=(0.01, 0.1, 1.0), selection="greedy", batch_size=10,
                                   progress=False)
    return {"model": model, "data": data, "peap": peap, "eap": eap, "curve": curve}


def _files(out) -> set[str]:
    return {p.name for p in out.iterdir()}


CASES = {
    # name: (inputs, sections, files besides report.html)
    "scores": (("scores",), {"edges"}, {"scores.safetensors", "edges.csv"}),
    "circuit": (("circuit",), {"circuit", "edges"}, {"circuit.json", "edges.csv", "circuit.png", "circuit.svg"}),
    "circuit+scores+dataset": (("circuit", "scores", "dataset"), {"circuit", "edges"},
                               {"circuit.json", "scores.safetensors", "edges.csv", "circuit.png", "circuit.svg"}),
    "curve": (("curve",), {"curves", "circuit"}, {"curves.png"}),
    "curve-without-circuits": (("bare_curve",), {"curves"}, {"curves.png"}),
    "summary": (("summary",), {"summary"}, {"summary.json"}),
    "model+dataset": (("model", "dataset"), {"attention"}, set()),
    "everything": (("scores", "circuit", "curve", "dataset", "model", "summary"),
                   {"summary", "curves", "circuit", "edges", "attention"},
                   {"scores.safetensors", "circuit.json", "edges.csv", "curves.png", "summary.json", "circuit.png",
                    "circuit.svg"}),
}


def _inputs(run, names) -> dict:
    curve = run["curve"]
    every = {"scores": run["peap"], "circuit": curve.circuits[1], "curve": curve,
             "bare_curve": dataclasses.replace(curve, circuits=None), "dataset": run["data"], "model": run["model"],
             "summary": {"task": "ioi", "note": "mine", "n_examples": 10, "gap": float("nan")}}
    out = {("curve" if n == "bare_curve" else n): every[n] for n in names}
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_each_input_gives_its_sections_and_files(run, tmp_path, case):
    names, sections, files = CASES[case]
    out = write(tmp_path / "r", **_inputs(run, names))
    assert out == tmp_path / "r"
    page = parse(out)
    want = [s for s in ("summary", "curves", "circuit", "edges", "attention") if s in sections]
    assert page.sections == want
    assert _files(out) == files | {"report.html"}
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no temporary directory left
    text = (out / "report.html").read_text()
    for needle in ("http://", "https://", "<link", "src="):
        assert needle not in text.replace("http://www.w3.org/2000/svg", ""), needle
    if "summary" in sections:
        assert json.loads((out / "summary.json").read_text())["gap"] is None  # NaN as null, strict JSON
        assert "mine" in text


def test_curves_data_and_saved_note(run, tmp_path):
    curve = run["curve"]
    out = write(tmp_path / "r", curve=curve, circuit=curve.circuits[1], scores=run["peap"])
    points = parse(out).data["curves"]["curves"]["peap"]
    assert len(points) == len(curve.points)
    for got, want in zip(points, curve.points):
        for key in ("fraction", "n_edges", "concrete_edges", "normalized", "soft", "hard"):
            assert got[key] == pytest.approx(getattr(want, key)), key
    text = (out / "report.html").read_text()
    saved = curve.points[1]
    assert f"{saved.n_edges:,} span edges" in text and f"normalized {saved.normalized:.3f}" in text
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_edges_csv_and_table_hold_the_circuits_edges(run, tmp_path):
    circuit, scores, data = run["curve"].circuits[1], run["peap"], run["data"]
    out = write(tmp_path / "r", scores=scores, circuit=circuit, dataset=data)
    rows = _read_csv(out / "edges.csv")
    edges = circuit_edges([circuit], scores)
    assert len(rows) == len(edges) == circuit.n_edges
    assert [r["name"] for r in rows] == edges.names()
    assert len({r["name"] for r in rows}) == len(rows)
    # Scores are the scores' own, every edge's concrete count is on the dataset given.
    spans = list(data.schema.spans)
    for r, s, kind, span, key in zip(rows, edges.score.tolist(), edges.kind.tolist(), edges.span.tolist(),
                                     edges.key_span.tolist()):
        assert float(r["score"]) == s
        assert r["type"] == ("within", "k", "v", "q")[kind]
        assert r["spans"] == (spans[span] if key < 0 else f"{spans[key]}->{spans[span]}")
        assert r["name"].startswith(f"{r['parent']}->{r['child']}")
    # Concrete counts: a key-value edge stands for every (key, query) token pair of its spans.
    ex_counts = circuit.concrete_edges(data)["total"]
    assert sum(float(r["concrete"]) for r in rows) == pytest.approx(ex_counts)
    # The table: the top edges by |score|, at most 100.
    page = parse(out)
    table = [abs(float(r[4])) for r in page.rows]
    assert len(table) == min(100, len(rows))
    assert table == sorted(table, reverse=True)
    assert table[0] == pytest.approx(abs(float(rows[0]["score"])))


def test_scores_alone_list_every_scored_edge(run, tmp_path):
    for method in ("peap", "eap"):
        scores = run[method]
        out = write(tmp_path / method, scores=scores)
        rows = _read_csv(out / "edges.csv")
        want = score_edges(scores)
        assert len(rows) == len(want)
        assert [float(r["score"]) for r in rows[:50]] == want.score[:50].tolist()
        assert mechscope.EdgeScores.load(out / "scores.safetensors").values.equal(scores.values)
    # A non-positional circuit gets its counts from the dataset and no scores: empty score cells.
    circuit = run["eap"].top_n(30)
    out = write(tmp_path / "eap-circuit", circuit=circuit, dataset=run["data"])
    rows = _read_csv(out / "edges.csv")
    assert {r["score"] for r in rows} == {""} and all(math.isfinite(float(r["concrete"])) for r in rows)
    assert {r["spans"] for r in rows} == {"*", "*->*"}  # within edges, crossing edges inside attention
    assert isinstance(mechscope.load_any_circuit(out / "circuit.json"), mechscope.Circuit)


def test_bad_input_is_a_clear_error_and_leaves_nothing(run, tmp_path, tiny_model_dirs):
    curve, peap, data = run["curve"], run["peap"], run["data"]
    gpt2 = mechscope.load_model(str(tiny_model_dirs["gpt2"]), device="cpu")  # 4 heads, no GQA: another graph
    other_graph = mechscope.attribute(gpt2, make_task("ioi", gpt2.tokenizer, 4, seed=0), "eap", batch_size=4,
                                      progress=False).top_n(10)
    renamed = dataclasses.replace(curve.circuits[1], spans=tuple(f"x{i}" for i in range(len(peap.spans))))
    other_schema = make_task("greater-than", run["model"].tokenizer, 4, seed=0)
    out = tmp_path / "out"
    cases = [
        ({}, ParameterError, "nothing to report"),
        ({"model": run["model"]}, ParameterError, "nothing to report"),
        ({"scores": "scores.safetensors"}, ParameterError, "scores must be EdgeScores"),
        ({"circuit": peap}, ParameterError, "circuit must be a Circuit or SpanCircuit"),
        ({"curve": curve, "curves": {"peap": curve}}, ParameterError, "not both"),
        ({"curves": [curve]}, ParameterError, "curves must be a non-empty dict"),
        ({"curve": curve, "circuits": curve.circuits[:2]}, ParameterError, "2 circuits for the curve's 3 points"),
        ({"summary": {"x": object()}}, ParameterError, "JSON-serialisable"),
        ({"scores": peap, "circuit": other_graph}, ParameterError, "another shape"),
        ({"scores": peap, "circuit": renamed}, ParameterError, "spans"),
        ({"scores": run["eap"], "circuit": curve.circuits[1]}, ParameterError, "not scored by the eap scores"),
        ({"circuit": curve.circuits[1], "dataset": other_schema}, ParameterError, "schema"),
        ({"circuit": other_graph, "model": run["model"]}, ParameterError, "another shape than the model"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            write(out, **kwargs)
        assert not out.exists(), kwargs
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_is_replaced_only_with_overwrite(run, tmp_path):
    out = tmp_path / "r"
    write(out, scores=run["peap"])
    with pytest.raises(ReportError, match="not an empty directory"):
        write(out, summary={"a": 1})
    assert "summary.json" not in _files(out)
    write(out, summary={"a": 1}, overwrite=True)
    assert _files(out) == {"report.html", "summary.json"}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ReportError, match="not a mechscope report directory"):
        write(mine, summary={"a": 1}, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_viewer_steps_through_the_curves_circuits(run, tmp_path):
    """The viewer's circuits are the curve's, smallest first, each with its point's faithfulness; the
    saved one is marked (and added when it is on no curve)."""
    curve = run["curve"]
    out = write(tmp_path / "r", curve=curve, circuit=curve.circuits[1], scores=run["peap"])
    viewer = parse(out).data["circuit"]
    assert [c["n_edges"] for c in viewer["circuits"]] == [c.n_edges for c in curve.circuits]
    assert [c["normalized"] for c in viewer["circuits"]] == pytest.approx([p.normalized for p in curve.points])
    assert [c["saved"] for c in viewer["circuits"]] == [False, True, False] and viewer["default"] == 1
    extra = run["peap"].greedy(5)
    out = write(tmp_path / "extra", curve=curve, circuit=extra)
    viewer = parse(out).data["circuit"]
    assert [c["n_edges"] for c in viewer["circuits"]] == sorted([extra.n_edges] + [c.n_edges for c in curve.circuits])
    saved = [c for c in viewer["circuits"] if c["saved"]]
    assert len(saved) == 1 and saved[0]["n_edges"] == extra.n_edges and saved[0]["normalized"] is None


def test_curve_keeps_its_circuits(run):
    curve = run["curve"]
    assert len(curve.circuits) == len(curve.points)
    assert all(isinstance(c, SpanCircuit) for c in curve.circuits)
    assert [c.n_edges for c in curve.circuits] == [p.n_edges for p in curve.points]
    assert torch.equal(curve.circuits[-1].within, SpanCircuit.full(
        run["peap"].graph, run["peap"].spans, curve.circuits[-1].logit_spans).within)

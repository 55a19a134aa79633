"""`write`: a report directory from whatever the user has (scores, a circuit, faithfulness curves and
the circuits on them, a dataset and model, a summary). Each section of the page appears only when its
inputs are given; `write_report` (what `mechscope circuit` writes) passes everything a run has.

    section                  inputs
    summary                  summary (the model's table too when model is given)
    curves                   curve or curves
    circuit (the viewer)     circuit, or the circuits of a curve (curve.circuits or `circuits`)
    edges                    circuit (its edges) or scores (every scored edge)
    attention                model and dataset
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attribution.scores import EdgeScores
from ..circuits.circuit import Circuit
from ..circuits.edge_table import NODE_KINDS, circuit_edges, score_edges
from ..circuits.evaluation import Curve
from ..circuits.span_circuit import SpanCircuit, span_counts
from ..data.dataset import PromptPairDataset
from ..errors import ParameterError
from ..fileio import OutputError, atomic_dir, check_parent_writable
from ..graph import Graph
from .page import Section, json_safe, render_page
from .sections.attention_data import attention_payload, head_name
from .sections.circuit_data import circuit_payload

MAX_VIEWER_CIRCUITS = 32  # the viewer's membership bits (contract B)
ATTENTION_EXAMPLES = 4
ATTENTION_HEADS = 12


class ReportError(OutputError):
    """An output directory that cannot be written."""


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ReportError unless `out` can become a report directory: new or empty (or, with
    `overwrite`, a previous report directory: one holding report.html or summary.json), and inside a
    writable directory (checked before any model work, and again by `write`)."""
    out = Path(out)
    check_parent_writable(out, ReportError)  # first: it puts back a report that a killed --overwrite moved aside
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ReportError(f"{out}: exists and is not an empty directory; choose a new --out or pass --overwrite")
        if not out.is_dir() or not any((out / f).is_file() for f in ("report.html", "summary.json")):
            raise ReportError(f"{out}: exists and is not a mechscope report directory (no report.html or "
                              "summary.json); --overwrite replaces only a previous report")


@dataclass
class _Viewer:
    """The circuits the viewer steps through (ascending size), each one's curve point (None when not
    measured), and which is the saved one (None when none is)."""

    circuits: list
    points: list
    saved: int | None


@dataclass
class _Inputs:
    scores: EdgeScores | None
    circuit: Circuit | SpanCircuit | None
    curves: dict[str, Curve]
    circuits: dict[str, list]
    dataset: PromptPairDataset | None
    model: object
    summary: dict | None
    title: str | None
    graph: Graph = field(init=False)
    spans: tuple[str, ...] | None = field(init=False)


def write(path: str | os.PathLike, *, scores: EdgeScores | None = None, circuit: Circuit | SpanCircuit | None = None,
          curve: Curve | None = None, curves: dict[str, Curve] | None = None, circuits=None,
          dataset: PromptPairDataset | None = None, model=None, summary: dict | None = None,
          title: str | None = None, overwrite: bool = False) -> Path:
    """Write a report directory at `path` from the objects given, all at once (a temporary directory
    renamed into place; nothing is left on failure). Files: report.html always; scores.safetensors
    (scores), circuit.json (circuit), edges.csv (the circuit's edges, or every scored edge: name, parent,
    child, type, spans, score, concrete), curves.png (curve / curves), summary.json (summary).

    `curve`: one `Curve`; `curves`: method -> Curve (not both). `circuits`: the circuits measured by
    the curve's points (a list, for one curve) or by each curve's (method -> list); by default the
    circuits a curve kept (`Curve.circuits`, set by `faithfulness_curve(s)`). `dataset` gives concrete
    token-edge counts (else the scores' own) and, with `model`, the attention section. `overwrite`
    replaces a previous report at `path` once the new one is complete.
    Raises ParameterError for nothing to report, a wrong type, or objects that do not fit together
    (another graph's shape, other spans, a schema of other spans), ReportError for an unwritable path."""
    inputs = _check(scores, circuit, curve, curves, circuits, dataset, model, summary, title)
    out = Path(path)
    check_output_dir(out, overwrite)
    with atomic_dir(out, ReportError, replace=overwrite) as tmp:
        _write_files(inputs, tmp)
    return out


def write_sections(path: str | os.PathLike, title: str, sections: list[Section], files: dict | None = None, *,
                   subtitle: str = "", warnings: tuple[str, ...] | list[str] = (), overwrite: bool = False) -> Path:
    """A report directory from ready sections (the toolbox's results: patching heatmaps, lens tables,
    dashboards...): report.html with `sections`, and each of `files` ({file name: fn(path)} writing
    that file, e.g. a result's save or a PNG figure). All at once, as `write`: nothing is left behind on
    failure, and `overwrite` replaces a previous report only once the new one is complete."""
    if not sections and not files:
        raise ParameterError("nothing to report: give at least one section or file")
    for name in files or {}:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") \
                or name == "report.html":
            raise ParameterError(f"report file name {name!r} must be a plain file name other than report.html")
    out = Path(path)
    check_output_dir(out, overwrite)
    with atomic_dir(out, ReportError, replace=overwrite) as tmp:
        for name, writer in (files or {}).items():
            writer(tmp / name)
        (tmp / "report.html").write_text(render_page(title, subtitle, list(sections), warnings), encoding="utf-8")
    return out


FILES = ("report.html", "summary.json", "scores.safetensors", "circuit.json", "edges.csv", "curves.png", "circuit.png",
         "circuit.svg")


def write_report(out: str | os.PathLike, model, run, overwrite: bool = False) -> Path:
    """The report of a `discovery.CircuitDiscovery` (`mechscope circuit`): every file of FILES, every
    section, with the chosen method's scores and the saved circuit."""
    return write(out, scores=run.scores[run.summary["method"]], circuit=run.circuit, curves=run.curves,
                 circuits=run.circuits, dataset=run.evaluation, model=model, summary=run.summary,
                 overwrite=overwrite)


# ------------------------------------------------------------------------------------------------
# Checks: every one before any directory is made
# ------------------------------------------------------------------------------------------------


def _type(name: str, value, types, what: str) -> None:
    if value is not None and not isinstance(value, types):
        raise ParameterError(f"{name} must be {what}, got {type(value).__name__}")


def _check(scores, circuit, curve, curves, circuits, dataset, model, summary, title) -> _Inputs:
    _type("scores", scores, EdgeScores, "EdgeScores (mechscope.attribute)")
    _type("circuit", circuit, (Circuit, SpanCircuit), "a Circuit or SpanCircuit")
    _type("curve", curve, Curve, "a Curve (mechscope.faithfulness_curve)")
    _type("dataset", dataset, PromptPairDataset, "a PromptPairDataset")
    _type("summary", summary, dict, "a dict")
    _type("title", title, str, "a string")
    if curve is not None and curves is not None:
        raise ParameterError("give curve or curves, not both")
    if curves is not None:
        if not isinstance(curves, dict) or not curves:
            raise ParameterError(f"curves must be a non-empty dict of name -> Curve, got {type(curves).__name__}")
        for name, c in curves.items():
            _type(f"curves[{name!r}]", c, Curve, "a Curve")
    curves = dict(curves or ({curve.method or "curve": curve} if curve is not None else {}))
    circuits = _check_circuits(circuits, curves)
    if summary is not None:
        try:
            json.dumps(json_safe(summary), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"summary must be JSON-serialisable: {exc}") from None
    if model is not None and not hasattr(model, "cfg"):
        raise ParameterError(f"model must be a loaded model (mechscope.load_model), got {type(model).__name__}")
    shows = [scores, circuit, summary, *curves.values(), *circuits.values()]
    if all(x is None for x in shows) and (model is None or dataset is None):
        raise ParameterError("nothing to report: give scores, a circuit, a curve or curves, a summary, or a model "
                             "and a dataset")
    inputs = _Inputs(scores, circuit, curves, circuits, dataset, model, summary, title)
    _check_fit(inputs)
    return inputs


def _check_circuits(circuits, curves: dict[str, Curve]) -> dict[str, list]:
    """The viewer's candidate circuits by curve name: `circuits` (a list for one curve, or a dict), else
    those the curves kept; each list as long as its curve's points."""
    if circuits is None:
        return {m: list(c.circuits) for m, c in curves.items() if c.circuits is not None}
    if isinstance(circuits, (list, tuple)):
        if len(curves) > 1:
            raise ParameterError("circuits is a list but there are several curves: give a dict of curve name -> list")
        circuits = {next(iter(curves), "circuits"): circuits}
    if not isinstance(circuits, dict):
        raise ParameterError(f"circuits must be a list of circuits or a dict of curve name -> list, "
                             f"got {type(circuits).__name__}")
    out = {}
    for name, items in circuits.items():
        if not isinstance(items, (list, tuple)) or not items:
            raise ParameterError(f"circuits[{name!r}] must be a non-empty list of circuits")
        for i, c in enumerate(items):
            _type(f"circuits[{name!r}][{i}]", c, (Circuit, SpanCircuit), "a Circuit or SpanCircuit")
        if curves and name not in curves:
            raise ParameterError(f"circuits[{name!r}]: no curve of that name (curves: {', '.join(curves)})")
        if name in curves and len(items) != len(curves[name].points):
            raise ParameterError(f"circuits[{name!r}]: {len(items)} circuits for the curve's "
                                 f"{len(curves[name].points)} points (one circuit per point)")
        out[name] = list(items)
    return out


def _check_fit(inputs: _Inputs) -> None:
    """One graph shape and one list of spans across the objects; a dataset whose schema has those
    spans and a model of that shape. Sets inputs.graph and inputs.spans."""
    named = [("scores", inputs.scores), ("circuit", inputs.circuit)]
    named += [(f"circuits[{m!r}][{i}]", c) for m, cs in inputs.circuits.items() for i, c in enumerate(cs)]
    named = [(n, x) for n, x in named if x is not None]
    inputs.graph = named[0][1].graph if named else (Graph.from_model(inputs.model) if inputs.model is not None else None)
    first = named[0][0] if named else "model"
    inputs.spans = None
    spans_from = None
    for name, x in named:
        if not x.graph.same_shape(inputs.graph):
            raise ParameterError(f"{name} is for a graph of another shape than {first}: "
                                 f"{', '.join(x.graph.differences(inputs.graph))}")
        spans = _spans(x)
        if spans is None:
            continue
        if inputs.spans is None:
            inputs.spans, spans_from = spans, name
        elif spans != inputs.spans:
            raise ParameterError(f"{name} has spans {list(spans)} but {spans_from} has {list(inputs.spans)}")
    if inputs.scores is not None and inputs.circuit is not None and not _fits(inputs.scores, inputs.circuit):
        c = _as_span(inputs.circuit)
        raise ParameterError(
            f"the circuit ({'non-positional' if c.single_span else f'spans {list(c.spans)}, {c.query_edges} query edges'}) "
            f"is not scored by the {inputs.scores.method} scores ("
            + (f"spans {list(inputs.scores.spans)}, {inputs.scores.query_edges} query edges" if inputs.scores.positional
               else "non-positional") + ")")
    if inputs.dataset is not None and inputs.spans is not None and tuple(inputs.dataset.schema.spans) != inputs.spans:
        raise ParameterError(f"dataset has schema {list(inputs.dataset.schema.spans)} but {spans_from} has spans "
                             f"{list(inputs.spans)}")
    if inputs.model is not None and inputs.graph is not None:
        other = Graph.from_model(inputs.model)
        if not inputs.graph.same_shape(other):
            raise ParameterError(f"{first} is for a graph of another shape than the model: "
                                 f"{', '.join(inputs.graph.differences(other))}")
    if inputs.model is not None and inputs.dataset is not None:
        from ..behaviour import check_compatible

        check_compatible(inputs.model, inputs.dataset)


def _spans(x) -> tuple[str, ...] | None:
    """The spans of positional scores or a span circuit over a schema; None for non-positional ones."""
    if isinstance(x, EdgeScores):
        return tuple(x.spans) if x.positional else None
    if isinstance(x, SpanCircuit):
        return None if x.single_span else tuple(x.spans)
    return None


# ------------------------------------------------------------------------------------------------
# The page and the files
# ------------------------------------------------------------------------------------------------


def _write_files(inputs: _Inputs, tmp: Path) -> None:
    from .figures import curves_png
    from .sections import curves as curves_section
    from .sections import edges as edges_section
    from .sections import summary as summary_section

    viewer = _viewer(inputs)
    sections: list[Section] = []
    if inputs.summary is not None:
        model_summary = None
        if inputs.model is not None:
            from ..models import model_summary as describe

            model_summary = describe(inputs.model)
        schema = list(inputs.dataset.schema.spans) if inputs.dataset is not None else None
        sections.append(summary_section.section(inputs.summary, model_summary, schema))
    if inputs.curves:
        sections.append(curves_section.section(inputs.curves, _saved_point(inputs, viewer)))
        curves_png({m: curves_section.points(c) for m, c in inputs.curves.items()}, _png_title(inputs),
                   tmp / "curves.png")
    table = None
    if inputs.circuit is not None:
        table = circuit_edges([inputs.circuit], inputs.scores, _counts(inputs.dataset, _as_span(inputs.circuit).spans))
        what = f"the saved circuit's {len(table):,} span edges"
    elif inputs.scores is not None:
        table = score_edges(inputs.scores)  # concrete counts: the scores' own (PEAP), on their examples
        what = f"every edge of the {inputs.scores.method} scores"
    heads = _attention_heads(inputs, table)
    sections += _viewer_sections(inputs, viewer, heads)
    if table is not None:
        columns = edges_section.edge_columns(table)
        edges_section.write_csv(columns, tmp / "edges.csv")
        sections.append(edges_section.section(columns, what))
    sections.sort(key=lambda s: ORDER.index(s.id) if s.id in ORDER else len(ORDER))
    (tmp / "report.html").write_text(render_page(_title(inputs), _subtitle(inputs), sections, _warnings(inputs)),
                                     encoding="utf-8")
    if inputs.summary is not None:
        (tmp / "summary.json").write_text(json.dumps(json_safe(inputs.summary), indent=1, allow_nan=False))
    if inputs.scores is not None:
        inputs.scores.save(tmp / "scores.safetensors")
    if inputs.circuit is not None:
        inputs.circuit.save(tmp / "circuit.json")
        _circuit_figures(inputs, viewer, tmp)


def _circuit_figures(inputs: _Inputs, viewer: "_Viewer | None", tmp: Path) -> None:
    """circuit.png and circuit.svg: the static figure of the given circuit, with its scores, its
    concrete size on the dataset and, when it is on a curve, its faithfulness."""
    from .circuit_figure import circuit_figure

    circuit = inputs.circuit
    scores = inputs.scores if inputs.scores is not None and _fits(inputs.scores, circuit) else None
    counts = _counts(inputs.dataset, _as_span(circuit).spans)
    point = viewer.points[viewer.saved] if viewer is not None and viewer.saved is not None else None
    faithfulness = None if point is None else {k: getattr(point, k) for k in ("normalized", "soft", "hard")}
    s = inputs.summary or {}
    title = inputs.title or (f"{s['method']} circuit: {s['task']} on {s['model'] or 'the model'}"
                             if all(isinstance(s.get(k), str) for k in ("method", "task", "model")) else None)
    for name in ("circuit.png", "circuit.svg"):
        circuit_figure(circuit, tmp / name, scores=scores, counts=counts, title=title, faithfulness=faithfulness)


ORDER = ("summary", "curves", "circuit", "edges", "attention")


def _viewer_sections(inputs: _Inputs, viewer: _Viewer | None, heads: list[tuple[int, int]]) -> list[Section]:
    """The circuit viewer (when there are circuits to show) and the attention viewer (model and
    dataset)."""
    from .sections import attention as attention_section
    from .sections import circuit as circuit_section

    out = []
    attention = inputs.model is not None and inputs.dataset is not None
    if viewer is not None:
        spans = _as_span(viewer.circuits[0]).spans
        scores = inputs.scores if inputs.scores is not None and _fits(inputs.scores, viewer.circuits[0]) else None
        info = [{} if p is None else {"label": _label(p), **{k: getattr(p, k) for k in MEASURES}}
                for p in viewer.points]
        out.append(circuit_section.section(circuit_payload(
            viewer.circuits, scores=scores, counts=_counts(inputs.dataset, spans), info=info, saved=viewer.saved,
            attention_heads=[head_name(l, h) for l, h in heads] if attention else [])))
    if attention:
        out.append(attention_section.section(attention_payload(inputs.model, inputs.dataset, heads, ATTENTION_EXAMPLES)))
    return out


MEASURES = ("concrete_edges", "normalized", "soft", "hard")


def _label(point) -> str:
    """A curve circuit's label in the viewer: its share of all edges and its size."""
    share = f"{100 * point.fraction:g}% of edges, " if point.fraction is not None else ""
    return f"{share}{point.n_edges:,} edges"


def _fits(scores: EdgeScores, circuit) -> bool:
    """Whether `scores` score `circuit`'s edges: positional scores a span circuit over their spans with
    their query edges, non-positional scores a non-positional circuit."""
    c = _as_span(circuit)
    if not scores.positional:
        return c.single_span
    return tuple(scores.spans) == c.spans and scores.query_edges == c.query_edges


def _same_circuit(a, b) -> bool:
    """Whether two circuits hold the same edges (the same object, or equal)."""
    if a is b:
        return True
    if type(a) is not type(b) or not a.graph.same_shape(b.graph):
        return False
    if isinstance(a, Circuit):
        return bool(torch.equal(a.edges, b.edges))
    return (a.spans == b.spans and torch.equal(a.within, b.within)
            and a.crossing.keys() == b.crossing.keys()
            and all(a.crossing[k].shape == b.crossing[k].shape and torch.equal(a.crossing[k], b.crossing[k])
                    for k in a.crossing))


def _viewer(inputs: _Inputs) -> _Viewer | None:
    """The circuits the viewer steps through: those of the curve holding the saved circuit (else the
    scores' method's curve, else the first), with the saved circuit marked; a saved circuit on no curve
    joins them, ordered by size, without faithfulness."""
    circuit = inputs.circuit
    if not inputs.circuits:
        return None if circuit is None else _Viewer([circuit], [None], 0)
    names = list(inputs.circuits)
    method = next((m for m in names if circuit is not None and any(_same_circuit(c, circuit) for c in inputs.circuits[m])),
                  inputs.scores.method if inputs.scores is not None and inputs.scores.method in names else names[0])
    items = inputs.circuits[method]
    curve = inputs.curves.get(method)
    points = list(curve.points) if curve is not None else [None] * len(items)
    saved = next((i for i, c in enumerate(items) if circuit is not None and _same_circuit(c, circuit)), None)
    if circuit is not None and saved is None:
        items, points = items + [circuit], points + [None]
        saved = len(items) - 1
    order = sorted(range(len(items)), key=lambda i: (items[i].n_edges, i))
    if len(order) > MAX_VIEWER_CIRCUITS:
        raise ParameterError(f"the viewer shows at most {MAX_VIEWER_CIRCUITS} circuits; got {len(order)} "
                             f"({method})")
    return _Viewer([items[i] for i in order], [points[i] for i in order],
                   None if saved is None else order.index(saved))


def _saved_point(inputs: _Inputs, viewer: _Viewer | None) -> dict | None:
    """The curves section's note on the saved circuit: its curve point when it is on one (with the
    target it was chosen by, from the summary), else its size."""
    if inputs.circuit is None:
        return None
    point = viewer.points[viewer.saved] if viewer is not None and viewer.saved is not None else None
    if point is not None:
        saved = point.to_dict()
        chosen = (inputs.summary or {}).get("circuit")
        if isinstance(chosen, dict) and chosen.get("n_edges") == point.n_edges:
            saved["target"] = chosen.get("target")
        return saved
    concrete = None
    if inputs.dataset is not None:
        concrete = _as_span(inputs.circuit).concrete_edges(inputs.dataset)["total"]
    return {"n_edges": inputs.circuit.n_edges, "concrete_edges": concrete}


def _as_span(circuit):
    return circuit if isinstance(circuit, SpanCircuit) else SpanCircuit.from_circuit(circuit)


def _counts(dataset: PromptPairDataset | None, spans: tuple[str, ...]) -> dict | None:
    """Concrete token-edge counts per span edge of a graph over `spans` on `dataset`, in the scores'
    `concrete` layout (within [S], crossing [key span, query span], last [S]); None without a dataset."""
    if dataset is None:
        return None
    one = spans == ("*",)
    span_map = [0] * len(dataset.schema) if one else list(range(len(spans)))
    c = span_counts(dataset, span_map, len(spans))
    return {"within": c["tokens"], "crossing": c["pairs"], "last": c["last"]}


def _attention_heads(inputs: _Inputs, table) -> list[tuple[int, int]]:
    """(layer, head) of the heads the attention section shows: those of the edge table (the saved
    circuit's, or every scored edge), the largest total |score| of their edges first (each edge
    counting 1 where scores are unknown); every head in layer order without a table; at most
    ATTENTION_HEADS."""
    if inputs.model is None or inputs.dataset is None:
        return []
    g = inputs.graph
    if table is None or not len(table):
        return [(l, h) for l in range(g.n_layers) for h in range(g.n_heads)][:ATTENTION_HEADS]
    nodes = table.nodes
    head_kind = NODE_KINDS.index("head")
    weight = torch.zeros(g.n_layers * g.n_heads, dtype=torch.float64, device=table.score.device)
    seen = torch.zeros_like(weight, dtype=torch.bool)
    score = table.score.double().abs().nan_to_num(1.0)
    for end in (table.parent, table.child):
        is_head = nodes.kind[end] == head_kind
        head_id = nodes.layer[end[is_head]] * g.n_heads + nodes.index[end[is_head]]
        weight.index_add_(0, head_id, score[is_head])
        seen[head_id] = True
    ranked = [int(i) for i in weight.argsort(descending=True, stable=True) if seen[i]][:ATTENTION_HEADS]
    return [(i // g.n_heads, i % g.n_heads) for i in ranked]


def _title(inputs: _Inputs) -> str:
    if inputs.title:
        return inputs.title
    s = inputs.summary or {}
    if all(isinstance(s.get(k), str) and s.get(k) for k in ("method", "task", "model")):
        return f"mechscope: {s['method']} circuit for {s['task']} on {s['model']}"
    return "mechscope report"


def _subtitle(inputs: _Inputs) -> str:
    from .. import __version__

    s = inputs.summary or {}
    parts = [f"{k} {s[k]}" for k in ("seed", "selection") if isinstance(s.get(k), (str, int))]
    if inputs.scores is not None and not s:
        parts.append(f"{inputs.scores.method} scores of {inputs.scores.model or 'a model'} "
                     f"on {inputs.scores.n_examples} examples")
    return " · ".join(parts + [f"generated by mechscope {__version__}"])


def _warnings(inputs: _Inputs) -> list[str]:
    """The summary's warnings, else those of the curves (a weak signal), each once."""
    found = (inputs.summary or {}).get("warnings") or [c.weak_signal() for c in inputs.curves.values()]
    return list(dict.fromkeys(str(w) for w in found if w))


def _png_title(inputs: _Inputs) -> str:
    s = inputs.summary or {}
    if isinstance(s.get("task"), str) and isinstance(s.get("model"), str):
        return f"{s['task']} on {s['model']}: held-out faithfulness"
    return "held-out faithfulness"

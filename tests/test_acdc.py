"""ACDC (circuits/acdc.py) against a naive re-implementation, at its limits (tau = 0 and a huge tau),
on a compiled tracr program whose circuit is known, and through `mechscope acdc`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from mechscope.attribution.runner import Ablation, graph_hooks
from mechscope.circuits.acdc import acdc, last_layers
from mechscope.circuits.circuit import Circuit
from mechscope.cli import app
from mechscope.graph import Graph
from mechscope.metrics import compute_metric, final_logits
from mechscope.tasks import make_task

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tiny_model):
    return make_task("ioi", tiny_model.tokenizer, 8, seed=3)


@torch.no_grad()
def naive_acdc(model, dataset, tau, metric):
    """ACDC written plainly: every test is a whole forward pass (logits at every position) of all examples
    at once, through the plain edge-ablation hooks, with the counterfactual outputs recorded here.
    With tau None, returns instead the median change when one edge into the logits alone is ablated (a
    threshold that keeps some edges and removes others)."""
    graph = Graph.from_model(model)
    b = dataset.batch()
    with graph_hooks(model, graph, record_up=True) as run:
        model(b.counterfactual, attention_mask=b.attention_mask)
    reference = run.up
    clean = final_logits(model(b.clean, attention_mask=b.attention_mask), b.last)
    name = "kl" if metric == "kl" else dataset.metric

    def mean_metric(keep):
        with graph_hooks(model, graph, ablation=Ablation(keep, reference)):
            logits = final_logits(model(b.clean, attention_mask=b.attention_mask), b.last)
        return float(compute_metric(name, logits, b, clean_logits=clean).double().mean())

    keep = graph.edge_mask.double().clone()
    current = mean_metric(keep)
    if tau is None:
        changes = []
        for u in graph.edge_mask[:, graph.logits_index].nonzero().flatten().tolist():
            keep[u, -1] = 0.0
            value = mean_metric(keep)
            keep[u, -1] = 1.0
            changes.append(value - current if metric == "kl" else abs(value - current))
        ordered = sorted(changes)
        return (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    changes = {}
    index = graph.dense(torch.arange(graph.n_edges))
    owners = graph.downstream_owner()
    for v in reversed(range(graph.n_downstream)):
        parents = [u for u in reversed(range(graph.n_upstream)) if graph.edge_mask[u, v]]
        if owners[v] and all(keep[u].sum() == 0 for u in owners[v]):
            keep[parents, v] = 0.0  # the reader's output reaches nothing
            continue
        for u in parents:
            keep[u, v] = 0.0
            value = mean_metric(keep)
            change = value - current if metric == "kl" else abs(value - current)
            changes[graph.edge_name(int(index[u, v]))] = change
            if change <= tau:
                current = value
            else:
                keep[u, v] = 1.0
    kept = {graph.edge_name(e) for e in range(graph.n_edges) if keep[graph.edge_up[e], graph.edge_down[e]]}
    return kept, changes


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model64(request, tiny_model_dirs):
    """The tiny models in float64: the two ways of computing a run then agree far below the changes ACDC
    compares with tau (in float32 a KL change of 1e-5 carries noise of 1e-7)."""
    import mechscope

    return mechscope.load_model(str(tiny_model_dirs[request.param]), device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("metric", ["kl", "task"])
def test_acdc_equals_the_naive_algorithm(model64, metric):
    data = make_task("ioi", model64.tokenizer, 8, seed=3)
    tau = naive_acdc(model64, data, None, metric)
    # Batches of 3 (three forwards per tested edge) against one batch of all eight in the naive version.
    result = acdc(model64, data, tau, metric=metric, batch_size=3, progress=False, evaluate=False)
    kept, changes = naive_acdc(model64, data, tau, metric)
    graph = result.graph
    measured = {graph.edge_name(e): float(result.scores[0, e]) for e in range(graph.n_edges)
                if not math.isnan(result.scores[0, e])}
    # Llama's final RMSNorm runs in float32 inside the model's own forward (the naive path), in float64
    # in the unembedding ACDC applies to the final residual: they differ by ~1e-5 relative.
    tol = 1e-4 * tau + 1e-9
    assert min(abs(c - tau) for c in changes.values()) > 2 * tol  # no decision rests on rounding
    assert set(result.circuits[0].edge_names()) == kept
    assert measured.keys() == changes.keys() and result.n_forwards == [len(changes)]
    for name, change in changes.items():
        assert measured[name] == pytest.approx(change, abs=tol, rel=1e-4)
    assert result.n_model_passes == [3 * (len(changes) + 1)]  # the whole model's run, then one per edge
    assert 0 < result.circuits[0].n_edges < graph.n_edges  # neither limit: the test can see a wrong decision


def test_tau_zero_keeps_every_edge_that_changes_the_metric_and_a_huge_tau_none(tiny_model, data):
    result = acdc(tiny_model, data, [0.0, 1e9], metric="task", progress=False)
    graph = result.graph
    zero, huge = result.circuits
    tested = ~result.scores[0].isnan()
    assert tested.all()  # at tau = 0 no reader loses all its outgoing edges here
    assert zero.edges.tolist() == (result.scores[0] > 0).tolist()
    assert huge.n_edges == 0
    into_logits = int(graph.edge_mask[:, graph.logits_index].sum())
    # Once every edge into the logits is gone, every other reader is skipped, untested.
    assert result.n_forwards[1] == into_logits == int((~result.scores[1].isnan()).sum())
    assert result.max_forwards == graph.n_edges and result.n_forwards[0] == graph.n_edges
    # The curve's points are sorted by edge count; the empty circuit is the all-ablated run.
    points = result.curve.points
    assert [p.n_edges for p in points] == sorted(c.n_edges for c in result.circuits)
    assert points[0].n_edges == 0 and points[0].normalized == pytest.approx(0.0, abs=1e-6)
    assert points[0].fraction == 0.0 and points[1].fraction == zero.n_edges / graph.n_edges
    # Survival scores: the largest tau at which an edge is kept.
    assert result.survival_scores().tolist() == [0.0] * graph.n_edges


def test_kl_at_tau_zero_keeps_the_edges_whose_ablation_moves_away_from_the_model(tiny_model, data):
    result = acdc(tiny_model, data, 0.0, progress=False, evaluate=False)
    kept = result.circuits[0].edges
    tested = ~result.scores[0].isnan()
    assert (kept == (tested & (result.scores[0] > 0))).all()
    assert (result.scores[0][kept] > 0).all()


def test_candidates_restrict_the_tested_edges(tiny_model, data):
    graph = Graph.from_model(tiny_model)
    only = last_layers(graph, 0)
    assert only.tolist() == (graph.edge_down == graph.logits_index).tolist()
    assert last_layers(graph, graph.n_layers).all()
    result = acdc(tiny_model, data, 1e9, candidates=only, progress=False, evaluate=False)
    c = result.circuits[0]
    assert not (c.edges & only).any() and (c.edges | only).all()  # untested edges stay in the circuit
    assert result.max_forwards == result.n_forwards[0] == int(only.sum())
    assert result.scores[0][~only].isnan().all() and not result.scores[0][only].isnan().any()


def test_acdc_command_writes_circuits_summary_and_curve(tmp_path, tiny_model_dirs):
    out = tmp_path / "acdc"
    result = runner.invoke(app, ["acdc", "--task", "ioi", "--n", "6", "--model", str(tiny_model_dirs["llama"]),
                                 "--taus", "0,0.05,1e9", "--last-layers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["tau"] for r in summary["runs"]] == [0.0, 0.05, 1e9]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json", "scores.json", "curve.json"] + [r["circuit_file"] for r in summary["runs"]])
    for run in summary["runs"]:
        c = Circuit.load(out / run["circuit_file"])
        assert c.n_edges == run["n_edges"] and c.info["tau"] == run["tau"] and c.method == "acdc"
        assert run["edges_tested"] <= summary["max_forwards_per_tau"]
    curve = json.loads((out / "curve.json").read_text())
    assert [p["n_edges"] for p in curve["points"]] == sorted(r["n_edges"] for r in summary["runs"])
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["edges"]) == summary["n_graph_edges"] == len(scores["change"]["0.05"])


def test_acdc_announces_its_forwards(tiny_model, data, capsys):
    graph = Graph.from_model(tiny_model)
    acdc(tiny_model, data, [0.1, 1.0], candidates=last_layers(graph, 0), progress=True, evaluate=False)
    n = int(last_layers(graph, 0).sum())
    assert f"ACDC: at most {n} edges to test per tau (2 tau, {2 * n} in all)" in capsys.readouterr().err


def test_acdc_recovers_the_circuit_of_a_compiled_program():
    pytest.importorskip("tracr")
    from test_tracr import compiled, pairwise_auroc

    from mechscope.toys.tracr import make_tracr_task
    from mechscope.toys.tracr.benchmark import benchmark_program
    from mechscope.toys.tracr.ground_truth import ground_truth, varying_directions

    cp = compiled("first_frac")
    ds = make_tracr_task(cp, n=16, seed=0)
    b = ds.batch()
    truth = ground_truth(cp).restrict(varying_directions(cp, b.clean, b.counterfactual, b.attention_mask))
    result = acdc(cp.model, ds, [1e-6, 0.01], metric="task", progress=False, evaluate=False)
    for c in result.circuits:  # both thresholds find exactly the contrast circuit
        assert c.edge_names() == truth.edge_names()
    # Through the benchmark: the AUROC of the survival scores against the ground truth.
    r = benchmark_program("first_frac", n=16, methods=("acdc",))
    scores = r.edges["scores"]["acdc"]
    assert r.edge_auroc["acdc"] == pytest.approx(pairwise_auroc(scores, r.edges["in_circuit"]))
    assert r.edge_auroc["acdc"] == 1.0 and r.edge_auroc_floor["acdc"] == 1.0 and r.node_auroc["acdc"] == 1.0
    # Every edge outside the circuit scores an exact 0 (never kept), the circuit's the largest tau kept.
    assert all((s > 0) == bool(t) for s, t in zip(scores, r.edges["in_circuit"]))

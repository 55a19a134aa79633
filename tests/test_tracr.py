"""Compiled tracr models: the import equals tracr's own forward pass, every program of the suite is
computed correctly on every input, the ground truth is read off the craft model as documented, and
`mechscope benchmark tracr` scores the circuit finders against it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("tracr")

from mechscope.attribution.runner import Ablation, graph_hooks  # noqa: E402
from mechscope.behaviour import measure_behaviour  # noqa: E402
from mechscope.cli import app  # noqa: E402
from mechscope.graph import Graph  # noqa: E402
from mechscope.metrics import final_logits  # noqa: E402
from mechscope.toys.tracr import PAD, SUITE, compile_program, ground_truth, make_tracr_task  # noqa: E402
from mechscope.toys.tracr.benchmark import auroc, benchmark_program, node_scores  # noqa: E402
from mechscope.toys.tracr.ground_truth import varying_directions  # noqa: E402
from mechscope.toys.tracr.tasks import all_inputs  # noqa: E402

runner = CliRunner()
_COMPILED = {}


def compiled(name):
    if name not in _COMPILED:
        spec = SUITE[name]
        _COMPILED[name] = compile_program(spec.build(), spec.vocab, spec.max_seq_len, name=name)
    return _COMPILED[name]


def _inputs(name):
    spec = SUITE[name]
    return [x for n in range(1, spec.max_seq_len + 1) for x in all_inputs(spec.vocab, n, spec.unique_tokens)]


@pytest.mark.parametrize("name", list(SUITE))
def test_residual_streams_equal_tracr_in_float64(name):
    cp = compiled(name)
    assert cp.model.cfg.dtype == torch.float64
    rng = random.Random(0)
    inputs = _inputs(name)
    for values in [inputs[0], inputs[-1]] + rng.sample(inputs, 6):
        ours = cp.model.residuals(torch.tensor([cp.tokenizer.encode(values)]))
        theirs = cp.tracr_residuals(values)
        assert len(ours) == len(theirs) == 2 * cp.model.cfg.n_layers
        for a, b in zip(ours, theirs):
            assert b.dtype == np.float64
            np.testing.assert_allclose(a[0].numpy(), b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(SUITE))
def test_program_outputs_on_every_input_up_to_the_compiled_length(name):
    cp = compiled(name)
    by_length = {}
    for x in _inputs(name):
        by_length.setdefault(len(x), []).append(x)
    checked = 0
    for n, xs in by_length.items():
        logits = cp.model(torch.tensor([cp.tokenizer.encode(x) for x in xs]))
        for x, row in zip(xs, logits):
            got = cp.decode(row)[1:]  # position 0 is BOS
            want = cp.run_program(x)
            for g, w in zip(got, want):
                if w is None:  # the program leaves this position undefined (prev_equal's first token)
                    continue
                if cp.categorical:
                    assert g == w, (x, got, want)
                else:
                    assert abs(g - float(w)) < 1e-3, (x, got, want)
                checked += 1
    assert checked >= len(_inputs(name))


def test_reverse_ground_truth_follows_the_program():
    cp = compiled("reverse")
    gt = ground_truth(cp)
    # length (SelectorWidth: head a0 + MLP m0), opp_idx (m1), opp_idx - 1 (m2), the reversing head a3.
    assert set(gt.node_names()) == {"a0.h0", "m0", "m1", "m2", "a3.h0"}
    assert set(gt.edge_names()) == {
        "input->a0.h0.q", "input->a0.g0.k",  # the selector of length reads the tokens
        "a0.h0->m0.in", "m0->m1.in", "input->m1.in",  # opp_idx = length - indices
        "m1->m2.in", "m2->a3.h0.q",  # the query of the reversing head is opp_idx - 1
        "input->a3.g0.k", "input->a3.g0.v",  # its keys are the indices, its values the tokens
        "a3.h0->logits",
    }
    # BOS-fallback and bias reads are not edges: the value of length's head reads only tokens:BOS.
    assert "input->a0.g0.v" not in gt.edge_names()
    # Equal-length pairs change the tokens and the output only.
    ds = make_tracr_task(cp, n=16)
    b = ds.batch()
    varying = varying_directions(cp, b.clean, b.counterfactual, b.attention_mask)
    assert {d.split(":")[0].split("_")[0] for d in varying} == {"tokens", "reverse"}  # labels get an id suffix
    assert set(gt.restrict(varying).edge_names()) == {"input->a3.g0.v", "a3.h0->logits"}


def test_length_counterfactuals_compute_the_shorter_length():
    cp = compiled("length")
    ds = make_tracr_task(cp, n=24, seed=1, pad_counterfactuals=SUITE["length"].pad_counterfactuals)
    for ex in ds.examples:
        cf = cp.tokenizer.convert_ids_to_tokens(ex.counterfactual)[1:]
        real = [t for t in cf if t != PAD]
        assert cf[: len(cf) - len(real)] == [PAD] * (len(cf) - len(real))  # padding on the left only
        out = cp.decode(cp.model(torch.tensor([ex.counterfactual]))[0])[-1]
        assert out == len(real) == ex.meta["counterfactual_output"] != ex.meta["clean_output"]


@pytest.mark.parametrize("name", ["sort_unique", "frac_prevs", "shuffle_dyck2"])
def test_tasks_change_the_output_and_the_model_gets_them_right(name):
    cp = compiled(name)
    ds = make_tracr_task(cp, n=24, seed=2, unique=SUITE[name].unique_tokens)
    b = measure_behaviour(cp.model, ds, progress=False)
    assert (b.metric_clean > b.metric_counterfactual + 1e-3).sum() + (b.metric_clean < b.metric_counterfactual - 1e-3).sum() == len(ds)
    assert float(b.correct.mean()) == 1.0
    for ex in ds.examples:
        assert ex.meta["clean_output"] != ex.meta["counterfactual_output"]


def test_edge_ablation_on_a_compiled_model_gives_model_and_counterfactual():
    """The graph runner on a bidirectional model without normalisation: nothing ablated is the model,
    everything ablated is the counterfactual run."""
    cp = compiled("first_frac")
    model, graph = cp.model, Graph.from_model(cp.model)
    ds = make_tracr_task(cp, n=8)
    b = ds.batch()
    with graph_hooks(model, graph, record_up=True) as run:
        model(b.counterfactual, attention_mask=b.attention_mask)
    reference = run.up
    clean = model(b.clean, attention_mask=b.attention_mask)
    cf = model(b.counterfactual, attention_mask=b.attention_mask)
    for keep_value, want in ((1.0, clean), (0.0, cf)):
        keep = torch.full((graph.n_upstream, graph.n_downstream), keep_value, dtype=torch.float64)
        with graph_hooks(model, graph, ablation=Ablation(keep, reference)):
            got = model(b.clean, attention_mask=b.attention_mask)
        torch.testing.assert_close(final_logits(got, b.last), final_logits(want, b.last), atol=1e-9, rtol=0)


def test_auroc_counts_pairs_and_ties():
    labels = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0]), labels) == 1.0
    assert auroc(torch.tensor([0.0, 2.0, 1.0, 0.0, 3.0]), labels) == pytest.approx((0 + 0.5 + 0 + 1 + 1 + 0) / 6)
    assert np.isnan(auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])))


def test_node_scores_sum_edges_into_and_out_of_a_node():
    cp = compiled("length")
    graph = Graph.from_model(cp.model)
    scores = torch.arange(graph.n_edges, dtype=torch.float64)
    nodes = node_scores(graph, scores)
    head = graph.head_index(0, 0)
    touching = [e for e in range(graph.n_edges)
                if int(graph.edge_up[e]) == head or graph.downstream_names[int(graph.edge_down[e])].startswith("a0.")]
    assert float(nodes[head]) == sum(touching)


def test_exact_patching_finds_the_contrast_circuit_of_first_frac():
    r = benchmark_program("first_frac", n=16, methods=("exact", "eap"))
    assert r.edge_auroc["exact"] == 1.0 and r.node_auroc["exact"] == 1.0
    assert set(r.truth["nodes"]) == {"a0.h0", "m0", "m1", "a2.h0"}


def test_benchmark_bad_input_is_one_line(tmp_path):
    for args, message in ((["benchmark", "tracr", "--programs", "sudoku"], "unknown program"),
                          (["benchmark", "tracr", "--methods", "acdc"], "unknown method")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_benchmark_command_on_the_whole_suite(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["benchmark", "tracr", "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("best_mean_edge_auroc=")
    best = float(last.split("=")[1])
    summary = json.loads((out / "benchmark.json").read_text())
    assert [p["program"] for p in summary["programs"]] == list(SUITE)
    assert best == pytest.approx(summary["best_mean_edge_auroc"], abs=1e-4)
    assert best >= 0.95
    page = (out / "report.html").read_text()
    for name in SUITE:
        assert f"<td>{name}</td>" in page
    assert "Edge-level ROC AUC" in page and "Node-level ROC AUC" in page

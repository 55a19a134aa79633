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
from mechscope.toys.tracr import (  # noqa: E402
    PAD, SUITE, ProgramSpec, compile_program, ground_truth, load_program, make_tracr_task)
from mechscope.toys.tracr.benchmark import (  # noqa: E402
    auroc, benchmark_program, circuit_aurocs, floor_scores, node_scores)
from mechscope.toys.tracr.ground_truth import varying_directions  # noqa: E402
from mechscope.toys.tracr.programs import ProgramError  # noqa: E402
from mechscope.toys.tracr.report import benchmark_json  # noqa: E402
from mechscope.toys.tracr.tasks import all_inputs, count_inputs, nth_input  # noqa: E402

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
    info = ds.info["inputs"]
    assert info["space"] == 9 + 27 + 81 + 243 and info["sampled_lengths"] == [2, 3, 4, 5] and info["dropped"] == 0
    assert info["evaluated"] >= 2 * 24  # each drawn input and its unpadded suffix
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


def pairwise_auroc(scores, labels):
    """The slow count: over every (circuit, other) pair, 1 when the circuit one scores higher, 1/2 on a tie."""
    pos = [float(s) for s, l in zip(scores, labels) if l]
    neg = [float(s) for s, l in zip(scores, labels) if not l]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_with_ties_equals_the_pairwise_count():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 4, (30,), generator=gen).double()  # many ties
        labels = torch.rand(30, generator=gen) < 0.3
        assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)


def test_the_floor_takes_away_a_ranking_made_of_tiny_scores_alone():
    # Three circuit edges: one real score and two tiny ones that beat the five exact zeros only because
    # they are not zero.
    scores = torch.tensor([0.5, 1e-15, -1e-33, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    assert auroc(scores.abs(), labels) == 1.0  # as now
    floored = floor_scores(scores)
    assert floored.tolist() == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert auroc(floored, labels) == pytest.approx(pairwise_auroc(floored, labels)) == pytest.approx((5 + 2 * 5 * 0.5) / 15)
    # The floor is relative to the largest |score|, strict, and leaves all-zero scores alone.
    edge = torch.tensor([-3.0, 3.3e-6, 2.7e-6, 2.0], dtype=torch.float64)
    assert floor_scores(edge).tolist() == [-3.0, 3.3e-6, 0.0, 2.0]
    small = (edge * 1e-9).tolist()  # the floor is relative: scaling every score keeps the same ones
    assert floor_scores(edge * 1e-9).tolist() == [small[0], small[1], 0.0, small[3]]
    assert floor_scores(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    # Real circuit scores separated from the zeros keep their AUROC of 1 under the floor.
    strong = torch.tensor([0.5, 0.2, 1e-3, 0, 0, 0, 0, 0], dtype=torch.float64)
    assert auroc(floor_scores(strong), labels) == 1.0


def test_circuit_aurocs_floor_edges_and_nodes_alike():
    """reverse's whole circuit: one edge (a3.h0->logits) scores 1, its other nine 1e-20, the rest 0."""
    cp = compiled("reverse")
    whole = ground_truth(cp)
    graph = whole.graph
    scores = torch.where(whole.edges, 1e-20, 0.0).double()
    strong = [e for e in range(graph.n_edges) if graph.edge_name(e) == "a3.h0->logits"]
    scores[strong] = 1.0
    got = circuit_aurocs(graph, scores, whole, whole)
    assert got["edge_auroc"] == got["program_edge_auroc"] == 1.0
    assert got["edge_auroc_floor"] == pytest.approx((67 + 9 * 67 * 0.5) / (10 * 67))
    assert got["edge_auroc_floor"] == pytest.approx(pairwise_auroc(floor_scores(scores), whole.edges))
    # Nodes: the five circuit nodes (a0.h0, m0, m1, m2, a3.h0) against a1.h0, a2.h0, m3. As computed
    # every circuit node touches a non-zero edge; floored, only a3.h0 does and four tie at 0 with the rest.
    assert got["node_auroc"] == 1.0
    assert got["node_auroc_floor"] == pytest.approx((3 + 4 * 3 * 0.5) / (5 * 3))
    assert got["program_node_auroc_floor"] == got["node_auroc_floor"]


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
    # Every edge's scores and circuit flags are kept, and the AUROCs are those of the kept scores.
    edges = r.edges
    assert len(edges["names"]) == len(edges["in_circuit"]) == len(edges["in_program_circuit"]) == r.n_edges
    assert [n for n, c in zip(edges["names"], edges["in_circuit"]) if c] == r.truth["edges"]
    assert [n for n, c in zip(edges["names"], edges["in_program_circuit"]) if c] == r.program_truth["edges"]
    for m in ("exact", "eap"):
        s = torch.tensor(edges["scores"][m], dtype=torch.float64)
        assert r.edge_auroc[m] == pytest.approx(pairwise_auroc(s, edges["in_circuit"]))
        assert r.edge_auroc_floor[m] == pytest.approx(pairwise_auroc(floor_scores(s), edges["in_circuit"]))
        assert r.program_edge_auroc_floor[m] == pytest.approx(pairwise_auroc(floor_scores(s), edges["in_program_circuit"]))
        assert 0.0 <= r.program_node_auroc[m] <= 1.0 and 0.0 <= r.program_node_auroc_floor[m] <= 1.0
    assert r.inputs["dropped"] == 0 and r.inputs["sampled_lengths"] == [] and r.inputs["evaluated"] == r.inputs["space"]


def test_nth_input_follows_the_enumeration():
    for unique in (False, True):
        for length in (1, 2, 3):
            xs = all_inputs((3, "b", 1, "a"), length, unique)
            assert len(xs) == count_inputs(4, length, unique)
            assert [nth_input((3, "b", 1, "a"), length, unique, i) for i in range(len(xs))] == xs


def test_large_input_spaces_are_sampled_with_the_seed():
    cp = compiled("reverse")  # 3 ** L inputs of length L: 9, 27, 81, 243
    ds = make_tracr_task(cp, n=10, seed=3, max_inputs=10)
    info = ds.info["inputs"]
    assert info["sampled_lengths"] == [3, 4, 5] and info["space"] == 9 + 27 + 81 + 243
    assert info["evaluated"] == 9 + 3 * 10 and info["dropped"] == 0
    again = make_tracr_task(cp, n=10, seed=3, max_inputs=10)
    assert [e.clean for e in again.examples] == [e.clean for e in ds.examples]
    other = make_tracr_task(cp, n=10, seed=4, max_inputs=10)
    assert [e.clean for e in other.examples] != [e.clean for e in ds.examples]
    b = measure_behaviour(cp.model, ds, progress=False)
    assert float(b.correct.mean()) == 1.0
    for ex in ds.examples:
        assert ex.meta["clean_output"] != ex.meta["counterfactual_output"]
    assert make_tracr_task(cp, n=10).info["inputs"]["sampled_lengths"] == []  # 243 <= 4096: enumerated


TAGGED = '''
from mechscope.toys.tracr import ProgramSpec


def _build():
    from tracr.rasp import rasp

    # A categorical mean over the positions holding my token: a float on repeated tokens, so "xyz"[i] raises.
    where = rasp.Aggregate(rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.EQ), rasp.indices).named("where")
    return rasp.SequenceMap(lambda t, i: t + "xyz"[i], rasp.tokens, where).named("tagged")


def tagged():
    return ProgramSpec(_build, ("a", "b", "c"), 3, "each token tagged with its position")


def not_a_spec():
    return 3


def one_value():
    return ProgramSpec(_build, ("a",), 3)


def not_rasp():
    return ProgramSpec(lambda: "tokens", ("a", "b"), 3)
'''


def test_inputs_the_program_raises_on_are_dropped_and_counted(tmp_path):
    (tmp_path / "mine.py").write_text(TAGGED)
    name, spec = load_program(f"{tmp_path / 'mine.py'}:tagged")
    assert name == "tagged" and isinstance(spec, ProgramSpec)
    cp = compile_program(spec.build(), spec.vocab, spec.max_seq_len, name=name)
    ds = make_tracr_task(cp, n=12)
    info = ds.info["inputs"]
    # Lengths 2 and 3 over three tokens: 9 + 27 inputs, of which 6 + 6 have no repeated token.
    assert info["space"] == info["evaluated"] == 36 and info["dropped"] == 36 - 12
    for ex in ds.examples:
        for text in (ex.clean_text, ex.counterfactual_text):
            assert len(set(text.split())) == len(text.split())
    assert float(measure_behaviour(cp.model, ds, progress=False).correct.mean()) == 1.0
    assert not (tmp_path / "__pycache__").exists()


def test_load_program_by_module_name_and_its_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "mine_tracr_mod.py").write_text(TAGGED)
    monkeypatch.chdir(tmp_path)  # module names resolve from the working directory
    assert load_program("mine_tracr_mod:tagged")[0] == "tagged"
    for ref, message in (("mine_tracr_mod", "expected module:function"),
                         ("no_such_module_xyz:f", "cannot import module no_such_module_xyz: ModuleNotFoundError"),
                         ("mine_tracr_mod:nope", "mine_tracr_mod has no attribute 'nope'"),
                         ("mine_tracr_mod:ProgramSpec", "ProgramSpec() raised TypeError"),
                         ("mine_tracr_mod:not_a_spec", "returned an object of type int, not a mechscope.toys.tracr.ProgramSpec"),
                         ("mine_tracr_mod:one_value", "vocab needs at least two values"),
                         ("mine_tracr_mod:not_rasp", "build() returned an object of type str, not a RASP SOp"),
                         ("missing/file.py:tagged", "no file missing/file.py")):
        with pytest.raises(ProgramError) as info:
            load_program(ref)
        assert message in str(info.value) and "\n" not in str(info.value), (ref, str(info.value))


def test_benchmark_json_keeps_value_lists_on_one_line():
    summary = {"programs": [{"edges": {"names": ["a->b", "x[y", "c d"], "scores": {"eap": [0.0, 1e-15, 2.5]}}}],
               "nested": [[1, 2], []], "text": "two  spaces"}
    text = benchmark_json(summary)
    assert json.loads(text) == summary
    assert '"scores": {\n' in text and '"eap": [0.0, 1e-15, 2.5]' in text
    assert '"c d"' in text  # strings keep their spaces; a list holding a bracket stays as json.dumps laid it out


def test_benchmark_command_on_a_program_users_bring(tmp_path):
    (tmp_path / "mine.py").write_text(TAGGED)
    out = tmp_path / "bench"
    result = runner.invoke(app, ["benchmark", "tracr", "--program", f"{tmp_path / 'mine.py'}:tagged",
                                 "--methods", "eap,exact", "--n", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "36 of 36 inputs evaluated; 24 dropped because the RASP program raised on them" in text
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("best_mean_edge_auroc_floor=") and lines[-3].startswith("best_mean_edge_auroc=")
    summary = json.loads((out / "benchmark.json").read_text())
    (r,) = summary["programs"]
    assert r["program"] == "tagged" and r["inputs"]["dropped"] == 24
    assert float(lines[-1].split("=")[1]) == pytest.approx(summary["best_mean_edge_auroc_floor"], abs=1e-4)
    assert set(r["edges"]["scores"]) == {"eap", "exact"} and len(r["edges"]["scores"]["eap"]) == r["n_edges"]
    page = (out / "report.html").read_text()
    assert "eap (floor)" in page and "Node-level ROC AUC (the program's whole circuit)" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "mine.py"]


def test_benchmark_bad_input_is_one_line(tmp_path):
    for args, message in ((["benchmark", "tracr", "--programs", "sudoku"], "unknown program"),
                          (["benchmark", "tracr", "--methods", "magic"], "unknown method")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_benchmark_command_on_the_whole_suite(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["benchmark", "tracr", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-3].startswith("best_mean_edge_auroc=") and lines[-1].startswith("best_mean_edge_auroc_floor=")
    best, best_floor = float(lines[-3].split("=")[1]), float(lines[-1].split("=")[1])
    summary = json.loads((out / "benchmark.json").read_text())
    assert [p["program"] for p in summary["programs"]] == list(SUITE)
    assert best == pytest.approx(summary["best_mean_edge_auroc"], abs=1e-4)
    assert best_floor == pytest.approx(summary["best_mean_edge_auroc_floor"], abs=1e-4)
    assert best >= 0.95
    page = (out / "report.html").read_text()
    for name in SUITE:
        assert f"<td>{name}</td>" in page
    assert "Edge-level ROC AUC" in page and "Node-level ROC AUC" in page

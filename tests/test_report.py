"""`mechscope circuit`: the report directory, its numbers against the Python API, bad input, and the
HTML report in a real headless browser (Debian's chromium driven by Playwright), offline."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
import torch
from typer.testing import CliRunner

import mechscope
from mechscope.cli import app
from mechscope.circuits.discovery import prepare
from mechscope.circuits.evaluation import evaluate, faithfulness_curve
from mechscope.report import FILES
from mechscope.tasks import make_task

runner = CliRunner()


def embedded(page: str) -> dict:
    """Every section's embedded data, parsed as strict JSON (a browser's JSON.parse rejects NaN)."""
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    found = re.findall(r'<script type="application/json" id="data-([^"]+)">(.*?)</script>', page, re.S)
    return {name: json.loads(text, parse_constant=refuse) for name, text in found}


def section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', page)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_model_dirs):
    out = tmp_path_factory.mktemp("report") / "ioi"
    result = runner.invoke(app, ["circuit", "--task", "ioi", "--model", str(tiny_model_dirs["llama"]), "--n", "32",
                                 "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out faithfulness" in result.output
    return out


def test_circuit_writes_every_file(report_dir):
    assert sorted(p.name for p in report_dir.iterdir()) == sorted(FILES)
    assert not list(report_dir.parent.glob(".ioi.*"))  # no temporary directory left
    assert (report_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report_dir / "report.html").read_text()
    for needle in ("http://", "https://", "<link", "src="):
        assert needle not in page.replace("http://www.w3.org/2000/svg", ""), needle
    assert section_ids(page) == ["summary", "curves", "circuit", "edges", "attention"]
    data = embedded(page)  # strict JSON
    assert list(data["curves"]["curves"]) == ["peap", "eap"]
    assert data["circuit"]["nodes"]["name"]
    # edges.csv: the saved circuit's span edges, largest |score| first.
    with open(report_dir / "edges.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    circuit = mechscope.load_any_circuit(report_dir / "circuit.json")
    assert len(rows) == circuit.n_edges > 0
    scores = [abs(float(r["score"])) for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_circuit_with_a_non_positional_method(tmp_path, tiny_model_dirs):
    out = tmp_path / "eap"
    result = runner.invoke(app, ["circuit", "--task", "ioi", "--model", str(tiny_model_dirs["gpt2"]), "--n", "24",
                                 "--method", "eap", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["eap"]
    assert isinstance(mechscope.load_any_circuit(out / "circuit.json"), mechscope.Circuit)
    with open(out / "edges.csv", newline="") as f:
        assert {r["spans"] for r in csv.DictReader(f)} <= {"*", "*->*"}
    assert embedded((out / "report.html").read_text())["circuit"]["spans"] == ["*"]


def test_summary_equals_the_python_api(report_dir, tiny_model_dirs):
    summary = json.loads((report_dir / "summary.json").read_text())
    for key in ("model", "task", "n_examples", "model_accuracy", "metric_clean", "metric_ablated", "methods"):
        assert key in summary
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    data = make_task("ioi", model.tokenizer, 32, seed=1)
    behaviour, discovery, evaluation = prepare(model, data, seed=1, progress=False)
    assert summary["n_examples"] == 32 and summary["n_evaluation"] == len(evaluation)
    assert summary["model_accuracy"] == pytest.approx(behaviour["model_accuracy"])
    assert summary["metric_clean"] == pytest.approx(behaviour["metric_clean"])
    for method in ("peap", "eap"):
        scores = mechscope.attribute(model, discovery, method, progress=False)
        curve = faithfulness_curve(model, scores, evaluation, selection="greedy", progress=False)
        points = summary["methods"][method]["points"]
        assert len(points) == len(curve.points)
        for got, want in zip(points, curve.points):
            assert got["fraction"] == want.fraction and got["edges"] == want.n_edges
            for key in ("soft", "hard", "normalized"):
                assert got[key] == pytest.approx(getattr(want, key), abs=1e-6), (method, key)
            assert got["concrete_edges"] == pytest.approx(want.concrete_edges)
        assert summary["methods"][method]["cpr"] == pytest.approx(curve.cpr, abs=1e-6)
        assert summary["methods"][method]["cmd"] == pytest.approx(curve.cmd, abs=1e-6)
        if method == "peap":
            assert summary["metric_ablated"] == pytest.approx(curve.points[0].metric_empty, abs=1e-6)
            saved = mechscope.EdgeScores.load(report_dir / "scores.safetensors")
            assert torch.allclose(saved.values, scores.values, atol=1e-7)
    # The saved circuit reloads and evaluates to the faithfulness the summary reports.
    circuit = mechscope.load_any_circuit(report_dir / "circuit.json")
    again = evaluate(model, circuit, evaluation, progress=False)
    assert again.normalized == pytest.approx(summary["circuit"]["normalized"], abs=1e-6)
    assert again.concrete_edges == pytest.approx(summary["circuit"]["concrete_edges"])


def test_circuit_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny_model_dirs):
    model = str(tiny_model_dirs["llama"])
    data_file = tmp_path / "small.jsonl"
    tok = mechscope.load_model(model, device="cpu").tokenizer
    make_task("ioi", tok, 6, seed=0).save(data_file)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    cases = [
        (["--task", "sudoku", "--out", str(out)], "unknown task"),
        (["--data", str(tmp_path / "missing.jsonl"), "--out", str(out)], "no such"),
        (["--data", str(data_file), "--n", "50", "--out", str(out)], "larger than the 6 examples"),
        (["--task", "ioi", "--out", str(blocker / "report")], "cannot write there"),
        (["--task", "ioi", "--out", str(full)], "not an empty directory"),
        (["--task", "ioi", "--method", "acdc", "--out", str(out)], "unknown method"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["circuit", "--model", model, *args])
        assert result.exit_code == 2, (args, result.output)
        text = result.output.replace("\n", " ")
        assert message in text, (args, result.output)
        assert "Traceback" not in result.output
        assert not out.exists()
    assert (full / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "full", "small.jsonl"]


def test_report_in_a_headless_browser_offline(report_dir, tmp_path):
    """Opens report.html from disk with every network request blocked and recorded: no script error, no
    section reports a failure, each curve chart draws a line per method, the edges table sorts by the
    column header clicked (descending, then ascending), and a 1280x800 screenshot of the curves is not
    blank. (The viewers' own browser tests are in their test files.)"""
    from viewer_pages import browser

    summary = json.loads((report_dir / "summary.json").read_text())
    with browser(1280, 800) as (context, outside):
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((report_dir / "report.html").as_uri())
        page.wait_for_selector("#curve-normalized path.curve", state="attached")
        assert errors == []
        assert page.locator(".section-error").count() == 0
        for chart in ("normalized", "soft", "hard"):
            assert page.locator(f"#curve-{chart} path.curve").count() == len(summary["methods"])
        assert page.locator("#curve-legend span").count() == len(summary["methods"])

        def column(i):
            return page.eval_on_selector_all(
                "#edges tbody tr", f"rows => rows.map(r => r.children[{i}].dataset.v)")

        by_score = [abs(float(v)) for v in column(4)]
        assert by_score == sorted(by_score, reverse=True) and len(by_score) > 1
        header = page.locator("#edges thead th", has_text="concrete edges")
        header.click()
        down = [float(v) for v in column(5)]
        assert down == sorted(down, reverse=True)
        header.click()
        up = [float(v) for v in column(5)]
        assert up == sorted(up) and sorted(up) == sorted(down)
        page.locator("#edges thead th", has_text="from").click()
        names = page.eval_on_selector_all("#edges tbody tr", "rows => rows.map(r => r.children[0].textContent)")
        assert names == sorted(names, reverse=True) and len(set(names)) > 1

        page.locator("#curves").scroll_into_view_if_needed()
        shot = page.locator("#curves .charts").screenshot(path=str(tmp_path / "curves.png"))
    assert outside == []
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(shot), format="png")[..., :3]
    drawn = (abs(pixels - pixels[0, 0]).sum(-1) > 0.15).mean()
    assert drawn > 0.005, drawn


@pytest.mark.parametrize("query_edges", ["per_key", "whole_row"])
def test_edges_csv_names_query_edges_with_their_key_span(tiny_model_dirs, tmp_path, query_edges):
    """Every query edge of a circuit is in edges.csv once, from the head's query input to its output at
    the query span, with its score and concrete count: the (t', t) pairs of its key span and query span
    for a per-key edge (whose key span it names), the query span's tokens for a whole-row one."""
    from mechscope.attribution import attribute
    from mechscope.circuits.span_circuit import span_counts, span_greedy
    from mechscope.report import write

    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    data = make_task("ioi", model.tokenizer, 6, seed=0)
    scores = attribute(model, data, "peap", batch_size=6, progress=False, query_edges=query_edges)
    circuit = span_greedy(scores, 300)
    out = write(tmp_path / "r", scores=scores, circuit=circuit, dataset=data)
    with open(out / "edges.csv", newline="") as f:
        drawn = [r for r in csv.DictReader(f) if r["type"] == "q"]
    kept = circuit.crossing["q"].nonzero().tolist()
    assert len(drawn) == len(kept) > 0
    spans, counts = list(data.schema.spans), span_counts(data, list(range(len(data.schema))), len(data.schema))
    want = set()
    for idx in kept:
        l, h, b = idx[0], idx[1], idx[-1]
        a = idx[2] if query_edges == "per_key" else None
        concrete = counts["tokens"][b] if a is None else counts["pairs"][a, b]
        want.add((f"a{l}.h{h}.q@{spans[b]}", f"a{l}.h{h}@{spans[b]}", spans[b] if a is None else f"{spans[a]}->{spans[b]}",
                  round(float(scores.crossing["q"][tuple(idx)]), 6), round(float(concrete), 6)))
    got = {(r["parent"], r["child"], r["spans"], round(float(r["score"]), 6), round(float(r["concrete"]), 6))
           for r in drawn}
    assert got == want

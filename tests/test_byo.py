"""Bring your own task: a text JSONL of capital cities through `mechscope data --from-jsonl` and
`mechscope circuit --data`, its one-line errors, custom metrics from Python, the warning when
normalized faithfulness is noise, `--overwrite`, and the saved circuit's model / method."""

from __future__ import annotations

import json
import warnings

import pytest
import tiny
import torch
from typer.testing import CliRunner

import mechscope
from mechscope.attribution import attribute
from mechscope.behaviour import measure_behaviour
from mechscope.circuits.circuit import Circuit
from mechscope.circuits.discovery import discover_circuit
from mechscope.circuits.evaluation import Curve, Faithfulness, evaluate, faithfulness_curve, select_circuits
from mechscope.cli import app
from mechscope.data import PromptPair, PromptPairDataset, load_text_jsonl
from mechscope.errors import MechscopeWarning
from mechscope.fileio import atomic_dir
from mechscope.metrics import MetricError, metric_name
from mechscope.report import FILES
from mechscope.schemas.saliency import token_saliency
from mechscope.tasks import make_task

runner = CliRunner()

CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi"}


@pytest.fixture(scope="module")
def capitals_model(tmp_path_factory):
    """A tiny random Llama whose tokenizer has seen the capital-city sentences (so every country and
    capital is one token, as in a real model's vocabulary)."""
    lines = tuple(f"The capital of {c} is {k}." for c, k in CAPITALS.items()) * 20
    tok = tiny.build_tokenizer(800, lines)
    return str(tiny.save_model_dir(tmp_path_factory.mktemp("capitals") / "llama", "llama", tok, seed=3))


def capital_rows(spans: bool) -> list[dict]:
    rows = []
    for a, b in [(a, b) for a in CAPITALS for b in CAPITALS if a != b]:
        if spans:
            clean = [["subject", "The capital of"], ["country", f" {a}"], ["end", " is"]]
            cf = [["subject", "The capital of"], ["country", f" {b}"], ["end", " is"]]
        else:
            clean, cf = f"The capital of {a} is", f"The capital of {b} is"
        rows.append({"clean": clean, "counterfactual": cf, "correct": f" {CAPITALS[a]}",
                     "wrong": [f" {CAPITALS[b]}"], "meta": {"country": a}})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_text_jsonl_circuit_end_to_end(tmp_path, capitals_model):
    data = write_jsonl(tmp_path / "capitals.jsonl", capital_rows(spans=True))
    out = tmp_path / "report"
    result = runner.invoke(app, ["circuit", "--data", data, "--model", capitals_model, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "capitals" and summary["metric"] == "logit_diff" and summary["n_examples"] == 56
    sig = summary["signal"]
    assert sig["weak"] == (abs(sig["gap"]) < 2 * sig["gap_se"]) and sig["weak"] == bool(summary["warnings"])
    # The circuit file names the model and the method that found it.
    saved = json.loads((out / "circuit.json").read_text())
    assert saved["model"] == summary["model"] != "" and saved["method"] == "peap"
    assert mechscope.load_any_circuit(out / "circuit.json").spans == ("bos", "subject", "country", "end")
    page = (out / "report.html").read_text()
    assert "capitals" in page and "M(model) − M(all ablated) ± standard error" in page

    # The same rows tokenized by hand: spans and ids as the tokenizer gives them.
    model = mechscope.load_model(capitals_model, device="cpu")
    ds = load_text_jsonl(data, model.tokenizer)
    tok = model.tokenizer
    first = ds.examples[0]
    assert first.clean == [tok.bos_token_id] + tok("The capital of France is", add_special_tokens=False)["input_ids"]
    assert first.correct == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert first.span_starts == [0, 1, 4, 5] and first.meta["country"] == "France"


def test_data_from_jsonl_without_spans_then_curves(tmp_path, capitals_model):
    data = write_jsonl(tmp_path / "caps.jsonl", capital_rows(spans=False)[:24])
    out = tmp_path / "caps_tokens.jsonl"
    result = runner.invoke(app, ["data", "--from-jsonl", data, "--model", capitals_model, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "model_accuracy" in result.output and "bos | prompt" in result.output
    ds = PromptPairDataset.load(out)
    assert len(ds) == 24 and ds.schema.spans == ("bos", "prompt") and ds.task == "caps"
    assert all(ex.span_starts == [0, 1] for ex in ds.examples)
    # The converted file and the text file give the same curves.
    curves = {}
    for name, source in (("tokens", out), ("text", data)):
        target = tmp_path / f"curves_{name}.json"
        result = runner.invoke(app, ["curves", "--data", str(source), "--model", capitals_model, "--methods", "eap",
                                     "--fractions", "0.1,1", "--out", str(target)])
        assert result.exit_code == 0, result.output
        curves[name] = json.loads(target.read_text())
    assert curves["tokens"]["methods"] == curves["text"]["methods"]
    assert set(curves["text"]["signal"]) == {"gap", "gap_se", "weak"}


@pytest.mark.parametrize("case", ["missing", "multi_token", "lengths", "bad_json", "spans_differ"])
def test_text_jsonl_errors_name_file_row_field_and_write_nothing(tmp_path, capitals_model, case):
    rows: list = capital_rows(spans=False)[:4]
    if case == "missing":
        del rows[1]["wrong"]
        line, needle = 2, "missing field 'wrong'"
    elif case == "multi_token":
        rows[2]["correct"] = " Atlantis"
        line, needle = 3, "field 'correct': answer ' Atlantis' is"
    elif case == "lengths":
        rows[0]["counterfactual"] = "The capital of the old Atlantis is"
        line, needle = 1, "field 'counterfactual':"
    elif case == "bad_json":
        rows[2] = '{"clean": "The capital of Peru is", '
        line, needle = 3, "not valid JSON"
    else:
        rows[3]["clean"] = [["subject", "The capital of Peru"], ["end", " is"]]
        rows[3]["counterfactual"] = [["subject", "The capital of Kenya"], ["end", " is"]]
        line, needle = 4, "field 'clean': span names"
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    for args, out in ((["data", "--from-jsonl", data, "--out", str(tmp_path / "g.jsonl")], tmp_path / "g.jsonl"),
                      (["circuit", "--data", data, "--out", str(tmp_path / "report")], tmp_path / "report")):
        result = runner.invoke(app, [*args, "--model", capitals_model])
        assert result.exit_code == 2, (case, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        text = errors[0]
        assert f"{data}, line {line}:" in text and needle in text, text
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


# ------------------------------------------------------------------------------------------------
# Custom metrics
# ------------------------------------------------------------------------------------------------


def my_logit_diff(logits, batch):
    """logit_diff written by hand: mean correct-answer logit minus mean wrong-answer logit."""
    correct = (logits.gather(-1, batch.correct) * batch.correct_mask).sum(-1) / batch.correct_mask.sum(-1)
    wrong = (logits.gather(-1, batch.wrong) * batch.wrong_mask).sum(-1) / batch.wrong_mask.sum(-1).clamp(min=1)
    return correct - wrong


def correct_logprob(logits, batch):
    return logits.float().log_softmax(-1).gather(-1, batch.correct[:, :1]).squeeze(-1)


@pytest.fixture(scope="module")
def small(tiny_model_dirs):
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    return model, make_task("ioi", model.tokenizer, 8, seed=2)


def test_custom_metric_equal_to_logit_diff_gives_the_same_scores(small):
    model, data = small
    for method in ("eap", "eap-ig", "peap", "exact"):
        kw = {"edges": torch.arange(0, 82, 6)} if method == "exact" else {}  # a subset: one pass per edge
        named = attribute(model, data, method, metric="logit_diff", progress=False, **kw)
        custom = attribute(model, data, method, metric=my_logit_diff, progress=False, **kw)
        assert custom.metric == "my_logit_diff" and named.metric == "logit_diff"
        assert torch.allclose(custom.values, named.values, atol=1e-5, equal_nan=True), method
        for k in named.crossing:
            assert torch.allclose(custom.crossing[k], named.crossing[k], atol=1e-5), (method, k)
    sal_named = token_saliency(model, data, progress=False)
    sal_custom = token_saliency(model, data, metric=my_logit_diff, progress=False)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sal_named, sal_custom))


def test_custom_metric_identities_and_records(small, tmp_path):
    model, data = small
    scores = attribute(model, data, "eap", metric=correct_logprob, progress=False)
    graph = scores.graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MechscopeWarning)
        full = evaluate(model, Circuit.full(graph), data, metric=correct_logprob, progress=False)
        empty = evaluate(model, Circuit.empty(graph), data, metric=correct_logprob, progress=False)
        curve = faithfulness_curve(model, scores, data, fractions=(0.05, 1.0), metric=correct_logprob, progress=False)
    behaviour = measure_behaviour(model, data, metric=correct_logprob, progress=False)
    assert full.metric_model == pytest.approx(float(behaviour.metric_clean.mean()), abs=1e-5)
    assert full.metric_model == pytest.approx(float(correct_logprob(*_final(model, data)).mean()), abs=1e-5)
    assert full.metric_empty == pytest.approx(float(behaviour.metric_counterfactual.mean()), abs=1e-4)
    assert abs(full.normalized - 1) < 1e-4 and abs(empty.normalized) < 1e-4
    assert abs(curve.points[-1].normalized - 1) < 1e-4
    # A custom metric differs from the dataset's own: the model's values are not logit_diff's.
    assert full.metric_model != pytest.approx(float(measure_behaviour(model, data, progress=False).metric_clean.mean()))
    # Files record the function's name, or 'custom' for a lambda.
    scores.save(tmp_path / "s.safetensors")
    assert mechscope.EdgeScores.load(tmp_path / "s.safetensors").metric == "correct_logprob"
    assert metric_name(lambda lo, b: lo[:, 0]) == "custom"
    assert behaviour.summary(correct_logprob)["metric"] == "correct_logprob"


def test_custom_metric_in_discovery_and_bad_metrics(small):
    model, data = small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MechscopeWarning)
        run = discover_circuit(model, data, "eap", metric=my_logit_diff, fractions=(0.1, 1.0), progress=False)
    assert run.summary["metric"] == "my_logit_diff"
    assert run.scores["eap"].metric == "my_logit_diff" and run.circuit.info["metric"] == "my_logit_diff"
    with pytest.raises(MetricError, match="one value per example"):
        attribute(model, data, "eap", metric=lambda logits, batch: logits.sum(), progress=False)
    with pytest.raises(MetricError, match="unknown metric 'logitdiff'"):
        attribute(model, data, "eap", metric="logitdiff", progress=False)


def _final(model, data):
    from mechscope.metrics import final_logits

    batch = data.batch()
    with torch.no_grad():
        return final_logits(model(batch.clean, attention_mask=batch.attention_mask), batch.last), batch


# ------------------------------------------------------------------------------------------------
# The weak-signal warning
# ------------------------------------------------------------------------------------------------


def _with_answers(data: PromptPairDataset, model, swap: bool) -> PromptPairDataset:
    """Examples whose correct answer is the model's top token on the clean prompt and whose wrong
    answer its top token on the counterfactual one (so M(model) - M(all ablated) > 0 for every
    example); with `swap`, each example also appears with clean and counterfactual exchanged (the
    differences then cancel exactly)."""
    batch = data.batch()
    with torch.no_grad():
        from mechscope.metrics import final_logits

        top_c = final_logits(model(batch.clean, attention_mask=batch.attention_mask), batch.last).argmax(-1)
        top_x = final_logits(model(batch.counterfactual, attention_mask=batch.attention_mask), batch.last).argmax(-1)
    examples = []
    for ex, a, b in zip(data.examples, top_c.tolist(), top_x.tolist()):
        if a == b:
            continue
        examples.append(PromptPair(ex.clean, ex.counterfactual, [a], [b], ex.span_starts))
        if swap:
            examples.append(PromptPair(ex.counterfactual, ex.clean, [a], [b], ex.span_starts))
    return data._with(examples)


def _mechscope_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    return value, [str(w.message) for w in caught if issubclass(w.category, MechscopeWarning)]


def test_weak_signal_warning_fires_only_when_the_difference_is_noise(tiny_model_dirs):
    model = mechscope.load_model(str(tiny_model_dirs["gpt2"]), device="cpu")
    base = make_task("ioi", model.tokenizer, 24, seed=5)
    clear, cancelling = _with_answers(base, model, swap=False), _with_answers(base, model, swap=True)
    assert len(clear) >= 8
    scores = attribute(model, clear, "eap", progress=False)
    graph = scores.graph

    result, found = _mechscope_warnings(lambda: evaluate(model, Circuit.empty(graph), clear, progress=False))
    assert found == [] and result.weak_signal() is None
    assert result.gap > 2 * result.gap_se > 0

    result, found = _mechscope_warnings(lambda: evaluate(model, Circuit.empty(graph), cancelling, progress=False))
    assert abs(result.gap) < 1e-4 and len(found) == 1 and "normalized faithfulness divides by noise" in found[0]
    curve, found = _mechscope_warnings(
        lambda: faithfulness_curve(model, scores, cancelling, fractions=(0.1, 1.0), progress=False))
    assert len(found) == 1 and curve.weak_signal() == found[0] and "weak signal" in repr(curve)
    curve, found = _mechscope_warnings(
        lambda: faithfulness_curve(model, scores, clear, fractions=(0.1, 1.0), progress=False))
    assert found == [] and "weak signal" not in repr(curve)


def test_cli_prints_and_records_the_weak_signal_warning(tmp_path, capitals_model):
    # Counterfactuals equal to the clean prompts: ablating everything changes nothing.
    rows = capital_rows(spans=False)[:16]
    for r in rows:
        r["counterfactual"] = r["clean"]
    data = write_jsonl(tmp_path / "same.jsonl", rows)
    out = tmp_path / "report"
    result = runner.invoke(app, ["circuit", "--data", data, "--model", capitals_model, "--method", "eap",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["signal"]["weak"] and summary["signal"]["gap"] == 0
    assert len(summary["warnings"]) == 1 and "is zero" in summary["warnings"][0]
    assert result.output.count("warning: M(model) - M(all ablated)") == 1
    assert 'class="warning"' in (out / "report.html").read_text()


# ------------------------------------------------------------------------------------------------
# Task B: --overwrite, the saved circuit's model / method, Curve's repr and properties
# ------------------------------------------------------------------------------------------------


def test_circuit_overwrite_replaces_a_previous_report_only(tmp_path, tiny_model_dirs):
    model = str(tiny_model_dirs["gpt2"])
    out = tmp_path / "r"
    args = ["circuit", "--task", "ioi", "--model", model, "--n", "16", "--method", "eap", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    (out / "old-marker").write_text("x")
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output and (out / "old-marker").exists()
    result = runner.invoke(app, [*args[:-2], "--seed", "4", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert json.loads((out / "summary.json").read_text())["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing left beside it
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    refused = runner.invoke(app, [*args[:-2], "--out", str(other), "--overwrite"])
    assert refused.exit_code == 2 and "not a mechscope report directory" in refused.output
    assert (other / "notes.txt").read_text() == "keep"


def test_atomic_replace_keeps_the_old_directory_when_writing_fails(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, replace=True) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("failed half way")
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_selected_circuits_record_model_and_method(small):
    model, data = small
    for method in ("peap", "eap"):
        scores = attribute(model, data, method, progress=False)
        for selection in ("greedy", "top_n"):
            for c in select_circuits(scores, (0.01, 1.0), selection):
                assert c.model == model.mechscope_name != "" and c.method == method, (method, selection)
                assert c.to_json()["model"] and c.to_json()["method"] == method and c.info["metric"] == "logit_diff"


def test_curve_repr_is_short_and_cpr_cmd_are_properties():
    def point(f, v):
        return Faithfulness(n_edges=1, soft=v, hard=1.0, normalized=v, metric_circuit=v, metric_model=1.0,
                            metric_empty=0.0, circuit_accuracy=1.0, model_accuracy=1.0, n_examples=10,
                            fraction=f, concrete_edges=100 * f, gap_se=0.01)

    curve = Curve("eap", "top_n", [point(f, v) for f, v in ((0.0, 0.2), (0.5, 0.6), (1.0, 1.0))], concrete_full=100.0)
    text = repr(curve)
    assert text == "Curve(method='eap', selection='top_n', 3 points, cpr=0.600, cmd=0.400, normalized 0.20..1.00)"
    assert curve.cpr == pytest.approx(0.6) and curve.cmd == pytest.approx(0.4)
    assert curve.cpr_concrete == pytest.approx(0.6) and curve.cmd_concrete == pytest.approx(0.4)
    d = curve.to_dict()
    assert (d["cpr"], d["cmd"], d["cpr_concrete"], d["cmd_concrete"]) == (
        curve.cpr, curve.cmd, curve.cpr_concrete, curve.cmd_concrete)
    assert len(repr(Curve("eap", "top_n", [point(i / 99, 0.5) for i in range(100)]))) < 150

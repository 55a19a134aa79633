"""The command line: `mechscope data` end to end on a tiny model, and one-line errors on bad input."""

from __future__ import annotations

from typer.testing import CliRunner

from mechscope.cli import app
from mechscope.data import PromptPairDataset

runner = CliRunner()


def test_data_writes_a_dataset_and_reports_behaviour(tmp_path, tiny_model_dirs):
    out = tmp_path / "ioi.jsonl"
    result = runner.invoke(app, ["data", "ioi", "--model", str(tiny_model_dirs["llama"]), "--n", "12",
                                 "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "model_accuracy" in result.output and "metric_clean" in result.output
    ds = PromptPairDataset.load(out)
    assert len(ds) == 12 and ds.task == "ioi" and ds.model == str(tiny_model_dirs["llama"])


def test_data_bad_input_gives_one_line_error_and_writes_nothing(tmp_path, tiny_model_dirs):
    model = str(tiny_model_dirs["llama"])
    out = tmp_path / "x.jsonl"
    cases = [
        (["data", "sudoku", "--model", model, "--out", str(out)], "unknown task"),
        (["data", "--from-csv", str(tmp_path / "missing.csv"), "--counterfactual", str(tmp_path / "m2.csv"),
          "--model", model, "--out", str(out)], "no such CSV file"),
        (["data", "--model", model, "--out", str(out)], "give one of a TASK, --from-csv"),
        (["data", "ioi", "--model", "no-such-model", "--out", str(out)], "unknown model"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output.replace("\n", " "), result.output
        assert "Traceback" not in result.output
        assert not out.exists()
        assert not list(tmp_path.glob(".x.jsonl*"))


def test_curves_compares_peap_and_eap_on_concrete_edges(tmp_path, tiny_model_dirs):
    import json

    out = tmp_path / "curves.json"
    result = runner.invoke(app, ["curves", "--task", "ioi", "--model", str(tiny_model_dirs["llama"]), "--n", "24",
                                 "--methods", "peap,eap", "--selection", "greedy", "--fractions", "0.05,0.2,1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["selection"] == "greedy" and set(summary["methods"]) == {"peap", "eap"}
    for curve in summary["methods"].values():
        points = curve["points"]
        assert [p["fraction"] for p in points] == [0.05, 0.2, 1.0]
        assert points[-1]["concrete_edges"] == curve["concrete_full"]
        assert points[-1]["normalized"] == 1.0 or abs(points[-1]["normalized"] - 1.0) < 1e-3
        assert set(curve["concrete_edges_for"]) == {"0.5", "0.8", "0.9"}
    assert "concrete token-level edges" in result.output


def test_curves_bad_fractions_is_a_one_line_error(tmp_path, tiny_model_dirs):
    out = tmp_path / "c.json"
    result = runner.invoke(app, ["curves", "--task", "ioi", "--model", str(tiny_model_dirs["llama"]),
                                 "--fractions", "0.5,0.1", "--out", str(out)])
    assert result.exit_code == 2 and "--fractions must be increasing" in result.output
    assert not out.exists()


def test_every_model_verb_takes_a_device(tmp_path, tiny_model_dirs):
    import torch

    for verb in (["demo"], ["data"], ["curves"], ["circuit"], ["schema"], ["benchmark", "tracr"]):
        assert "--device" in runner.invoke(app, [*verb, "--help"]).output, verb
    out = tmp_path / "d.jsonl"
    model = str(tiny_model_dirs["llama"])
    result = runner.invoke(app, ["data", "ioi", "--model", model, "--n", "4", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    bad = ["floppy"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        result = runner.invoke(app, ["data", "ioi", "--model", model, "--n", "4", "--device", device,
                                     "--out", str(tmp_path / "e.jsonl")])
        assert result.exit_code == 2 and "device" in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "e.jsonl").exists()

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
        (["data", "--model", model, "--out", str(out)], "give either a TASK or --from-csv"),
        (["data", "ioi", "--model", "no-such-model", "--out", str(out)], "unknown model"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output.replace("\n", " "), result.output
        assert "Traceback" not in result.output
        assert not out.exists()
        assert not list(tmp_path.glob(".x.jsonl*"))

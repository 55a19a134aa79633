"""Faults users meet, one row each: the bad input or fault, the one-line message, the exit status, and
nothing left behind.

The next fault found is one row more. A `CliFault` runs `mechscope ARGS` in-process on the tiny random
models; the test checks the exit status, that the message appears on one `error:` line with no
traceback, and that the working folder holds exactly what it held before the command (no output, no
hidden temporary). An `ApiFault` calls the library and checks the exception class and message.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from mechscope.cli import app
from mechscope.errors import MechscopeError

runner = CliRunner()


@dataclass
class Env:
    """What a row may use: a scratch folder (inputs and outputs live there), the tiny model
    directories, and a valid tokenized dataset for the tiny Llama."""

    root: Path
    llama: str
    gpt2: str
    dataset: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def dataset_lines(self) -> list[str]:
        return self.dataset.read_text().splitlines()


@dataclass(frozen=True)
class CliFault:
    name: str
    args: Callable[[Env], list[str]]
    message: str  # a substring of the one-line error (or of the output when status is 0)
    setup: Callable[[Env], object] = lambda env: None
    status: int = 2
    environ: dict[str, str] = field(default_factory=dict)  # extra environment variables; "{root}" is expanded
    after: Callable[[Env], None] | None = None  # further checks once the command returns


@dataclass(frozen=True)
class ApiFault:
    name: str
    call: Callable[["ApiEnv"], object]
    error: type[Exception]
    message: str


@dataclass
class ApiEnv:
    root: Path
    model: object  # the tiny Llama bridge
    dataset: object  # a small IOI dataset for it


def tree(root: Path) -> set[str]:
    """Every file and folder under root, hidden ones included, as relative paths."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# PEAP CSV rows with the tiny tokenizer's indices (one token per word), and one whose indices say
# ' Mary' was two tokens: every later span one word on would fit as well, so it cannot be placed.
PEAP_CSV_HEADER = "prompt,start,IO,and,S1,event,punct,S2,rest,length,correct_token,wrong_token\n"
PEAP_CSV_PROMPT = '"When Mary and John went to the store, John gave a drink to"'
PEAP_CSV_GOOD = PEAP_CSV_PROMPT + ",1,2,3,4,5,9,10,11,15, Mary, John\n"
PEAP_CSV_AMBIGUOUS = PEAP_CSV_PROMPT + ",1,2,4,5,6,10,11,12,16, Mary, John\n"


def peap_csv_args(e: Env) -> list[str]:
    """`data` on root/pairs.csv as both the clean and the counterfactual file."""
    pairs = str(e.root / "pairs.csv")
    return ["data", "--from-csv", pairs, "--counterfactual", pairs, "--model", e.llama, "--out", str(e.out)]


# ------------------------------------------------------------------------------------------------
# The table. Rows are grouped by the part of the tool they exercise.
# ------------------------------------------------------------------------------------------------

CLI_FAULTS: list[CliFault] = [
    # --- choices checked before any model work
    CliFault("unknown task", lambda e: ["data", "sudoku", "--model", e.llama, "--out", str(e.out)],
             "unknown task 'sudoku'"),
    CliFault("circuit: unknown method", lambda e: ["circuit", "--data", str(e.dataset), "--model", e.llama,
                                                   "--method", "magic", "--out", str(e.out)],
             "unknown method 'magic'"),

    # --- datasets and other input files
    CliFault("csv: an ambiguous row is left out and counted", peap_csv_args,
             "excluded 1: ambiguous: the spans fit equally well in more than one place (1)",
             setup=lambda e: e.write("pairs.csv", PEAP_CSV_HEADER + PEAP_CSV_GOOD + PEAP_CSV_AMBIGUOUS),
             status=0),
    CliFault("csv: no row left", peap_csv_args,
             "no row could be converted for this tokenizer (excluded 1: ambiguous",
             setup=lambda e: e.write("pairs.csv", PEAP_CSV_HEADER + PEAP_CSV_AMBIGUOUS)),

    # --- command-line options and parameters

    # --- outputs: checked before the compute, written atomically

    # --- the model cache
]

API_FAULTS: list[ApiFault] = [

]


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fault_dataset(tmp_path_factory, tiny_model_dirs):
    from mechscope.models import load_tokenizer
    from mechscope.tasks import make_task

    dataset = make_task("ioi", load_tokenizer(str(tiny_model_dirs["llama"])), 8, seed=0)
    dataset.model = str(tiny_model_dirs["llama"])
    return dataset.save(tmp_path_factory.mktemp("fault_data") / "ioi.jsonl")


@pytest.mark.parametrize("fault", CLI_FAULTS, ids=[f.name for f in CLI_FAULTS])
def test_cli_fault(fault, tmp_path, tiny_model_dirs, fault_dataset, monkeypatch):
    root = tmp_path / "work"
    root.mkdir()
    env = Env(root, str(tiny_model_dirs["llama"]), str(tiny_model_dirs["gpt2"]), fault_dataset)
    fault.setup(env)
    for key, value in fault.environ.items():
        monkeypatch.setenv(key, value.format(root=root))
    before = tree(root)
    result = runner.invoke(app, fault.args(env))
    output = result.output
    assert result.exit_code == fault.status, output
    assert "Traceback" not in output, output
    if fault.status == 2:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert fault.message in " ".join(output.split()), output
        assert tree(root) == before, f"left behind: {sorted(tree(root) - before)}; removed: {sorted(before - tree(root))}"
    else:
        assert fault.message in " ".join(output.split()), output
    if fault.after is not None:
        fault.after(env)


@pytest.fixture(scope="module")
def api_env(tmp_path_factory, tiny_model_dirs):
    import mechscope
    from mechscope.tasks import make_task

    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    return ApiEnv(tmp_path_factory.mktemp("api_faults"), model, make_task("ioi", model.tokenizer, 8, seed=0))


@pytest.mark.parametrize("fault", API_FAULTS, ids=[f.name for f in API_FAULTS])
def test_api_fault(fault, api_env):
    with pytest.raises(fault.error, match=re.escape(fault.message)) as info:
        fault.call(api_env)
    assert isinstance(info.value, MechscopeError)


def test_every_row_has_a_distinct_name():
    names = [f.name for f in CLI_FAULTS] + [f.name for f in API_FAULTS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert os.sep not in "".join(names)

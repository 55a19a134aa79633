"""Faults users meet, one row each: the bad input or fault, the one-line message, the exit status, and
nothing left behind.

The next fault found is one row more. A `CliFault` runs `mechscope ARGS` in-process on the tiny random
models; the test checks the exit status, that the message appears on one `error:` line with no
traceback, and that the working folder holds exactly what it held before the command (no output, no
hidden temporary). An `ApiFault` calls the library and checks the exception class and message.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from mechscope.attribution import attribute
from mechscope.attribution.scores import EdgeScores, ScoresError
from mechscope.behaviour import measure_behaviour
from mechscope.circuits.circuit import Circuit, CircuitError
from mechscope.circuits.discovery import compare_methods, prepare
from mechscope.circuits.evaluation import evaluate, faithfulness_curve
from mechscope.circuits.span_circuit import SpanCircuit, load_any_circuit
from mechscope.cli import app
from mechscope.errors import MechscopeError, NonFiniteError, ParameterError
from mechscope.graph import Graph

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


# ------------------------------------------------------------------------------------------------
# Helpers the rows share.
# ------------------------------------------------------------------------------------------------

def edit(header: dict | None = None, row: dict | None = None) -> Callable[[Env, Path], None]:
    """A `data_fault` setup: the valid dataset, written to the row's path with fields of its header
    (line 1) and / or of line 3 replaced; a callable value maps the old row to the new value."""

    def write(env: Env, path: Path) -> None:
        lines = env.dataset_lines()
        for i, changes in ((0, header), (2, row)):
            old = json.loads(lines[i])
            new = {k: v(old) if callable(v) else v for k, v in (changes or {}).items()}
            lines[i] = json.dumps({**old, **new})
        path.write_text("\n".join(lines) + "\n")

    return write


def curves(env: Env, data: str | Path, *extra: str) -> list[str]:
    """`mechscope curves --data DATA` on the tiny Llama with EAP, plus `extra` options."""
    return ["curves", "--data", str(data), "--model", env.llama, "--methods", "eap", "--out", str(env.out), *extra]


def data_fault(name: str, file: str, make: Callable[[Env, Path], object], message: str) -> CliFault:
    """A row: `mechscope curves --data FILE`, where `make(env, path)` writes the bad FILE first."""
    return CliFault(name, lambda e: curves(e, e.root / file), message, setup=lambda e: make(e, e.root / file))


TEXT_ROW = json.dumps({"clean": "When Mary and John went", "counterfactual": "When Alice and Bob went",
                       "correct": " to", "wrong": []}) + "\n"


def scores_for(e: "ApiEnv", values=None):
    """EdgeScores over the tiny Llama's graph (random ones unless `values` are given)."""
    from mechscope.attribution.scores import EdgeScores
    from mechscope.graph import Graph

    graph = Graph.from_model(e.model)
    values = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(0)) if values is None else values
    return EdgeScores(graph, values, method="eap", metric="logit_diff", ablation="counterfactual", model="",
                      n_examples=len(e.dataset))


def with_value(e: "ApiEnv", value: float):
    scores = scores_for(e)
    scores.values[3] = value
    return scores


def saved_scores(e: "ApiEnv", drop: str) -> Path:
    """A scores file whose metadata lacks field `drop`."""
    from safetensors.torch import save_file

    scores = scores_for(e)
    meta = scores.metadata()
    del meta[drop]
    path = e.root / f"no_{drop}.safetensors"
    save_file({"values": scores.values}, str(path), metadata={"mechscope": json.dumps(meta)})
    return path


def circuit_file(e: "ApiEnv", name: str, insert: bytes) -> Path:
    """A circuit file of the tiny Llama's graph with `insert` put into its JSON text (in a string)."""
    from mechscope.circuits.circuit import Circuit
    from mechscope.graph import Graph

    path = Circuit.full(Graph.from_model(e.model), method="eap").save(e.root / name)
    path.write_bytes(path.read_bytes().replace(b'"eap"', b'"ea' + insert + b'p"', 1))
    return path


def gpt2_shaped(e: "ApiEnv"):
    """The graph of a GPT-2 as large as the tiny Llama: one key-value head per head, no grouping."""
    from mechscope.graph import Graph

    return Graph(e.model.cfg.n_layers, e.model.cfg.n_heads, e.model.cfg.n_heads)


def nan_metric(logits, batch):
    return logits[:, 0] * float("nan")


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
    data_fault("dataset: UTF-16", "u16.jsonl", lambda e, p: p.write_text(e.dataset.read_text(), encoding="utf-16"),
               "u16.jsonl: UTF-16 or binary data, not UTF-8 text"),
    data_fault("dataset: not UTF-8", "latin1.jsonl",
               lambda e, p: p.write_bytes(e.dataset.read_bytes().replace(b'"clean_text": "', b'"clean_text": "\xe9', 1)),
               "latin1.jsonl, line 2: not UTF-8 text (byte 0xe9"),
    data_fault("dataset: a directory", "folder", lambda e, p: p.mkdir(), "folder: is a directory, not a dataset file"),
    CliFault("text JSONL: UTF-16 (data)",
             lambda e: ["data", "--from-jsonl", str(e.root / "t16.jsonl"), "--model", e.llama, "--out", str(e.out)],
             "t16.jsonl: UTF-16 or binary data, not UTF-8 text",
             setup=lambda e: e.write("t16.jsonl", TEXT_ROW.encode("utf-16"))),
    data_fault("text JSONL: not UTF-8 (curves)", "t.jsonl",
               lambda e, p: p.write_bytes(TEXT_ROW.encode() + TEXT_ROW.replace("Mary", "Mar\xeda").encode("latin-1")),
               "t.jsonl, line 2: not UTF-8 text"),
    data_fault("dataset header: info not an object", "h.jsonl", edit(header={"info": "x"}),
               "h.jsonl, line 1: field 'info' must be a JSON object, not \"x\""),
    data_fault("dataset header: pad_token_id a string", "h.jsonl", edit(header={"pad_token_id": "x"}),
               "h.jsonl, line 1: field 'pad_token_id' must be a non-negative integer, not \"x\""),
    data_fault("dataset header: pad_token_id null", "h.jsonl", edit(header={"pad_token_id": None}),
               "h.jsonl, line 1: field 'pad_token_id' must be a non-negative integer, not null"),
    data_fault("dataset header: pad_token_id outside the vocabulary", "h.jsonl", edit(header={"pad_token_id": 100000}),
               "h.jsonl: pad_token_id 100000 >= the model's vocabulary size"),
    data_fault("dataset header: schema a number", "h.jsonl", edit(header={"schema": 5}),
               "h.jsonl, line 1: field 'schema' must be a list of span names, not 5"),
    data_fault("dataset header: schema a string", "h.jsonl", edit(header={"schema": "abc"}),
               "h.jsonl, line 1: field 'schema' must be a list of span names, not \"abc\""),
    data_fault("dataset header: task a number", "h.jsonl", edit(header={"task": 5}),
               "h.jsonl, line 1: field 'task' must be a string, not 5"),
    data_fault("dataset row: meta not an object", "r.jsonl", edit(row={"meta": "abc"}),
               "r.jsonl, line 3: field 'meta' must be a JSON object, not \"abc\""),
    data_fault("dataset row: negative token id", "r.jsonl", edit(row={"clean": lambda r: [-1] + r["clean"][1:]}),
               "r.jsonl, line 3: field 'clean': negative token id -1"),
    data_fault("dataset row: negative answer id", "r.jsonl", edit(row={"correct": [-3]}),
               "r.jsonl, line 3: field 'correct': negative token id -3"),
    data_fault("dataset row: answer outside the vocabulary", "r.jsonl", edit(row={"correct": [100000]}),
               "r.jsonl, line 3: field 'correct': token id 100000 >= the model's vocabulary size"),
    data_fault("dataset row: longer than the context", "r.jsonl", edit(row={"clean": [5] * 1600,
                                                                             "counterfactual": [5] * 1600}),
               "r.jsonl, line 3: field 'clean': 1600 tokens is longer than the model's context (128)"),

    # --- command-line options and parameters
    CliFault("curves: --steps 0", lambda e: curves(e, e.dataset, "--methods", "eap-ig", "--steps", "0"),
             "steps must be at least 1, got 0"),
    CliFault("curves: --steps -1", lambda e: curves(e, e.dataset, "--methods", "eap-ig", "--steps", "-1"),
             "steps must be at least 1, got -1"),
    CliFault("curves: --batch-size 0", lambda e: curves(e, e.dataset, "--batch-size", "0"),
             "batch_size must be at least 1, got 0"),
    CliFault("curves: --fractions 2", lambda e: curves(e, e.dataset, "--fractions", "2"),
             "--fractions must be increasing numbers in (0, 1]"),
    CliFault("curves: --n 0",
             lambda e: ["curves", "--task", "ioi", "--n", "0", "--model", e.llama, "--out", str(e.out)],
             "--n must be at least 2 (a discovery and an evaluation half), got 0"),
    CliFault("data: --n 0", lambda e: ["data", "ioi", "--n", "0", "--model", e.llama, "--out", str(e.out)],
             "--n must be at least 1, got 0"),
    CliFault("circuit: --n 1",
             lambda e: ["circuit", "--data", str(e.dataset), "--n", "1", "--model", e.llama, "--out", str(e.out)],
             "--n must be at least 2"),
    CliFault("circuit: --batch-size 0",
             lambda e: ["circuit", "--data", str(e.dataset), "--model", e.llama, "--batch-size", "0", "--out",
                        str(e.out)],
             "batch_size must be at least 1, got 0"),
    # --- outputs: checked before the compute, written atomically

    # --- the model cache
]

API_FAULTS: list[ApiFault] = [
    # --- parameters
    ApiFault("attribute: steps=0", lambda e: attribute(e.model, e.dataset, "eap-ig", steps=0, progress=False),
             ParameterError, "steps must be at least 1, got 0"),
    ApiFault("attribute: steps=-1", lambda e: attribute(e.model, e.dataset, "eap-ig", steps=-1, progress=False),
             ParameterError, "steps must be at least 1, got -1"),
    ApiFault("attribute: unknown method (still a ValueError)",
             lambda e: attribute(e.model, e.dataset, "acdc", progress=False),
             ValueError, "unknown method 'acdc'; choose one of eap, eap-ig, exact, peap"),
    ApiFault("attribute: exact edges out of range",
             lambda e: attribute(e.model, e.dataset, "exact", edges=[10**6], progress=False),
             ParameterError, "edges must be indices in [0, "),
    ApiFault("attribute: batch_size=0", lambda e: attribute(e.model, e.dataset, "eap", batch_size=0, progress=False),
             MechscopeError, "batch_size must be at least 1, got 0"),
    ApiFault("dataset.split(1.5)", lambda e: e.dataset.split(1.5),
             ParameterError, "split: fraction must be a number from 0 to 1, got 1.5"),
    ApiFault("dataset.split(-0.5)", lambda e: e.dataset.split(-0.5),
             ParameterError, "split: fraction must be a number from 0 to 1, got -0.5"),
    ApiFault("dataset.batches(0)", lambda e: list(e.dataset.batches(0)),
             ParameterError, "batch_size must be at least 1, got 0"),
    ApiFault("faithfulness_curve: fractions=[2]",
             lambda e: faithfulness_curve(e.model, scores_for(e), e.dataset, fractions=[2], progress=False),
             ParameterError, "fractions must be increasing numbers in (0, 1], got [2]"),
    ApiFault("faithfulness_curve: fractions not increasing",
             lambda e: faithfulness_curve(e.model, scores_for(e), e.dataset, fractions=[0.5, 0.1], progress=False),
             ParameterError, "fractions must be increasing numbers in (0, 1]"),
    ApiFault("compare_methods: fractions=[2]",
             lambda e: compare_methods(e.model, e.dataset, ["eap"], fractions=[2], progress=False),
             ParameterError, "fractions must be increasing numbers in (0, 1], got [2]"),
    ApiFault("compare_methods: steps=0",
             lambda e: compare_methods(e.model, e.dataset, ["eap-ig"], steps=0, progress=False),
             ParameterError, "steps must be at least 1, got 0"),
    ApiFault("prepare: discovery_fraction=1",
             lambda e: prepare(e.model, e.dataset, discovery_fraction=1.0, progress=False),
             ParameterError, "discovery_fraction must be a number between 0 and 1"),
    ApiFault("evaluate: batch_size=0",
             lambda e: evaluate(e.model, Circuit.full(Graph.from_model(e.model)), e.dataset, batch_size=0,
                                progress=False),
             MechscopeError, "batch_size must be at least 1, got 0"),
    ApiFault("evaluate: a GPT-2-shaped circuit on a Llama",
             lambda e: evaluate(e.model, Circuit.full(gpt2_shaped(e), model="tiny-gpt2"), e.dataset, progress=False),
             CircuitError,
             "circuit was built for a model of another shape ('tiny-gpt2'): key-value heads per layer 4 vs 2"),

    # --- non-finite scores and metrics
    ApiFault("faithfulness_curve: NaN scores",
             lambda e: faithfulness_curve(e.model, with_value(e, float("nan")), e.dataset, fractions=[0.5, 1],
                                          progress=False),
             NonFiniteError, "eap scores selecting the circuits: 1 of"),
    ApiFault("faithfulness_curve: infinite scores",
             lambda e: faithfulness_curve(e.model, with_value(e, float("inf")), e.dataset, fractions=[0.5, 1],
                                          progress=False),
             NonFiniteError, "values are infinite"),
    ApiFault("attribute: a NaN metric",
             lambda e: attribute(e.model, e.dataset, "eap", metric=nan_metric, progress=False),
             NonFiniteError, "eap scores on 8 examples"),
    ApiFault("evaluate: a NaN metric",
             lambda e: evaluate(e.model, Circuit.full(Graph.from_model(e.model)), e.dataset, metric=nan_metric,
                                progress=False),
             NonFiniteError, "dataset: example 0: the metric 'nan_metric' on the clean run is nan"),
    ApiFault("measure_behaviour: a NaN metric",
             lambda e: measure_behaviour(e.model, e.dataset, metric=nan_metric, progress=False),
             NonFiniteError, "the metric 'nan_metric' on the clean run is nan"),

    # --- circuit and scores files (no command reads them; the library does)
    ApiFault("Circuit.load: not UTF-8", lambda e: Circuit.load(circuit_file(e, "latin1.json", b"\xe9")),
             CircuitError, "latin1.json, line 4: not UTF-8 text (byte 0xe9 at column 15)"),
    ApiFault("load_any_circuit: not UTF-8", lambda e: load_any_circuit(circuit_file(e, "latin1.json", b"\xe9")),
             CircuitError, "latin1.json, line 4: not UTF-8 text"),
    ApiFault("Circuit.load: a directory", lambda e: Circuit.load(e.root),
             CircuitError, "is a directory, not a circuit file"),
    ApiFault("load_any_circuit: a directory", lambda e: load_any_circuit(e.root),
             CircuitError, "is a directory, not a circuit file"),
    ApiFault("SpanCircuit.load: a directory", lambda e: SpanCircuit.load(e.root),
             CircuitError, "is a directory, not a span circuit file"),
    ApiFault("EdgeScores.load: no graph", lambda e: EdgeScores.load(saved_scores(e, "graph")),
             ScoresError, "no_graph.safetensors: metadata is missing field 'graph'"),
    ApiFault("EdgeScores.load: no method", lambda e: EdgeScores.load(saved_scores(e, "method")),
             ScoresError, "no_method.safetensors: metadata is missing field 'method'"),
    ApiFault("EdgeScores.load: a directory", lambda e: EdgeScores.load(e.root),
             ScoresError, "is a directory, not a scores file"),
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

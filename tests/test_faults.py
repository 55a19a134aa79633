"""Faults users meet, one row each: the bad input or fault, the one-line message, the exit status, and
nothing left behind.

The next fault found is one row more. A `CliFault` runs `mechscope ARGS` in-process on the tiny random
models; the test checks the exit status, that the message appears on one `error:` line with no
traceback, and that the working folder holds exactly what it held before the command (no output, no
hidden temporary). An `ApiFault` calls the library and checks the exception class and message.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from test_fileio import dead_pid
from tiny import save_llama_gguf
from typer.testing import CliRunner

from mechscope.attribution import attribute
from mechscope.attribution.scores import EdgeScores, ScoresError
from mechscope.behaviour import measure_behaviour
from mechscope.circuits.acdc import acdc
from mechscope.circuits.circuit import Circuit, CircuitError
from mechscope.circuits.discovery import compare_methods, prepare
from mechscope.circuits.evaluation import evaluate, faithfulness_curve
from mechscope.circuits.span_circuit import SpanCircuit, load_any_circuit
from mechscope.cli import Terminated, app
from mechscope.errors import MechscopeError, NonFiniteError, ParameterError
from mechscope.graph import Graph, GraphError

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
    inject: Callable[[pytest.MonkeyPatch], object] | None = None  # a fault injected in-process (a full disk)


@dataclass(frozen=True)
class ApiFault:
    name: str
    call: Callable[["ApiEnv"], object]
    error: type[Exception]
    message: str


def without_head_split(env: "ApiEnv", call: Callable[[], object]):
    """`call()` with the model refusing per-head attention inputs, as a bridge whose attention has no
    fork point does (TransformerBridge raises NotImplementedError there); model work fails the row."""
    def refuse(on):
        raise NotImplementedError("use_split_qkv_input: no attention layer of this bridge supports it")

    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran before the check")

    env.model.set_use_split_qkv_input = refuse
    env.model.forward = no_model_work
    try:
        return call()
    finally:
        del env.model.set_use_split_qkv_input, env.model.forward


@dataclass
class ApiEnv:
    root: Path
    model: object  # the tiny Llama bridge
    dataset: object  # a small IOI dataset for it


def no_model(mp: pytest.MonkeyPatch) -> None:
    """Fail the row if the command loads a model (its checks must come first)."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model loaded before the check")
    mp.setattr("mechscope.models.load_model", load_model)


def no_compile(mp: pytest.MonkeyPatch) -> None:
    """Fail the row if the tracr benchmark compiles a program (its checks must come first)."""
    def compile_program(*args, **kwargs):
        raise AssertionError("a program compiled before the check")
    mp.setattr("mechscope.toys.tracr.benchmark.compile_program", compile_program)


def other_lens(path: Path) -> None:
    """A tuned lens directory for a model of another shape (d_model 32, 3 layers)."""
    from mechscope.lens import TunedLens

    TunedLens(32, 3, {"model": "elsewhere"}).save(path)


def user_programs(e: Env) -> None:
    """A module of user programs for the tracr benchmark, each wrong in one way."""
    e.write("mine.py", "from mechscope.toys.tracr import ProgramSpec\n"
                              "def number():\n    return 3\n"
                              "def one_value():\n    return ProgramSpec(lambda: None, ('a',), 3)\n"
                              "def short():\n    return ProgramSpec(lambda: None, ('a', 'b'), 1)\n"
                              "def not_rasp():\n    return ProgramSpec(lambda: 'tokens', ('a', 'b'), 3)\n"
                              "def fails():\n    raise RuntimeError('no spec today')\n"
                              "value = 5\n")


def user_program(function: str) -> Callable[[Env], list[str]]:
    return lambda e: ["benchmark", "tracr", "--program", f"{e.root / 'mine.py'}:{function}", "--out", str(e.out)]


def full_disk(mp: pytest.MonkeyPatch) -> None:
    """Every output flushed to the disk fails as a full disk does."""
    def sync_file(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    mp.setattr("mechscope.fileio.sync_file", sync_file)


def interrupt(kind: type[BaseException]) -> Callable:
    def stop(*args, **kwargs):
        raise kind()
    return stop


def plant_stale_temporaries(env: Env) -> None:
    """A temporary of --out left by a killed run (its process is gone), and one of a live run."""
    from mechscope.fileio import temporary_prefix

    env.write(f"{temporary_prefix(env.out, pid=dead_pid())}dead_012.tmp", "half")
    env.write(f"{temporary_prefix(env.out)}live_012.tmp", "half")


def only_the_live_temporary_is_left(env: Env) -> None:
    from mechscope.fileio import temporary_prefix

    assert sorted(p.name for p in env.root.iterdir()) == sorted(
        ["out", f"{temporary_prefix(env.out)}live_012.tmp"])


def tree(root: Path) -> set[str]:
    """Every file and folder under root, hidden ones included, as relative paths."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# The model cache rows convert the tiny Llama, written as a GGUF file, into a cache under the scratch
# folder, damage the entry, and run `mechscope demo` on it.
CACHE = {"MECHSCOPE_CACHE": "{root}/cache"}


def demo_tiny_gguf(e: Env) -> list[str]:
    return ["demo", "--model", str(e.root / "tiny.gguf"), "--device", "cpu"]


def cached_tiny_gguf(e: Env, damage: Callable[[Path], object]) -> None:
    from mechscope.models import resolve_spec

    _, entry = resolve_spec(str(save_llama_gguf(e.root / "tiny.gguf", Path(e.llama))))
    damage(Path(entry))


def flip_weights(entry: Path) -> None:
    """Overwrite 64 KiB in the middle of the weights with their complement."""
    path = entry / "model.safetensors"
    middle = path.stat().st_size // 2
    with path.open("r+b") as f:
        f.seek(middle)
        chunk = f.read(1 << 16)
        f.seek(middle)
        f.write(bytes(255 - b for b in chunk))


def leftover_of_a_dead_conversion(e: Env) -> None:
    """The temporary a conversion leaves when it is killed with SIGKILL: named by its process, which
    has ended."""
    from mechscope import model_cache

    save_llama_gguf(e.root / "tiny.gguf", Path(e.llama))
    child = subprocess.Popen(["true"])
    child.wait()
    name = model_cache.temp_name("tiny-0123").replace(f"@{os.getpid()}@", f"@{child.pid}@")
    e.write(f"cache/models/{name}/model.safetensors", bytes(1 << 20))


def cache_healed(e: Env) -> None:
    """The entry is whole (every file matches its manifest), nothing temporary is left beside it, and
    a second run uses it as it is."""
    from mechscope.model_cache import entry_problem

    models = e.root / "cache" / "models"
    entries = [p for p in models.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entry_problem(entries[0]) is None
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []
    again = runner.invoke(app, demo_tiny_gguf(e))
    assert again.exit_code == 0 and "mechscope:" not in again.output, again.output


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


def bad_query_scores(e: "ApiEnv") -> Path:
    """A peap scores file whose crossing_q is neither per-key (k's shape) nor whole-row."""
    from safetensors.torch import save_file

    scores = attribute(e.model, e.dataset, "peap", batch_size=4, progress=False)
    tensors = {"values": scores.values, **{f"crossing_{k}": v.contiguous() for k, v in scores.crossing.items()}}
    tensors["crossing_q"] = tensors["crossing_q"][..., :-1].contiguous()
    path = e.root / "bad_q.safetensors"
    save_file(tensors, str(path), metadata={"mechscope": json.dumps(scores.metadata())})
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


def figure_inputs(e: Env) -> None:
    """c.json: the full circuit of Graph(2, 4, 2); s3.safetensors: scores of Graph(3, 4, 2)."""
    Circuit.full(Graph(2, 4, 2), method="eap").save(e.root / "c.json")
    g3 = Graph(3, 4, 2)
    EdgeScores(g3, torch.zeros(g3.n_edges), method="eap", metric="logit_diff", ablation="counterfactual",
               model="", n_examples=1).save(e.root / "s3.safetensors")


def nan_metric(logits, batch):
    return logits[:, 0] * float("nan")


def acdc_args(env: Env, *extra: str) -> list[str]:
    """`mechscope acdc --data DATASET` on the tiny Llama (4 examples), plus `extra` options."""
    return ["acdc", "--data", str(env.dataset), "--model", env.llama, "--n", "4", "--out", str(env.out), *extra]


def export_files(e: Env) -> None:
    """circuit.json (a non-positional circuit of a 2-layer graph), span.json (a span circuit over spans
    a, b) and other.safetensors (scores of a 1-layer graph)."""
    graph = Graph(2, 4, 2)
    Circuit.full(graph, method="eap").save(e.root / "circuit.json")
    SpanCircuit.full(graph, ["a", "b"], method="peap").save(e.root / "span.json")
    other = Graph(1, 4, 2)
    EdgeScores(other, torch.zeros(other.n_edges), "eap", "logit_diff", "counterfactual", "tiny", 1).save(
        e.root / "other.safetensors")


def export_args(e: Env, name: str, to: str, *extra: str) -> list[str]:
    return ["export", str(e.root / name), "--to", to, "--out", str(e.out), *extra]


def other_tokenizer(e: "ApiEnv"):
    """The API dataset, marked as tokenized by another tokenizer."""
    dataset = e.dataset.subset(range(len(e.dataset)))
    dataset.tokenizer = "another"
    return dataset


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
    CliFault("patch sweep: unknown component", lambda e: ["patch", "sweep", "--data", str(e.dataset), "--model", e.llama,
                                                          "--component", "zz", "--out", str(e.out)],
             "unknown component 'zz'; choose one of resid_pre, resid_post, attn_out, mlp_out, z, z_pos"),
    CliFault("patch sweep: layer out of range", lambda e: ["patch", "sweep", "--data", str(e.dataset), "--model",
                                                           e.llama, "--layers", "7", "--out", str(e.out)],
             "layer 7 is out of range: the model has layers 0..1"),
    CliFault("patch sweep: resample without partners", lambda e: ["patch", "sweep", "--data", str(e.dataset), "--model",
                                                                  e.llama, "--reference", "resample", "--n", "1",
                                                                  "--out", str(e.out)],
             "resample: example 0 (length 30) has no other example of the same length"),

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


    CliFault("csv: an ambiguous row is left out and counted", peap_csv_args,
             "excluded 1: ambiguous: the spans fit equally well in more than one place (1)",
             setup=lambda e: e.write("pairs.csv", PEAP_CSV_HEADER + PEAP_CSV_GOOD + PEAP_CSV_AMBIGUOUS),
             status=0),
    CliFault("csv: no row left", peap_csv_args,
             "no row could be converted for this tokenizer (excluded 1: ambiguous",
             setup=lambda e: e.write("pairs.csv", PEAP_CSV_HEADER + PEAP_CSV_AMBIGUOUS)),

    # --- command-line options and parameters
    # (choices; each row forbids the model to load, so a check made only after it fails the row)
    CliFault("curves: unknown method", lambda e: ["curves", "--data", str(e.dataset), "--model", e.llama,
                                                  "--methods", "eap,magic", "--out", str(e.out)],
             "unknown method in --methods 'eap,magic'; choose from eap, eap-ig, exact, peap", inject=no_model),
    CliFault("curves: empty methods", lambda e: ["curves", "--data", str(e.dataset), "--model", e.llama,
                                                 "--methods", " , ", "--out", str(e.out)],
             "unknown method in --methods", inject=no_model),
    CliFault("curves: unknown selection", lambda e: ["curves", "--task", "ioi", "--model", e.llama,
                                                     "--selection", "best", "--out", str(e.out)],
             "unknown selection 'best'; choose top_n or greedy", inject=no_model),
    CliFault("curves: unknown ablation", lambda e: ["curves", "--task", "ioi", "--model", e.llama,
                                                    "--ablation", "resample", "--out", str(e.out)],
             "unknown ablation 'resample'; choose one of counterfactual, mean, zero", inject=no_model),
    CliFault("curves: unknown task", lambda e: ["curves", "--task", "sudoku", "--model", e.llama, "--out", str(e.out)],
             "unknown task 'sudoku'", inject=no_model),
    CliFault("data: unknown task before the model", lambda e: ["data", "sudoku", "--model", e.llama,
                                                               "--out", str(e.out)],
             "unknown task 'sudoku'", inject=no_model),
    CliFault("data: unknown metric", lambda e: ["data", "--from-jsonl", str(e.dataset), "--metric", "bleu",
                                                "--model", e.llama, "--out", str(e.out)],
             "unknown metric 'bleu'", inject=no_model),
    CliFault("circuit: unknown selection", lambda e: ["circuit", "--task", "ioi", "--model", e.llama,
                                                      "--selection", "best", "--out", str(e.out)],
             "unknown selection 'best'; choose greedy or top_n", inject=no_model),
    CliFault("schema: unknown method", lambda e: ["schema", str(e.dataset), "--model", e.llama, "--method", "gpt",
                                                  "--out", str(e.out)],
             "unknown method 'gpt'; choose induce or llm", inject=no_model),
    CliFault("schema: unknown saliency", lambda e: ["schema", str(e.dataset), "--model", e.llama,
                                                    "--saliency", "lime", "--out", str(e.out)],
             "unknown saliency 'lime'", inject=no_model),
    CliFault("benchmark tracr: unknown program", lambda e: ["benchmark", "tracr", "--programs", "reverse,fly",
                                                            "--out", str(e.out)],
             "unknown program(s) fly"),
    CliFault("benchmark tracr: unknown method", lambda e: ["benchmark", "tracr", "--methods", "eap,magic",
                                                           "--out", str(e.out)],
             "unknown method in eap, magic"),
    CliFault("benchmark tracr: --program without a function",
             lambda e: ["benchmark", "tracr", "--program", "my_programs", "--out", str(e.out)],
             "--program my_programs: expected module:function or path/to/file.py:function", inject=no_compile),
    CliFault("benchmark tracr: --program of a missing module",
             lambda e: ["benchmark", "tracr", "--program", "no_such_module_q:spec", "--out", str(e.out)],
             "cannot import module no_such_module_q: ModuleNotFoundError", inject=no_compile),
    CliFault("benchmark tracr: --program of a missing file",
             lambda e: ["benchmark", "tracr", "--program", f"{e.root}/nope.py:spec", "--out", str(e.out)],
             "nope.py:spec: no file", inject=no_compile),
    CliFault("benchmark tracr: --program of a missing function", user_program("spec"),
             "mine.py has no attribute 'spec'", setup=user_programs, inject=no_compile),
    CliFault("benchmark tracr: --program of a value, not a function", user_program("value"),
             "mine.py:value: value is an object of type int, not a function", setup=user_programs, inject=no_compile),
    CliFault("benchmark tracr: --program function raises", user_program("fails"),
             "fails() raised RuntimeError: no spec today", setup=user_programs, inject=no_compile),
    CliFault("benchmark tracr: --program returns no ProgramSpec", user_program("number"),
             "number() returned an object of type int, not a mechscope.toys.tracr.ProgramSpec",
             setup=user_programs, inject=no_compile),
    CliFault("benchmark tracr: --program vocabulary of one value", user_program("one_value"),
             "vocab needs at least two values, got ['a']", setup=user_programs, inject=no_compile),
    CliFault("benchmark tracr: --program max_seq_len 1", user_program("short"),
             "max_seq_len must be an integer of at least 2, got 1", setup=user_programs, inject=no_compile),
    CliFault("benchmark tracr: --program build gives no RASP", user_program("not_rasp"),
             "build() returned an object of type str, not a RASP SOp", setup=user_programs, inject=no_compile),

    CliFault("curves: --steps 0", lambda e: curves(e, e.dataset, "--methods", "eap-ig", "--steps", "0"),
             "steps must be at least 1, got 0", inject=no_model),
    CliFault("curves: --steps -1", lambda e: curves(e, e.dataset, "--methods", "eap-ig", "--steps", "-1"),
             "steps must be at least 1, got -1", inject=no_model),
    CliFault("curves: --batch-size 0", lambda e: curves(e, e.dataset, "--batch-size", "0"),
             "batch_size must be at least 1, got 0", inject=no_model),
    CliFault("curves: --fractions 2", lambda e: curves(e, e.dataset, "--fractions", "2"),
             "--fractions must be increasing numbers in (0, 1]", inject=no_model),
    CliFault("curves: --fractions repeated", lambda e: curves(e, e.dataset, "--fractions", "0.1,0.1"),
             "--fractions must be increasing numbers in (0, 1]", inject=no_model),
    CliFault("curves: --query-edges unknown", lambda e: curves(e, e.dataset, "--query-edges", "rows"),
             "unknown query_edges 'rows'; choose one of per_key, whole_row", inject=no_model),
    CliFault("circuit: --query-edges unknown",
             lambda e: ["circuit", "--data", str(e.dataset), "--model", e.llama, "--query-edges", "rows", "--out",
                        str(e.out)],
             "unknown query_edges 'rows'; choose one of per_key, whole_row", inject=no_model),
    CliFault("curves: --n 0",
             lambda e: ["curves", "--task", "ioi", "--n", "0", "--model", e.llama, "--out", str(e.out)],
             "--n must be at least 2 (a discovery and an evaluation half), got 0", inject=no_model),
    CliFault("data: --n 0", lambda e: ["data", "ioi", "--n", "0", "--model", e.llama, "--out", str(e.out)],
             "--n must be at least 1, got 0", inject=no_model),
    CliFault("circuit: --n 1",
             lambda e: ["circuit", "--data", str(e.dataset), "--n", "1", "--model", e.llama, "--out", str(e.out)],
             "--n must be at least 2", inject=no_model),
    CliFault("circuit: --batch-size 0",
             lambda e: ["circuit", "--data", str(e.dataset), "--model", e.llama, "--batch-size", "0", "--out",
                        str(e.out)],
             "batch_size must be at least 1, got 0", inject=no_model),
    CliFault("acdc: --tau -1", lambda e: acdc_args(e, "--tau", "-1"), "tau must be a finite number >= 0, got -1.0",
             inject=no_model),
    CliFault("acdc: --tau nan", lambda e: acdc_args(e, "--tau", "nan"), "tau must be a finite number >= 0, got nan",
             inject=no_model),
    CliFault("acdc: --taus empty", lambda e: acdc_args(e, "--taus", ","),
             "the tau sweep is empty; give at least one threshold", inject=no_model),
    CliFault("acdc: --taus not numbers", lambda e: acdc_args(e, "--taus", "0.1,x"),
             "--taus must be comma-separated numbers, got '0.1,x'", inject=no_model),
    CliFault("acdc: --tau and --taus", lambda e: acdc_args(e, "--tau", "0.1", "--taus", "0.1,1"),
             "give one of --tau or --taus", inject=no_model),
    CliFault("acdc: unknown metric", lambda e: acdc_args(e, "--tau", "0.1", "--metric", "bleu"),
             "unknown ACDC metric 'bleu'; choose kl (KL divergence to the model), task", inject=no_model),
    CliFault("acdc: unknown ablation", lambda e: acdc_args(e, "--tau", "0.1", "--ablation", "resample"),
             "unknown ablation 'resample'; choose one of counterfactual, mean, zero", inject=no_model),
    CliFault("acdc: --last-layers more than the model's", lambda e: acdc_args(e, "--tau", "0.1", "--last-layers", "9"),
             "last layers: 9 is more than the model's 2 layers"),
    # --- outputs: checked before the compute, written atomically
    # (the checks come before the model loads: those rows forbid it)
    CliFault("data: --out under a file", lambda e: ["data", "ioi", "--model", e.llama, "--out",
                                                    str(e.root / "notes.txt" / "ioi.jsonl")],
             "ioi.jsonl: cannot write there (", setup=lambda e: e.write("notes.txt", "mine"), inject=no_model),
    CliFault("curves: --out under a file", lambda e: ["curves", "--data", str(e.dataset), "--model", e.llama,
                                                      "--out", str(e.root / "notes.txt" / "deeper" / "c.json")],
             "notes.txt is not a directory", setup=lambda e: e.write("notes.txt", "mine"), inject=no_model),
    CliFault("curves: --out is a directory", lambda e: ["curves", "--data", str(e.dataset), "--model", e.llama,
                                                        "--out", str(e.root)],
             "is a directory; give a file name", inject=no_model),
    CliFault("schema: --out under a file", lambda e: ["schema", str(e.dataset), "--model", e.llama,
                                                      "--out", str(e.root / "notes.txt" / "s.jsonl")],
             "notes.txt is not a directory", setup=lambda e: e.write("notes.txt", "mine"), inject=no_model),
    CliFault("circuit: --out under a file", lambda e: ["circuit", "--data", str(e.dataset), "--model", e.llama,
                                                       "--out", str(e.root / "notes.txt" / "report")],
             "notes.txt is not a directory", setup=lambda e: e.write("notes.txt", "mine"), inject=no_model),
    CliFault("data: disk full while writing", lambda e: ["data", "ioi", "--model", e.llama, "--n", "6",
                                                         "--out", str(e.out)],
             f"{os.sep}out: cannot write there (no space left on device)", inject=full_disk),
    CliFault("curves: disk full while writing", lambda e: ["curves", "--task", "ioi", "--n", "24", "--model", e.llama,
                                                           "--methods", "eap", "--out", str(e.out)],
             f"{os.sep}out: cannot write there (no space left on device)", inject=full_disk),
    CliFault("circuit: disk full while writing the report", lambda e: [
        "circuit", "--task", "ioi", "--n", "32", "--seed", "1", "--model", e.llama, "--method", "eap",
        "--out", str(e.out)],
             f"{os.sep}out: cannot write there (no space left on device)", inject=full_disk),
    CliFault("circuit: Ctrl-C while writing the report", lambda e: [
        "circuit", "--task", "ioi", "--n", "32", "--seed", "1", "--model", e.llama, "--method", "eap",
        "--out", str(e.out)],
             "interrupted by SIGINT; unfinished outputs were removed", status=130,
             inject=lambda mp: mp.setattr("mechscope.report.figures.curves_png", interrupt(KeyboardInterrupt))),
    CliFault("data: SIGTERM while measuring the behaviour", lambda e: ["data", "ioi", "--model", e.llama,
                                                                        "--n", "6", "--out", str(e.out)],
             "interrupted by SIGTERM", status=143,
             inject=lambda mp: mp.setattr("mechscope.behaviour.measure_behaviour", interrupt(Terminated))),
    CliFault("data: a dead run's temporary is removed", lambda e: ["data", "ioi", "--model", e.llama, "--n", "6",
                                                                   "--out", str(e.out)],
             "wrote 6 examples", status=0, setup=plant_stale_temporaries, after=only_the_live_temporary_is_left),

    CliFault("acdc: --out not empty", lambda e: acdc_args(e, "--tau", "0.1"), "exists and is not an empty directory",
             setup=lambda e: e.write("out/old.txt", "x"), inject=no_model),
    CliFault("acdc: disk full while writing", lambda e: acdc_args(e, "--tau", "0.1", "--last-layers", "0"),
             "cannot write there (no space left on device)", inject=full_disk),
    CliFault("acdc: Ctrl-C while pruning", lambda e: acdc_args(e, "--taus", "0.1,1", "--last-layers", "0"),
             "interrupted by SIGINT; unfinished outputs were removed", status=130,
             inject=lambda mp: mp.setattr("mechscope.circuits.acdc._prune", interrupt(KeyboardInterrupt))),
    # --- the model cache
    CliFault("cache: weights overwritten with flipped bytes", demo_tiny_gguf,
             "the bytes of model.safetensors differ from those recorded when it was written; rebuilding it",
             setup=lambda e: cached_tiny_gguf(e, flip_weights), status=0, environ=CACHE, after=cache_healed),
    CliFault("cache: weights truncated", demo_tiny_gguf,
             "cannot be used: model.safetensors has 4,096 bytes, not the",
             setup=lambda e: cached_tiny_gguf(e, lambda entry: os.truncate(entry / "model.safetensors", 4096)),
             status=0, environ=CACHE, after=cache_healed),
    CliFault("cache: entry without its manifest", demo_tiny_gguf,
             "cannot be used: it has no mechscope.json; rebuilding it",
             setup=lambda e: cached_tiny_gguf(e, lambda entry: (entry / "mechscope.json").unlink()),
             status=0, environ=CACHE, after=cache_healed),
    CliFault("cache: entry of an older mechscope", demo_tiny_gguf,
             "it was written by an older mechscope and records no file hashes; rebuilding it",
             setup=lambda e: cached_tiny_gguf(e, lambda entry: (entry / "mechscope.json").write_text('{"format": 1}')),
             status=0, environ=CACHE, after=cache_healed),
    CliFault("cache: temporary of a conversion killed outright", demo_tiny_gguf,
             "(1.0 MB), left by a model conversion that did not finish",
             setup=leftover_of_a_dead_conversion, status=0, environ=CACHE, after=cache_healed),
    CliFault("cache: a file where the cache folder should be", demo_tiny_gguf,
             "models (Not a directory); set MECHSCOPE_CACHE to a writable folder",
             setup=lambda e: (e.write("cache", ""), save_llama_gguf(e.root / "tiny.gguf", Path(e.llama))),
             environ=CACHE),
    # --- export: checked before anything is written
    CliFault("export: unknown --to", lambda e: export_args(e, "circuit.json", "png"),
             "unknown export format 'png'; choose one of eapig, dot, graphml, csv", setup=export_files),
    CliFault("export: a span circuit to eapig", lambda e: export_args(e, "span.json", "eapig"),
             "EAP-IG graphs have no positions: a span circuit (spans ['a', 'b']) cannot be written as EAP-IG JSON",
             setup=export_files),
    CliFault("export: missing circuit file", lambda e: export_args(e, "nope.json", "csv"),
             "nope.json: no such circuit file"),
    CliFault("export: scores of another graph", lambda e: export_args(e, "circuit.json", "dot", "--scores",
                                                                      str(e.root / "other.safetensors")),
             "scores of another graph (layers 1 vs 2", setup=export_files),

    # --- mechscope figure (a circuit of Graph(2, 4, 2) in the scratch folder)
    CliFault("figure: an unknown suffix",
             lambda e: ["figure", str(e.root / "c.json"), "--out", str(e.root / "fig.jpg")],
             "fig.jpg: a figure is written as SVG, PDF or PNG; give a path ending in .svg, .pdf, .png (not '.jpg')",
             setup=lambda e: figure_inputs(e)),
    CliFault("figure: no circuit file", lambda e: ["figure", str(e.root / "none.json"), "--out", str(e.root / "f.svg")],
             "none.json: no such circuit file"),
    CliFault("figure: scores of another graph",
             lambda e: ["figure", str(e.root / "c.json"), "--scores", str(e.root / "s3.safetensors"),
                        "--out", str(e.root / "f.svg")],
             "the scores are for another graph than the circuit's (layers 3 vs 2; scores first)",
             setup=lambda e: figure_inputs(e)),
    CliFault("figure: --max-edges 0",
             lambda e: ["figure", str(e.root / "c.json"), "--max-edges", "0", "--out", str(e.root / "f.png")],
             "--max-edges must be at least 1, got 0", setup=lambda e: figure_inputs(e)),
    # --- mechscope lens (every check before the model loads)
    CliFault("lens train: an empty text file",
             lambda e: ["lens", "train", "--model", e.llama, "--text", str(e.root / "empty.txt"),
                        "--out", str(e.root / "l")],
             "empty.txt: holds no text", inject=no_model, setup=lambda e: e.write("empty.txt", " \n")),
    CliFault("lens train: text shorter than one sequence",
             lambda e: ["lens", "train", "--model", e.llama, "--text", str(e.root / "short.txt"),
                        "--out", str(e.root / "l")],
             "short.txt: too short:", inject=no_model, setup=lambda e: e.write("short.txt", "Mary and John")),
    CliFault("lens train: a JSONL line without text",
             lambda e: ["lens", "train", "--model", e.llama, "--text", str(e.root / "t.jsonl"),
                        "--out", str(e.root / "l")],
             "t.jsonl, line 1: missing field 'text'", inject=no_model,
             setup=lambda e: e.write("t.jsonl", '{"body": "x"}\n')),
    CliFault("lens train: --tokens 0",
             lambda e: ["lens", "train", "--model", e.llama, "--tokens", "0", "--out", str(e.root / "l")],
             "--tokens must be at least 1, got 0", inject=no_model),
    CliFault("lens train: --out exists",
             lambda e: ["lens", "train", "--model", e.llama, "--out", str(e.root / "taken")],
             "taken: exists; choose a new --out or pass --overwrite", setup=lambda e: (e.root / "taken").mkdir(),
             inject=no_model),
    CliFault("lens eval: no such lens",
             lambda e: ["lens", "eval", "--model", e.llama, "--lens", str(e.root / "none"), "--out", str(e.out)],
             "none: not a tuned lens directory (no such directory)", inject=no_model),
    CliFault("lens eval: a lens of another model shape",
             lambda e: ["lens", "eval", "--model", e.llama, "--lens", str(e.root / "other"), "--out", str(e.out)],
             "was trained for a model with d_model 32 and 3 layers (elsewhere), but", inject=no_model,
             setup=lambda e: other_lens(e.root / "other")),
    # --- mechscope toy (configs checked before any training)
    CliFault("toy train: unknown toy", lambda e: ["toy", "train", "sudoku", "--out", str(e.out)],
             "unknown toy 'sudoku'; known: superposition, modular-addition, induction, max-of-k"),
    CliFault("toy train: unknown config field",
             lambda e: ["toy", "train", "superposition", "--set", "stpes=3", "--out", str(e.out)],
             "SuperpositionConfig has no field 'stpes'"),
    CliFault("toy train: m >= n", lambda e: ["toy", "train", "superposition", "--set", "d_hidden=30", "--out", str(e.out)],
             "SuperpositionConfig.d_hidden (30) must be smaller than n_features (20)"),
    CliFault("toy train: p not prime",
             lambda e: ["toy", "train", "modular-addition", "--set", "p=15", "--out", str(e.out)],
             "ModularAdditionConfig.p: must be prime"),
    CliFault("toy train: K longer than the context", lambda e: ["toy", "train", "max-of-k", "--set", "k=9", "--out",
                                                               str(e.out)],
             "MaxOfKConfig.k = 9 is larger than the context n_ctx = 4"),
    CliFault("toy train: --out holds files", lambda e: ["toy", "train", "induction", "--out", str(e.root / "taken")],
             "taken exists and is not empty; pass --resume", setup=lambda e: e.write("taken/f", "x")),
    CliFault("toy analyze: not a checkpoint",
             lambda e: ["toy", "analyze", "induction", "--model", str(e.root / "none"), "--out", str(e.out)],
             "none: not a toy checkpoint (no toy.json)"),
    CliFault("toy analyze: a checkpoint of another toy",
             lambda e: ["toy", "analyze", "induction", "--model", str(e.root / "sp"), "--out", str(e.out)],
             "sp: a checkpoint of toy 'superposition', not 'induction'",
             setup=lambda e: e.write("sp/toy.json", '{"toy": "superposition", "config": {}, "step": 0, "history": []}')),
    CliFault("lens eval: an empty prompt",
             lambda e: ["lens", "eval", "--model", e.llama, "--prompt", " ", "--out", str(e.out)],
             "--prompt is empty", inject=no_model),
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
    ApiFault("attribute: unknown aggregation",
             lambda e: attribute(e.model, e.dataset, "peap", aggregation="median", progress=False),
             ParameterError, "unknown aggregation 'median'; choose one of sum, avg, max_abs, pooled_mean, signed_max"),
    ApiFault("attribute: aggregation 'mean' (renamed)",
             lambda e: attribute(e.model, e.dataset, "peap", aggregation="mean", progress=False),
             ParameterError, "aggregation 'mean' is now called 'pooled_mean'"),
    ApiFault("attribute: unknown query_edges",
             lambda e: attribute(e.model, e.dataset, "peap", query_edges="rows", progress=False),
             ParameterError, "unknown query_edges 'rows'; choose one of per_key, whole_row"),
    ApiFault("attribute: query_edges for eap",
             lambda e: attribute(e.model, e.dataset, "eap", query_edges="whole_row", progress=False),
             ParameterError, "query_edges applies to peap's crossing edges only"),
    ApiFault("EdgeScores.threshold: NaN", lambda e: scores_for(e).threshold(float("nan")),
             ParameterError, "threshold must be a finite number >= 0 (edges with |score| >= it are kept), got nan"),
    ApiFault("span threshold: negative",
             lambda e: attribute(e.model, e.dataset, "peap", batch_size=4, progress=False).threshold(-0.5),
             ParameterError, "threshold must be a finite number >= 0 (edges with |score| >= it are kept), got -0.5"),
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

    ApiFault("acdc(): tau=-0.5", lambda e: acdc(e.model, e.dataset, -0.5, progress=False),
             ParameterError, "tau must be a finite number >= 0, got -0.5"),
    ApiFault("acdc(): tau=inf", lambda e: acdc(e.model, e.dataset, [0.1, float("inf")], progress=False),
             ParameterError, "tau must be a finite number >= 0, got inf"),
    ApiFault("acdc(): empty sweep", lambda e: acdc(e.model, e.dataset, [], progress=False),
             ParameterError, "the tau sweep is empty; give at least one threshold"),
    ApiFault("acdc(): unknown metric", lambda e: acdc(e.model, e.dataset, 0.1, metric="bleu", progress=False),
             ParameterError, "unknown ACDC metric 'bleu'"),
    ApiFault("acdc(): unknown ablation", lambda e: acdc(e.model, e.dataset, 0.1, ablation="resample", progress=False),
             ParameterError, "unknown ablation 'resample'"),
    ApiFault("acdc(): candidates of another graph",
             lambda e: acdc(e.model, e.dataset, 0.1, candidates=torch.ones(5, dtype=torch.bool), progress=False),
             ParameterError, "candidates must be a boolean mask over the graph's"),
    ApiFault("acdc(): a model whose attention cannot be split per head",
             lambda e: without_head_split(e, lambda: acdc(e.model, e.dataset, 0.1, progress=False)),
             GraphError, "edges of this model cannot be ablated: its attention cannot take a separate input per head"),
    ApiFault("evaluate: a model whose attention cannot be split per head",
             lambda e: without_head_split(e, lambda: evaluate(e.model, Circuit.full(Graph.from_model(e.model)),
                                                              e.dataset, progress=False)),
             GraphError, "edges of this model cannot be ablated"),
    ApiFault("acdc(): a dataset of another tokenizer",
             lambda e: acdc(e.model, other_tokenizer(e), 0.1, progress=False),
             MechscopeError, "tokenized for another tokenizer"),

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
    ApiFault("EdgeScores.load: crossing_q of neither shape", lambda e: EdgeScores.load(bad_query_scores(e)),
             ScoresError, "bad_q.safetensors: crossing scores of shapes k [2, 4, 9, 9], v [2, 4, 9, 9], q [2, 4, 9, 8]"),
]


# ------------------------------------------------------------------------------------------------


# --- `mechscope sae` (sparse dictionaries): checks before the model loads where they can be
SAE_HOOK = "blocks.1.hook_resid_post"


def sae_text(env: Env) -> Path:
    import tiny

    return env.write("text.txt", " ".join(tiny.corpus()))


def sae_dir(env: Env, d_in: int = 64, hook: str = SAE_HOOK, architecture: str = "topk") -> Path:
    from mechscope.dictionaries import Dictionary, DictionaryConfig

    extra = {"hook_points": (hook, "blocks.0.hook_resid_post")} if architecture == "crosscoder" else {"k": 2}
    config = DictionaryConfig(architecture, d_in, 16, "" if architecture == "crosscoder" else hook, **extra)
    return Dictionary(config).init_weights(0).save(env.root / "sae")


def sae_train(env: Env, *more: str) -> list[str]:
    return ["sae", "train", "--model", env.llama, "--hook", SAE_HOOK, "--k", "2", "--expansion", "2",
            "--text", str(env.root / "text.txt"), "--tokens", "256", "--batch-size", "64", "--length", "16",
            "--held-out", "2", "--device", "cpu", "--out", str(env.out), *more]


def sae_eval(env: Env, sae: Path) -> list[str]:
    return ["sae", "eval", "--model", env.llama, "--sae", str(sae), "--text", str(env.root / "text.txt"),
            "--length", "16", "--count", "2", "--device", "cpu", "--out", str(env.out)]


CLI_FAULTS += [
    CliFault("sae train: unknown architecture", lambda e: sae_train(e, "--architecture", "magic"),
             "unknown architecture 'magic'; choose one of relu, topk", setup=sae_text, inject=no_model),
    CliFault("sae train: transcoder without a target", lambda e: sae_train(e, "--architecture", "transcoder"),
             "a transcoder needs --target", setup=sae_text, inject=no_model),
    CliFault("sae train: empty text", lambda e: sae_train(e),
             "text.txt: holds no text", setup=lambda e: e.write("text.txt", ""), inject=no_model),
    CliFault("sae train: too little text for the held-out set", lambda e: sae_train(e, "--held-out", "5000"),
             "not enough for 5000 held-out sequences", setup=sae_text, inject=no_model),
    CliFault("sae train: output exists", lambda e: sae_train(e),
             "out: exists and is not an empty directory", setup=lambda e: (sae_text(e), e.write("out/x", "x")),
             inject=no_model),
    CliFault("sae train: resume with no checkpoint", lambda e: sae_train(e, "--resume"),
             "out.checkpoint: no checkpoint to resume from", setup=sae_text, inject=no_model),
    CliFault("sae train: zero tokens", lambda e: sae_train(e, "--tokens", "0"),
             "--tokens must be at least 1, got 0", setup=sae_text, inject=no_model),
    CliFault("sae train: unknown hook point", lambda e: sae_train(e)[:5] + ["blocks.9.hook_resid_post"]
             + sae_train(e)[6:], "unknown hook point 'blocks.9.hook_resid_post'", setup=sae_text),
    CliFault("sae train: k above the latents", lambda e: sae_train(e, "--d-sae", "8", "--k", "9"),
             "--k 9 is more than the 8 latents", setup=sae_text),
    CliFault("sae eval: a dictionary of another width", lambda e: sae_eval(e, e.root / "sae"),
             "expects width 65 at blocks.1.hook_resid_post, but", setup=lambda e: (sae_text(e), sae_dir(e, 65))),
    CliFault("sae eval: a dictionary of an unknown hook point", lambda e: sae_eval(e, e.root / "sae"),
             "unknown hook point 'blocks.7.hook_resid_post'",
             setup=lambda e: (sae_text(e), sae_dir(e, hook="blocks.7.hook_resid_post"))),
    CliFault("sae eval: not a dictionary", lambda e: sae_eval(e, e.root / "notes"),
             "notes: not a mechscope dictionary, no config.json",
             setup=lambda e: (sae_text(e), e.write("notes/a.txt", "x")), inject=no_model),
    CliFault("sae eval: a corrupt weights file", lambda e: sae_eval(e, e.root / "sae"),
             "dictionary.safetensors: not a readable safetensors file",
             setup=lambda e: (sae_text(e), sae_dir(e), e.write("sae/dictionary.safetensors", b"junk")),
             inject=no_model),
    CliFault("sae export: unknown layout", lambda e: ["sae", "export", "--sae", str(e.root / "sae"), "--to", "onnx",
                                                      "--out", str(e.out)],
             "unknown layout 'onnx' for --to; choose saelens", setup=sae_dir),
    CliFault("sae export: a crosscoder", lambda e: ["sae", "export", "--sae", str(e.root / "sae"), "--out", str(e.out)],
             "a crosscoder has no SAELens layout", setup=lambda e: sae_dir(e, architecture="crosscoder")),
    CliFault("sae attribute: unknown SAE path", lambda e: sae_attribute(e, e.root / "nowhere"),
             "nowhere: no such dictionary directory", inject=no_model),
    CliFault("sae attribute: an SAE of another model", lambda e: sae_attribute(e, e.root / "sae"),
             "expects width 65 at blocks.1.hook_resid_post, but", setup=lambda e: sae_dir(e, 65)),
    CliFault("sae attribute: bad --ns", lambda e: sae_attribute(e, e.root / "sae", "--ns", "1,two"),
             "--ns must be comma-separated whole numbers", setup=sae_dir, inject=no_model),
]


def sae_attribute(env: Env, sae: Path, *more: str) -> list[str]:
    return ["sae", "attribute", "--model", env.llama, "--sae", str(sae), "--data", str(env.dataset),
            "--ns", "0,1", "--device", "cpu", "--out", str(env.out), *more]


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
    for key, value in fault.environ.items():  # set before the setup, which may use them
        monkeypatch.setenv(key, value.format(root=root))
    fault.setup(env)
    if fault.inject is not None:
        fault.inject(monkeypatch)
    before = tree(root)
    result = runner.invoke(app, fault.args(env))
    output = result.output
    assert result.exit_code == fault.status, output
    assert "Traceback" not in output, output
    if fault.status != 0:  # 2: an error; 130 / 143: interrupted
        errors = [line for line in output.splitlines() if line.startswith(("error:", "interrupted"))]
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


# ------------------------------------------------------------------------------------------------
# A real signal to a real process, sent while it writes its results (what `timeout`, Slurm and
# `docker stop` send, and Ctrl-C): the clean-up runs, nothing is left beside --out, and the exit status
# is the conventional 128 + the signal's number.
# ------------------------------------------------------------------------------------------------

# The command, with the flush of its outputs to the disk held back: it says when it is there (it has
# written everything into its temporaries) and waits for the signal.
HELD_WRITE = """
import pathlib, signal, sys, time
# As a shell starts a command: SIGINT handled by Python, neither signal blocked (a disposition or mask
# inherited from the test process, where some library may have changed them, would hide the signal).
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
import mechscope.fileio
def held(path):
    pathlib.Path(sys.argv[1]).write_text(str(path))
    for _ in range(6000):  # short sleeps: a signal that lands on another thread is seen within 0.1 s
        time.sleep(0.1)
mechscope.fileio.sync_file = held
from mechscope.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("signum, verb", [(signal.SIGTERM, "circuit"), (signal.SIGINT, "data")],
                         ids=["SIGTERM during circuit's report", "SIGINT during data's write"])
def test_a_signal_during_the_final_write_leaves_nothing(signum, verb, tmp_path, tiny_model_dirs):
    root, held = tmp_path / "work", tmp_path / "held"
    root.mkdir()
    out = root / "out"
    args = {"circuit": ["circuit", "--task", "ioi", "--n", "32", "--seed", "1", "--method", "eap"],
            "data": ["data", "ioi", "--n", "6"]}[verb]
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.Popen([sys.executable, "-c", HELD_WRITE, str(held), *args, "--model",
                             str(tiny_model_dirs["llama"]), "--out", str(out)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(src)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not held.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held.exists(), proc.communicate(timeout=60)
        assert tree(root), "the temporaries should be there while the write is held"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert lines == [f"interrupted by {signal.Signals(signum).name}; unfinished outputs were removed"], stderr
    assert tree(root) == set(), sorted(tree(root))


def test_a_really_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_model_dirs):
    """`data` writing onto a one-page tmpfs, mounted in a private mount namespace (`unshare`: no root
    needed where user namespaces are allowed; the mount vanishes with the process). What the disk
    holds afterwards is listed from inside."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (unshare or user namespaces unavailable)")
    script = ('disk="$1"; shift; mount -t tmpfs -o size=4k tmpfs "$disk" && "$@"; status=$?; '
              'echo "left: $(ls -A "$disk")"; exit $status')
    out = disk / "ioi.jsonl"
    src = Path(__file__).resolve().parents[1] / "src"
    command = [sys.executable, "-m", "mechscope.cli", "data", "ioi", "--n", "6", "--model",
               str(tiny_model_dirs["llama"]), "--out", str(out)]
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(disk), *command],
                          env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out}: cannot write there (no space left on device)"], done.stderr
    assert done.stdout.splitlines()[-1] == "left: ", done.stdout

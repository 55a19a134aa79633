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
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from tiny import save_llama_gguf
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

    # --- command-line options and parameters

    # --- outputs: checked before the compute, written atomically

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
    for key, value in fault.environ.items():  # set before the setup, which may use them
        monkeypatch.setenv(key, value.format(root=root))
    fault.setup(env)
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

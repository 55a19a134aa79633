"""The benchmark's suite of RASP programs (six from tracr's library and two written here), and
`load_program` for the programs users bring (`mechscope benchmark tracr --program module:function`)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from ...errors import MechscopeError
from .compile import BOS, PAD, ProgramSpec


def _reverse():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_reverse(rasp.tokens).named("reverse")


def _sort_unique():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_sort_unique(rasp.tokens, rasp.tokens).named("sort_unique")


def _frac_prevs():
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_frac_prevs(rasp.numerical(rasp.Map(lambda t: t == "x", rasp.tokens)).named("is_x")).named("frac_prevs")


def _hist():
    from tracr.compiler import lib

    return lib.make_hist().named("hist")


def _length():
    from tracr.compiler import lib

    return lib.make_length().named("length")


def _shuffle_dyck2():
    from tracr.compiler import lib

    return lib.make_shuffle_dyck2().named("shuffle_dyck2")


def _prev_equal():
    """Whether each token equals the token before it (categorical head + MLP)."""
    from tracr.rasp import rasp

    prev = rasp.Aggregate(rasp.Select(rasp.indices, rasp.indices, lambda k, q: q == k + 1), rasp.tokens,
                          default=None).named("prev_token")
    return rasp.SequenceMap(lambda a, b: a == b, rasp.tokens, prev).named("prev_equal")


def _first_frac():
    """The fraction of tokens so far that equal the first token (categorical head, MLP, numerical
    mean): four components in series."""
    from tracr.rasp import rasp

    first = rasp.Aggregate(rasp.Select(rasp.indices, rasp.indices, lambda k, q: k == 0), rasp.tokens).named("first_token")
    same = rasp.SequenceMap(lambda a, b: a == b, rasp.tokens, first).named("same_as_first")
    same = rasp.numerical(rasp.Map(lambda x: 1 if x else 0, same)).named("same_as_first_num")
    prevs = rasp.Select(rasp.indices, rasp.indices, rasp.Comparison.LEQ).named("prevs")
    return rasp.numerical(rasp.Aggregate(prevs, same, default=0)).named("first_frac")


SUITE: dict[str, ProgramSpec] = {
    "reverse": ProgramSpec(_reverse, ("a", "b", "c"), 5, "the input reversed"),
    "sort_unique": ProgramSpec(_sort_unique, (1, 2, 3, 4, 5), 5, "sort (inputs without repeated tokens)", unique_tokens=True),
    "frac_prevs": ProgramSpec(_frac_prevs, ("x", "y"), 5, "fraction of tokens so far that are 'x'"),
    "hist": ProgramSpec(_hist, ("a", "b", "c"), 5, "how often each token occurs"),
    "length": ProgramSpec(_length, ("a", "b", "c"), 5, "the input's length", pad_counterfactuals=True),
    "shuffle_dyck2": ProgramSpec(_shuffle_dyck2, ("(", ")", "{", "}"), 4, "1 if both bracket types balance (shuffled)"),
    "prev_equal": ProgramSpec(_prev_equal, ("a", "b", "c"), 5, "whether each token repeats the previous one (ours)"),
    "first_frac": ProgramSpec(_first_frac, ("a", "b", "c"), 5, "fraction of tokens so far equal to the first (ours)"),
}


class ProgramError(MechscopeError, ValueError):
    """A --program reference that does not give a ProgramSpec of a RASP program."""


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _import(ref: str, where: str):
    """The module `where` names: a file path (ending in .py or holding a path separator) or a module
    name importable from the working directory or sys.path. Writes no bytecode beside it."""
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        return _import_module(ref, where)
    finally:
        sys.dont_write_bytecode = before


def _import_module(ref: str, where: str):
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise ProgramError(f"--program {ref}: no file {path}")
        name = f"mechscope_program_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ProgramError(f"--program {ref}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and the like look their module up while it runs
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is one line
            del sys.modules[name]
            raise ProgramError(f"--program {ref}: importing {path} failed: {_one_line(e)}") from None
        return module
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except Exception as e:  # noqa: BLE001
        raise ProgramError(f"--program {ref}: cannot import module {where}: {_one_line(e)}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())


def load_program(ref: str) -> tuple[str, ProgramSpec]:
    """(name, spec) from `ref` = "module:function" or "path/to/file.py:function": the function,
    called without arguments, returns a ProgramSpec whose `build()` gives a RASP SOp. The name is the
    function's. ProgramError, one line, for anything else (nothing is compiled here)."""
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise ProgramError(f"--program {ref}: expected module:function or path/to/file.py:function")
    module = _import(ref, where)
    fn = getattr(module, attr, None)
    if fn is None:
        raise ProgramError(f"--program {ref}: {where} has no attribute {attr!r}")
    if not callable(fn):
        raise ProgramError(f"--program {ref}: {attr} is an object of type {type(fn).__name__}, not a function")
    try:
        spec = fn()
    except Exception as e:  # noqa: BLE001
        raise ProgramError(f"--program {ref}: {attr}() raised {_one_line(e)}") from None
    if not isinstance(spec, ProgramSpec):
        raise ProgramError(f"--program {ref}: {attr}() returned an object of type {type(spec).__name__}, "
                           "not a mechscope.toys.tracr.ProgramSpec")
    check_spec(spec, f"--program {ref}")
    return attr, spec


def check_spec(spec: ProgramSpec, where: str) -> None:
    """ProgramError unless `spec` can be compiled: a build function giving a RASP SOp, a vocabulary of
    two or more values (not BOS or PAD), and an integer max_seq_len of 2 or more."""
    from tracr.rasp import rasp

    try:
        vocab = list(spec.vocab)
    except TypeError:
        raise ProgramError(f"{where}: vocab must be a collection of values, got {type(spec.vocab).__name__}") from None
    if len(set(vocab)) < 2:
        raise ProgramError(f"{where}: vocab needs at least two values, got {vocab}")
    if BOS in vocab or PAD in vocab:
        raise ProgramError(f"{where}: vocab may not hold the compiler's {BOS!r} or {PAD!r}")
    if isinstance(spec.max_seq_len, bool) or not isinstance(spec.max_seq_len, int) or spec.max_seq_len < 2:
        raise ProgramError(f"{where}: max_seq_len must be an integer of at least 2, got {spec.max_seq_len!r}")
    if not callable(spec.build):
        raise ProgramError(f"{where}: build must be a function returning a RASP program")
    try:
        program = spec.build()
    except Exception as e:  # noqa: BLE001
        raise ProgramError(f"{where}: build() raised {_one_line(e)}") from None
    if not isinstance(program, rasp.SOp):
        raise ProgramError(f"{where}: build() returned an object of type {type(program).__name__}, not a RASP SOp")

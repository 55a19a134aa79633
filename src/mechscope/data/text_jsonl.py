"""Bring your own task: prompt pairs written as text, one JSON object per line.

    {"clean": "The capital of France is", "counterfactual": "The capital of Spain is",
     "correct": " Paris", "wrong": " Madrid"}

`clean` / `counterfactual`: the prompt as one string (one span, `prompt`), or as a list of
`[span_name, text]` segments that join to the prompt (the same names, in the same order, on both sides
and in every row: they are the schema). `correct` / `wrong`: an answer string or a list of them; each
must be a single token of the model's tokenizer (mind the leading space). `wrong` may be an empty list.
`meta` (an object) and any other field are kept in the example's `meta`.

Reading checks the structure without a tokenizer (`read_text_jsonl`, so a command can fail before it
loads a model); `text_dataset` then tokenizes with `spans.make_pair` (BOS first, as its own span, when
the tokenizer has one) and validates every row. Every error is one line naming file, line and field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dataset import (
    BOS_SPAN,
    DatasetError,
    PromptPair,
    PromptPairDataset,
    iter_text_lines,
    parse_json_line,
    read_text_file,
    tokenizer_fingerprint,
    validate_example,
)
from .spans import make_pair, pad_id, schema_for

PROMPT_SPAN = "prompt"
REQUIRED = ("clean", "counterfactual", "correct", "wrong")


@dataclass
class TextRow:
    """One row of a text JSONL, structurally checked: segments and answer strings."""

    lineno: int
    clean: list[tuple[str, str]]
    counterfactual: list[tuple[str, str]]
    correct: list[str]
    wrong: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def is_dataset_jsonl(path: str | os.PathLike) -> bool:
    """Whether `path` is a tokenized mechscope dataset (its first line is the `mechscope_dataset`
    header) rather than a text JSONL. A missing or unreadable file counts as a dataset, so that its
    loader reports the problem."""
    try:
        for _, line in iter_text_lines(Path(path), "data file"):  # reads up to the first row only
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return True
                return not isinstance(first, dict) or "mechscope_dataset" in first
    except DatasetError:
        return True
    return True


def read_text_jsonl(path: str | os.PathLike) -> list[TextRow]:
    """Parse and structurally check every row of a text JSONL (no tokenizer needed)."""
    path = Path(path)
    lines = read_text_file(path, "data file").splitlines()
    rows: list[TextRow] = []
    names: list[str] | None = None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rows.append(parse_text_row(parse_json_line(path, lineno, line), path, lineno, names))
        names = names or [n for n, _ in rows[0].clean]
    if not rows:
        raise DatasetError(f"{path}: no rows; expected one JSON object per line with fields {', '.join(REQUIRED)}")
    return rows


def parse_text_row(obj: dict, path: Path, lineno: int, names: list[str] | None = None) -> TextRow:
    """One parsed JSON row of a text JSONL, structurally checked; `names`, when given, are the span
    names every row must have (the first row's)."""
    where = f"{path}, line {lineno}"
    for key in REQUIRED:
        if key not in obj:
            raise DatasetError(f"{where}: missing field '{key}' (each row needs {', '.join(REQUIRED)})")
    clean = _segments(obj["clean"], where, "clean")
    counterfactual = _segments(obj["counterfactual"], where, "counterfactual")
    row_names = [n for n, _ in clean]
    if [n for n, _ in counterfactual] != row_names:
        raise DatasetError(
            f"{where}: field 'counterfactual': span names {[n for n, _ in counterfactual]} differ from "
            f"field 'clean' {row_names}"
        )
    if names is not None and row_names != names:
        raise DatasetError(
            f"{where}: field 'clean': span names {row_names} differ from the first row's {names}; every "
            "row needs the same spans in the same order"
        )
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise DatasetError(f"{where}: field 'meta' must be a JSON object")
    extra = {k: v for k, v in obj.items() if k not in REQUIRED and k != "meta"}
    return TextRow(lineno, clean, counterfactual, _answers(obj["correct"], where, "correct", False),
                   _answers(obj["wrong"], where, "wrong", True), {**extra, **meta})


def _segments(value, where: str, name: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        if not value:
            raise DatasetError(f"{where}: field '{name}': empty prompt")
        return [(PROMPT_SPAN, value)]
    if not isinstance(value, list) or not value or not all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in value
    ):
        raise DatasetError(
            f"{where}: field '{name}' must be a string or a non-empty list of [span_name, text] pairs of strings"
        )
    names = [n for n, _ in value]
    if len(set(names)) != len(names) or BOS_SPAN in names or "" in names:
        raise DatasetError(
            f"{where}: field '{name}': span names must be unique, non-empty and not '{BOS_SPAN}'; got {names}"
        )
    if not "".join(t for _, t in value):
        raise DatasetError(f"{where}: field '{name}': empty prompt")
    return [(n, t) for n, t in value]


def _answers(value, where: str, name: str, may_be_empty: bool) -> list[str]:
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not all(isinstance(a, str) and a for a in answers):
        raise DatasetError(f"{where}: field '{name}' must be an answer string or a list of non-empty strings")
    if not answers and not may_be_empty:
        raise DatasetError(f"{where}: field '{name}': no answer")
    return answers


def text_dataset(
    rows: list[TextRow],
    tokenizer,
    path: str | os.PathLike,
    *,
    n_ctx: int | None = None,
    task: str | None = None,
    metric: str = "logit_diff",
) -> PromptPairDataset:
    """Tokenize rows from `read_text_jsonl` into a validated `PromptPairDataset`: answers single tokens,
    clean / counterfactual of equal token length with the same span boundaries, within `n_ctx`."""
    path = Path(path)
    prepend_bos = tokenizer.bos_token_id is not None
    schema = schema_for(rows[0].clean, prepend_bos)
    examples = []
    for row in rows:
        examples.append(tokenize_text_row(row, tokenizer, path, schema, n_ctx, prepend_bos))
    return PromptPairDataset(
        examples=examples,
        schema=schema,
        task=task or path.stem,
        metric=metric,
        tokenizer=tokenizer_fingerprint(tokenizer),
        pad_token_id=pad_id(tokenizer),
        info={"source": str(path), "format": "text-jsonl"},
        origin=str(path),
    )


def tokenize_text_row(row: TextRow, tokenizer, path: Path, schema, n_ctx: int | None,
                      prepend_bos: bool) -> PromptPair:
    """One checked row as a validated `PromptPair` (errors name the file and line)."""
    where = f"{path}, line {row.lineno}"
    try:
        ex = make_pair(tokenizer, row.clean, row.counterfactual, row.correct, row.wrong, prepend_bos,
                       meta={**row.meta, "line": row.lineno})
    except DatasetError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    ex.origin = where
    validate_example(ex, schema, where, n_ctx)
    return ex


def load_text_jsonl(path: str | os.PathLike, tokenizer, *, n_ctx: int | None = None, task: str | None = None,
                    metric: str = "logit_diff") -> PromptPairDataset:
    """`read_text_jsonl` then `text_dataset`."""
    return text_dataset(read_text_jsonl(path), tokenizer, path, n_ctx=n_ctx, task=task, metric=metric)


__all__ = ["PROMPT_SPAN", "TextRow", "is_dataset_jsonl", "load_text_jsonl", "parse_text_row", "read_text_jsonl",
           "text_dataset", "tokenize_text_row"]

"""Prompt-pair datasets with a schema of named spans (docs/method.md §1).

A `PromptPairDataset` holds, for every example, the clean and counterfactual token ids (same length
within a pair; pairs may differ in length), the correct and wrong answer token ids (one or several),
and where each span of the `Schema` starts. Span `i` of an example covers token positions
`[starts[i], starts[i + 1])`, the last span ending at the prompt length, so spans tile the tokens; a
span is empty when its start equals the next one's.

Token ids include the BOS token at position 0 when the model prepends one; it forms the first span,
named `bos`, so attention to it (the usual sink) has a span of its own.

Datasets save to JSONL: a header line (task, metric, schema, tokenizer identity) then one line per
example. Saving is atomic and loading validates every row, naming file, line and field on error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..devices import HOST
from ..errors import MechscopeError
from ..fileio import atomic_path

FORMAT_VERSION = 1
BOS_SPAN = "bos"
METRICS = ("logit_diff", "prob_diff", "kl", "accuracy")


class DatasetError(MechscopeError, ValueError):
    """A dataset, schema or data file that violates the invariants; the message says where."""


@dataclass(frozen=True)
class Schema:
    """An ordered list of span names shared by every example of a dataset."""

    spans: tuple[str, ...]

    def __post_init__(self):
        spans = tuple(self.spans)
        object.__setattr__(self, "spans", spans)
        if not spans:
            raise DatasetError("a schema needs at least one span")
        if len(set(spans)) != len(spans):
            dupes = sorted({s for s in spans if spans.count(s) > 1})
            raise DatasetError(f"schema span names must be unique; repeated: {dupes}")

    def __len__(self) -> int:
        return len(self.spans)

    def index(self, name: str) -> int:
        try:
            return self.spans.index(name)
        except ValueError:
            raise DatasetError(f"no span named '{name}' in schema {list(self.spans)}") from None


@dataclass
class PromptPair:
    """One example: clean / counterfactual token ids, answer ids and span starts."""

    clean: list[int]
    counterfactual: list[int]
    correct: list[int]
    wrong: list[int]
    span_starts: list[int]
    clean_text: str = ""
    counterfactual_text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clean)

    def span_bounds(self) -> list[tuple[int, int]]:
        """[(start, end)] for every span, end exclusive."""
        ends = list(self.span_starts[1:]) + [len(self.clean)]
        return list(zip(self.span_starts, ends))

    def span_of_positions(self) -> list[int]:
        """For each token position, the index of the span it belongs to."""
        out = []
        for i, (a, b) in enumerate(self.span_bounds()):
            out.extend([i] * (b - a))
        return out

    def to_json(self) -> dict:
        return {
            "clean": self.clean,
            "counterfactual": self.counterfactual,
            "correct": self.correct,
            "wrong": self.wrong,
            "span_starts": self.span_starts,
            "clean_text": self.clean_text,
            "counterfactual_text": self.counterfactual_text,
            "meta": self.meta,
        }


def validate_example(ex: PromptPair, schema: Schema, where: str, n_ctx: int | None = None) -> None:
    """Raise DatasetError (prefixed by `where`) unless `ex` satisfies the dataset invariants."""
    n = len(ex.clean)
    if n == 0:
        raise DatasetError(f"{where}: field 'clean': empty prompt")
    if len(ex.counterfactual) != n:
        raise DatasetError(
            f"{where}: field 'counterfactual': {len(ex.counterfactual)} tokens but the clean prompt has "
            f"{n}; a pair must have the same token length"
        )
    if n_ctx is not None and n > n_ctx:
        raise DatasetError(f"{where}: field 'clean': {n} tokens is longer than the model's context ({n_ctx})")
    starts = ex.span_starts
    if len(starts) != len(schema):
        raise DatasetError(
            f"{where}: field 'span_starts': {len(starts)} starts for a schema of {len(schema)} spans"
        )
    if starts[0] != 0:
        raise DatasetError(f"{where}: field 'span_starts': the first span must start at 0, not {starts[0]}")
    for i in range(1, len(starts)):
        if starts[i] < starts[i - 1]:
            raise DatasetError(
                f"{where}: field 'span_starts': span '{schema.spans[i]}' starts at {starts[i]}, before "
                f"span '{schema.spans[i - 1]}' ({starts[i - 1]}): spans overlap or are out of order"
            )
    if starts[-1] > n:
        raise DatasetError(
            f"{where}: field 'span_starts': span '{schema.spans[-1]}' starts at {starts[-1]}, past the "
            f"prompt length {n}"
        )
    if not ex.correct:
        raise DatasetError(f"{where}: field 'correct': no correct answer token")
    for name in ("correct", "wrong"):
        ids = getattr(ex, name)
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{where}: field '{name}': repeated answer token ids {ids}")
    if set(ex.correct) & set(ex.wrong):
        raise DatasetError(f"{where}: fields 'correct'/'wrong': a token is both correct and wrong")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary: datasets remember it to catch a model mismatch.

    Kept on the tokenizer after the first call: every attribution and evaluation checks it, and a
    large vocabulary (Gemma's 262k tokens) takes a noticeable moment to hash."""
    cached = getattr(tokenizer, "_mechscope_fingerprint", None)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    tokenizer._mechscope_fingerprint = (len(tokenizer), h.hexdigest()[:16])
    return tokenizer._mechscope_fingerprint[1]


@dataclass
class Batch:
    """Padded tensors for a list of examples (right padding).

    clean, counterfactual, attention_mask: [batch, pos]; last: [batch] index of the final token;
    correct, wrong: [batch, n_answers] padded with 0 where correct_mask / wrong_mask is False.
    """

    clean: torch.Tensor
    counterfactual: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor
    correct: torch.Tensor
    correct_mask: torch.Tensor
    wrong: torch.Tensor
    wrong_mask: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


def _pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), value, dtype=torch.long, device=HOST)
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=HOST)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long, device=HOST)
        mask[i, : len(r)] = True
    return ids, mask


@dataclass
class PromptPairDataset:
    """A list of `PromptPair`s with their schema, task, metric and tokenizer identity."""

    examples: list[PromptPair]
    schema: Schema
    task: str = "custom"
    metric: str = "logit_diff"
    model: str = ""
    tokenizer: str = ""  # tokenizer_fingerprint of the tokenizer the ids come from
    pad_token_id: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise DatasetError(f"unknown metric '{self.metric}'; choose one of {', '.join(METRICS)}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return self.subset(range(*idx.indices(len(self))))
        return self.examples[idx]

    def validate(self, n_ctx: int | None = None, source: str = "dataset") -> None:
        for i, ex in enumerate(self.examples):
            validate_example(ex, self.schema, f"{source}: example {i}", n_ctx)

    def subset(self, indices: Iterable[int]) -> "PromptPairDataset":
        return self._with([self.examples[i] for i in indices])

    def single_span(self, name: str = "all") -> "PromptPairDataset":
        """The same examples under a one-span schema (every token in span `name`): position-aware
        methods then reduce to their non-positional forms."""
        examples = [PromptPair(**{**ex.__dict__, "span_starts": [0]}) for ex in self.examples]
        return self._with(examples, Schema((name,)))

    def _with(self, examples: list[PromptPair], schema: Schema | None = None) -> "PromptPairDataset":
        """A dataset like this one (task, metric, model, tokenizer, ...) with other examples / schema."""
        return PromptPairDataset(
            examples=examples,
            schema=self.schema if schema is None else schema,
            task=self.task,
            metric=self.metric,
            model=self.model,
            tokenizer=self.tokenizer,
            pad_token_id=self.pad_token_id,
            info=dict(self.info),
        )

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple["PromptPairDataset", "PromptPairDataset"]:
        """Shuffle with `seed` and split into (first `fraction`, rest), e.g. discovery / evaluation."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=g, device=HOST).tolist()
        cut = int(round(fraction * len(self)))
        return self.subset(order[:cut]), self.subset(order[cut:])

    def batch(self, indices: Sequence[int] | None = None) -> Batch:
        exs = self.examples if indices is None else [self.examples[i] for i in indices]
        if not exs:
            raise DatasetError("cannot make a batch of zero examples")
        clean, attn = _pad([e.clean for e in exs], self.pad_token_id)
        cf, _ = _pad([e.counterfactual for e in exs], self.pad_token_id)
        correct, cmask = _pad([e.correct for e in exs], 0)
        wrong, wmask = _pad([e.wrong for e in exs], 0)
        last = torch.tensor([len(e.clean) - 1 for e in exs], dtype=torch.long, device=HOST)
        return Batch(clean, cf, attn, last, correct, cmask, wrong, wmask)

    def batches(self, batch_size: int) -> Iterable[tuple[list[int], Batch]]:
        """Yield (indices, Batch) over the dataset in order, `batch_size` examples at a time."""
        for start in range(0, len(self), batch_size):
            idx = list(range(start, min(start + batch_size, len(self))))
            yield idx, self.batch(idx)

    # ---------------------------------------------------------------------------------------------
    # JSONL
    # ---------------------------------------------------------------------------------------------

    def header(self) -> dict:
        return {
            "mechscope_dataset": FORMAT_VERSION,
            "task": self.task,
            "metric": self.metric,
            "schema": list(self.schema.spans),
            "model": self.model,
            "tokenizer": self.tokenizer,
            "pad_token_id": self.pad_token_id,
            "n_examples": len(self),
            "info": self.info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSONL atomically (temporary file, then rename)."""
        path = Path(path)
        with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(self.header(), ensure_ascii=False) + "\n")
            for ex in self.examples:
                f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptPairDataset":
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path}: no such dataset file")
        with path.open(encoding="utf-8") as f:
            lines = f.read().splitlines()
        if not lines:
            raise DatasetError(f"{path}: empty file, expected a mechscope dataset header on line 1")
        header = parse_json_line(path, 1, lines[0])
        if header.get("mechscope_dataset") != FORMAT_VERSION:
            raise DatasetError(
                f"{path}, line 1: not a mechscope dataset header (field 'mechscope_dataset' should be "
                f"{FORMAT_VERSION})"
            )
        for key in ("schema", "metric"):
            if key not in header:
                raise DatasetError(f"{path}, line 1: header is missing field '{key}'")
        try:
            schema = Schema(tuple(header["schema"]))
        except DatasetError as exc:
            raise DatasetError(f"{path}, line 1: field 'schema': {exc}") from None
        examples = []
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            row = parse_json_line(path, lineno, line)
            examples.append(_example_from_json(row, path, lineno))
            validate_example(examples[-1], schema, f"{path}, line {lineno}")
        try:
            ds = cls(
                examples=examples,
                schema=schema,
                task=header.get("task", "custom"),
                metric=header["metric"],
                model=header.get("model", ""),
                tokenizer=header.get("tokenizer", ""),
                pad_token_id=int(header.get("pad_token_id", 0)),
                info=header.get("info", {}),
            )
        except DatasetError as exc:
            raise DatasetError(f"{path}, line 1: {exc}") from None
        return ds


def parse_json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}, line {lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}, line {lineno}: expected a JSON object")
    return obj


def _int_list(row: dict, key: str, path: Path, lineno: int) -> list[int]:
    if key not in row:
        raise DatasetError(f"{path}, line {lineno}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DatasetError(f"{path}, line {lineno}: field '{key}' must be a list of integers")
    return value


def _example_from_json(row: dict, path: Path, lineno: int) -> PromptPair:
    return PromptPair(
        clean=_int_list(row, "clean", path, lineno),
        counterfactual=_int_list(row, "counterfactual", path, lineno),
        correct=_int_list(row, "correct", path, lineno),
        wrong=_int_list(row, "wrong", path, lineno),
        span_starts=_int_list(row, "span_starts", path, lineno),
        clean_text=str(row.get("clean_text", "")),
        counterfactual_text=str(row.get("counterfactual_text", "")),
        meta=dict(row.get("meta", {})),
    )

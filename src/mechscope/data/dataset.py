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
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..devices import HOST
from ..errors import MechscopeError, ParameterError, check_count
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
    # Where the example was read from ("data.jsonl, line 7"; empty when made in memory), so that checks
    # against a model (context length, vocabulary) name the file and line. Not saved.
    origin: str = field(default="", compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.clean)

    def where(self, index: int, source: str = "dataset") -> str:
        """How errors name this example: its file and line when it was read from one, else
        `source: example index` (counted from 0)."""
        return self.origin or f"{source}: example {index}"

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
    for name in ("clean", "counterfactual", "correct", "wrong"):
        ids = getattr(ex, name)
        if ids and min(ids) < 0:
            raise DatasetError(f"{where}: field '{name}': negative token id {min(ids)}")
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


def make_batch(examples: Sequence[PromptPair], pad_token_id: int) -> Batch:
    """The padded `Batch` of `examples` (right padding with `pad_token_id`)."""
    if not examples:
        raise DatasetError("cannot make a batch of zero examples")
    clean, attn = _pad([e.clean for e in examples], pad_token_id)
    cf, _ = _pad([e.counterfactual for e in examples], pad_token_id)
    correct, cmask = _pad([e.correct for e in examples], 0)
    wrong, wmask = _pad([e.wrong for e in examples], 0)
    last = torch.tensor([len(e.clean) - 1 for e in examples], dtype=torch.long, device=HOST)
    return Batch(clean, cf, attn, last, correct, cmask, wrong, wmask)


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
    # The file the dataset was read from (empty when made in memory): errors about the whole dataset
    # name it. Not saved.
    origin: str = field(default="", compare=False, repr=False)

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
        """DatasetError unless every example satisfies the invariants (and fits `n_ctx` tokens); an
        error names the example's file and line, else `source: example i`."""
        source = self.origin or source
        for i, ex in enumerate(self.examples):
            validate_example(ex, self.schema, ex.where(i, source), n_ctx)

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
            origin=self.origin,
        )

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple["PromptPairDataset", "PromptPairDataset"]:
        """Shuffle with `seed` and split into (first `fraction`, rest), e.g. discovery / evaluation;
        `fraction` is a number from 0 to 1."""
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction <= 1:
            raise ParameterError(f"split: fraction must be a number from 0 to 1, got {fraction!r}")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=g, device=HOST).tolist()
        cut = int(round(fraction * len(self)))
        return self.subset(order[:cut]), self.subset(order[cut:])

    def batch(self, indices: Sequence[int] | None = None) -> Batch:
        exs = self.examples if indices is None else [self.examples[i] for i in indices]
        return make_batch(exs, self.pad_token_id)

    def batches(self, batch_size: int) -> Iterable[tuple[list[int], Batch]]:
        """Yield (indices, Batch) over the dataset in order, `batch_size` examples at a time."""
        batch_size = check_count("batch_size", batch_size)
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
        """Read a dataset JSONL (docs/formats.md §1), checking the header and every row; each example
        remembers its file and line (`PromptPair.origin`) for later checks against a model."""
        path = Path(path)
        lines = read_text_file(path, "dataset file").splitlines()
        if not lines:
            raise DatasetError(f"{path}: empty file, expected a mechscope dataset header on line 1")
        header = parse_json_line(path, 1, lines[0])
        if header.get("mechscope_dataset") != FORMAT_VERSION:
            raise DatasetError(
                f"{path}, line 1: not a mechscope dataset header (field 'mechscope_dataset' should be "
                f"{FORMAT_VERSION})"
            )
        fields = _header_fields(header, path)
        examples = []
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            row = parse_json_line(path, lineno, line)
            examples.append(_example_from_json(row, path, lineno))
            validate_example(examples[-1], fields["schema"], examples[-1].origin)
        try:
            ds = cls(examples=examples, **fields, origin=str(path))
        except DatasetError as exc:
            raise DatasetError(f"{path}, line 1: {exc}") from None
        return ds


# The header's fields: (type, what it must be, required); a missing optional one takes the dataclass default.
_HEADER = {
    "schema": (list, "a list of span names", True),
    "metric": (str, "a string", True),
    "task": (str, "a string", False),
    "model": (str, "a string", False),
    "tokenizer": (str, "a string", False),
    "pad_token_id": (int, "a non-negative integer", False),
    "info": (dict, "a JSON object", False),
}


def _header_fields(header: dict, path: Path) -> dict:
    """The dataset's constructor arguments from a header, each checked for its type."""
    out = {}
    for key, (kind, what, required) in _HEADER.items():
        if key not in header:
            if required:
                raise DatasetError(f"{path}, line 1: header is missing field '{key}'")
            continue
        value = header[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise DatasetError(f"{path}, line 1: field '{key}' must be {what}, not {_shown(value)}")
        out[key] = value
    if not all(isinstance(name, str) and name for name in out["schema"]):
        raise DatasetError(f"{path}, line 1: field 'schema' must be a list of non-empty strings, not "
                           f"{_shown(out['schema'])}")
    try:
        out["schema"] = Schema(tuple(out["schema"]))
    except DatasetError as exc:
        raise DatasetError(f"{path}, line 1: field 'schema': {exc}") from None
    return out


def _shown(value, width: int = 60) -> str:
    """A JSON value as a message shows it: its JSON text, cut to `width` characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def read_text_file(path: Path, what: str, error: type[MechscopeError] = DatasetError) -> str:
    """The text of a UTF-8 file (a UTF-8 byte-order mark is dropped), or `error` with one line naming
    the file, and the line for bytes that are not UTF-8: a missing file, a directory, an unreadable
    file, UTF-16 or binary data."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a directory, not a {what}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data[:4096]:
        raise error(f"{path}: UTF-16 or binary data, not UTF-8 text; save the {what} as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); save the "
            f"{what} as UTF-8"
        ) from None


def iter_text_lines(path: Path, what: str, error: type[MechscopeError] = DatasetError):
    """Yield (line number, line) of a UTF-8 file one line at a time (never the whole file in memory),
    with `read_text_file`'s checks and messages: a missing or unreadable file, UTF-16 or binary data,
    and bytes that are not UTF-8 (named by line and column) raise `error`."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a directory, not a {what}")
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    with f:
        head = f.read(4096)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in head[:4096]:
            raise error(f"{path}: UTF-16 or binary data, not UTF-8 text; save the {what} as UTF-8")
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{path}, line {lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1}); save the {what} as UTF-8") from None
            yield lineno, line.rstrip("\r\n")


def parse_json_line(path: Path, lineno: int, line: str) -> dict:
    return parse_json_object(line, f"{path}, line {lineno}")


def parse_json_object(text: str, where: str, error: type[MechscopeError] = DatasetError) -> dict:
    """The JSON object in `text`, or `error` prefixed by `where` (the place in a file; the line of a
    syntax error is added for text of several lines)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno}, column {exc.colno}" if "\n" in text.strip() else f"column {exc.colno}"
        raise error(f"{where}: not valid JSON ({exc.msg} at {at})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object")
    return obj


def _int_list(row: dict, key: str, path: Path, lineno: int) -> list[int]:
    if key not in row:
        raise DatasetError(f"{path}, line {lineno}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DatasetError(f"{path}, line {lineno}: field '{key}' must be a list of integers")
    return value


def _example_from_json(row: dict, path: Path, lineno: int) -> PromptPair:
    where = f"{path}, line {lineno}"
    for key, kind, what in (("clean_text", str, "a string"), ("counterfactual_text", str, "a string"),
                            ("meta", dict, "a JSON object")):
        if key in row and not isinstance(row[key], kind):
            raise DatasetError(f"{where}: field '{key}' must be {what}, not {_shown(row[key])}")
    return PromptPair(
        clean=_int_list(row, "clean", path, lineno),
        counterfactual=_int_list(row, "counterfactual", path, lineno),
        correct=_int_list(row, "correct", path, lineno),
        wrong=_int_list(row, "wrong", path, lineno),
        span_starts=_int_list(row, "span_starts", path, lineno),
        clean_text=row.get("clean_text", ""),
        counterfactual_text=row.get("counterfactual_text", ""),
        meta=dict(row.get("meta", {})),
        origin=where,
    )

"""Datasets larger than memory: a JSONL read from disk one batch at a time.

`stream_jsonl(path, tokenizer)` gives a `StreamingDataset` over either JSONL the data layer reads: a
text JSONL (text_jsonl.py; tokenized row by row with `tokenizer`) or a tokenized mechscope dataset
(a header line, then one example per line). It is accepted wherever a `PromptPairDataset` is read
in order: `attribute` (every method, PEAP's span aggregation included), `evaluate`,
`faithfulness_curve`, `measure_behaviour`, mean references. Every pass over it (the checks against the
model, the batches, the span counts) reads the file again from the start, so memory holds one batch
of examples at a time whatever the file's size.

The schema (span names), task and metric are fixed by the header or the first row; the number of
examples by a first scan that only counts lines. A row that breaks the format is found when a pass
reaches it, with the same one-line error (file, line, field) as the in-memory loaders. `attribute`
and the evaluations check every example against the model before the first forward pass, and write
nothing until the last batch is in, so a bad row mid-file leaves no result, half-written or not.

Random access (`subset`, `split`, indexing outside the batch being processed) needs the examples in
memory: `materialize()` gives the `PromptPairDataset`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from .dataset import (
    FORMAT_VERSION,
    Batch,
    DatasetError,
    PromptPair,
    PromptPairDataset,
    Schema,
    _example_from_json,
    _header_fields,
    iter_text_lines,
    make_batch,
    parse_json_line,
    tokenizer_fingerprint,
    validate_example,
)
from ..errors import check_count
from ..fileio import atomic_path
from .spans import pad_id, schema_for
from .text_jsonl import REQUIRED, parse_text_row, tokenize_text_row

# `load_jsonl(..., stream=None)` streams files larger than this (bytes).
STREAM_ABOVE = 256 * 2**20


class _Examples:
    """`StreamingDataset.examples`: iterating streams every example from the file; indexing reaches
    the examples of the batch being processed (what the attribution and evaluation loops index)."""

    def __init__(self, owner: "StreamingDataset"):
        self._owner = owner

    def __iter__(self) -> Iterator[PromptPair]:
        return self._owner._stream()

    def __len__(self) -> int:
        return len(self._owner)

    def __getitem__(self, index):
        window = self._owner._window
        if isinstance(index, int) and index in window:
            return window[index]
        raise DatasetError(
            f"{self._owner.path}: a streamed dataset reaches only the examples of the batch being processed, not "
            f"example {index}; use dataset.materialize() for random access"
        )


class StreamingDataset:
    """A JSONL dataset read from disk batch by batch (see the module docstring). Attributes as on
    `PromptPairDataset`: schema, task, metric, model, tokenizer (fingerprint), pad_token_id, info, origin."""

    def __init__(self, path: str | os.PathLike, tokenizer=None, *, n_ctx: int | None = None,
                 task: str | None = None, metric: str = "logit_diff", limit: int | None = None):
        self.path = Path(path)
        self.n_ctx = n_ctx
        self._tokenizer = tokenizer
        self._window: dict[int, PromptPair] = {}
        first = None
        count = 0
        for lineno, line in iter_text_lines(self.path, "data file"):
            if not line.strip():
                continue
            if first is None:
                first = (lineno, parse_json_line(self.path, lineno, line))
            count += 1
        if first is None:
            raise DatasetError(f"{self.path}: no rows; expected one JSON object per line with fields "
                               f"{', '.join(REQUIRED)}")
        lineno, obj = first
        self.format = "dataset" if "mechscope_dataset" in obj else "text"
        if self.format == "dataset":
            if obj.get("mechscope_dataset") != FORMAT_VERSION or lineno != 1:
                raise DatasetError(f"{self.path}, line {lineno}: not a mechscope dataset header (field "
                                   f"'mechscope_dataset' should be {FORMAT_VERSION}, on line 1)")
            fields = _header_fields(obj, self.path)
            try:
                self._frame = PromptPairDataset(examples=[], **fields, origin=str(self.path))
            except DatasetError as exc:
                raise DatasetError(f"{self.path}, line 1: {exc}") from None
            count -= 1
            self._prepend_bos = None
        else:
            if tokenizer is None:
                raise DatasetError(f"{self.path}: a text JSONL is tokenized as it streams: give the model's tokenizer")
            row = parse_text_row(obj, self.path, lineno)
            self._names = [n for n, _ in row.clean]
            self._prepend_bos = tokenizer.bos_token_id is not None
            self._frame = PromptPairDataset(
                examples=[], schema=schema_for(row.clean, self._prepend_bos), task=task or self.path.stem,
                metric=metric, tokenizer=tokenizer_fingerprint(tokenizer), pad_token_id=pad_id(tokenizer),
                info={"source": str(self.path), "format": "text-jsonl"}, origin=str(self.path),
            )
        if limit is not None:
            limit = check_count("limit", limit)
            if limit > count:
                raise DatasetError(f"{self.path}: {limit} examples asked for, the file has {count}")
            count = limit
        if count == 0:
            raise DatasetError(f"{self.path}: the dataset has no examples")
        self._n = count
        self._stamp = self._file_stamp()

    # -- the attributes of a PromptPairDataset -------------------------------------------------------

    schema: Schema = property(lambda self: self._frame.schema)  # type: ignore[assignment]
    task: str = property(lambda self: self._frame.task)  # type: ignore[assignment]
    metric: str = property(lambda self: self._frame.metric)  # type: ignore[assignment]
    tokenizer: str = property(lambda self: self._frame.tokenizer)  # type: ignore[assignment]
    pad_token_id: int = property(lambda self: self._frame.pad_token_id)  # type: ignore[assignment]
    info: dict = property(lambda self: self._frame.info)  # type: ignore[assignment]
    origin: str = property(lambda self: self._frame.origin)  # type: ignore[assignment]

    @property
    def model(self) -> str:
        return self._frame.model

    @model.setter
    def model(self, value: str) -> None:
        self._frame.model = value

    @property
    def examples(self) -> _Examples:
        return _Examples(self)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        return self.examples[index]

    def __repr__(self) -> str:
        return f"StreamingDataset({str(self.path)!r}, {self._n} examples, schema {list(self.schema.spans)})"

    # -- passes over the file ------------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int]:
        st = self.path.stat()
        return st.st_size, st.st_mtime_ns

    def _stream(self) -> Iterator[PromptPair]:
        """Every example, read, tokenized and validated one at a time, in file order."""
        try:
            changed = self._file_stamp() != self._stamp
        except OSError:
            changed = True
        if changed:
            raise DatasetError(f"{self.path}: the file changed (or went) since it was opened as a streamed dataset")
        seen = 0
        header_seen = self.format != "dataset"
        for lineno, line in iter_text_lines(self.path, "data file"):
            if seen == self._n:
                break
            if not line.strip():
                continue
            if not header_seen:
                header_seen = True
                continue
            obj = parse_json_line(self.path, lineno, line)
            if self.format == "dataset":
                ex = _example_from_json(obj, self.path, lineno)
                validate_example(ex, self.schema, ex.origin, self.n_ctx)
            else:
                row = parse_text_row(obj, self.path, lineno, self._names)
                ex = tokenize_text_row(row, self._tokenizer, self.path, self.schema, self.n_ctx, self._prepend_bos)
            seen += 1
            yield ex
        if seen != self._n:
            raise DatasetError(f"{self.path}: {seen} examples where the first scan counted {self._n}; the file "
                               "changed while being read")

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], Batch]]:
        """Yield (indices, Batch) over the dataset in order, `batch_size` examples at a time, as
        `PromptPairDataset.batches` does; while a batch is out, `examples[i]` reaches its examples."""
        batch_size = check_count("batch_size", batch_size)
        chunk: list[PromptPair] = []
        start = 0
        try:
            for ex in self._stream():
                chunk.append(ex)
                if len(chunk) == batch_size:
                    yield self._emit(start, chunk)
                    start, chunk = start + len(chunk), []
            if chunk:
                yield self._emit(start, chunk)
        finally:
            self._window = {}

    def _emit(self, start: int, chunk: list[PromptPair]) -> tuple[list[int], Batch]:
        indices = list(range(start, start + len(chunk)))
        self._window = dict(zip(indices, chunk))
        return indices, make_batch(chunk, self.pad_token_id)

    def validate(self, n_ctx: int | None = None, source: str = "dataset") -> None:
        """DatasetError unless every example satisfies the invariants (and fits `n_ctx` tokens): one
        pass over the file; the error names the file and line."""
        for ex in self._stream():
            validate_example(ex, self.schema, ex.origin, n_ctx)

    # -- conversions ---------------------------------------------------------------------------------

    def materialize(self) -> PromptPairDataset:
        """All examples in memory, as a `PromptPairDataset` (for random access: subset, split)."""
        return self._frame._with(list(self._stream()))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenized dataset JSONL (docs/formats.md §1) one example at a time, atomically."""
        path = Path(path)
        with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps({**self._frame.header(), "n_examples": len(self)}, ensure_ascii=False) + "\n")
            for ex in self._stream():
                f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
        return path

    def _needs_memory(self, what: str):
        raise DatasetError(f"{self.path}: {what} needs the examples in memory; a streamed dataset is read in order "
                           "only (use dataset.materialize() first)")

    def subset(self, indices) -> PromptPairDataset:
        self._needs_memory("subset")

    def split(self, fraction: float = 0.5, seed: int = 0):
        self._needs_memory("split")

    def single_span(self, name: str = "all"):
        self._needs_memory("single_span")

    def batch(self, indices=None) -> Batch:
        self._needs_memory("batch")


def stream_jsonl(path: str | os.PathLike, tokenizer=None, *, n_ctx: int | None = None, task: str | None = None,
                 metric: str = "logit_diff", limit: int | None = None) -> StreamingDataset:
    """A `StreamingDataset` over a text JSONL (tokenized with `tokenizer` as it streams) or a tokenized
    dataset JSONL (`tokenizer` optional). `n_ctx`: the context every example must fit; `task`, `metric`:
    for a text JSONL (a dataset JSONL's header has its own); `limit`: the first `limit` examples only."""
    return StreamingDataset(path, tokenizer, n_ctx=n_ctx, task=task, metric=metric, limit=limit)


def load_jsonl(path: str | os.PathLike, tokenizer=None, *, stream: bool | None = None, n_ctx: int | None = None,
               task: str | None = None, metric: str = "logit_diff",
               limit: int | None = None) -> PromptPairDataset | StreamingDataset:
    """A dataset from either JSONL format: streamed (`stream=True`, or `None` and the file is larger than
    STREAM_ABOVE bytes) or read into memory."""
    path = Path(path)
    if stream is None:
        try:
            stream = path.stat().st_size > STREAM_ABOVE
        except OSError:
            stream = False  # the loader names the problem
    if stream:
        return stream_jsonl(path, tokenizer, n_ctx=n_ctx, task=task, metric=metric, limit=limit)
    from .text_jsonl import is_dataset_jsonl, load_text_jsonl

    if is_dataset_jsonl(path):
        ds = PromptPairDataset.load(path)
        if limit is not None and limit > len(ds):
            raise DatasetError(f"{path}: {limit} examples asked for, the file has {len(ds)}")
        ds = ds if limit is None else ds.subset(range(limit))
        if n_ctx is not None:
            ds.validate(n_ctx)
        return ds
    ds = load_text_jsonl(path, tokenizer, n_ctx=n_ctx, task=task, metric=metric)
    if limit is not None and limit > len(ds):
        raise DatasetError(f"{path}: {limit} examples asked for, the file has {len(ds)}")
    return ds if limit is None else ds.subset(range(limit))


__all__ = ["STREAM_ABOVE", "StreamingDataset", "load_jsonl", "stream_jsonl"]

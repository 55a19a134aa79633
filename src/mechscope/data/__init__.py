"""Datasets of clean / counterfactual prompt pairs with a schema of named spans."""

from .dataset import (
    BOS_SPAN,
    Batch,
    DatasetError,
    PromptPair,
    PromptPairDataset,
    Schema,
    tokenizer_fingerprint,
)
from .peap_csv import CsvReport, load_peap_csv
from .spans import make_pair, schema_for, single_token, tokenize_segments
from .streaming import StreamingDataset, load_jsonl, stream_jsonl
from .text_jsonl import is_dataset_jsonl, load_text_jsonl, read_text_jsonl

__all__ = [
    "BOS_SPAN",
    "Batch",
    "CsvReport",
    "DatasetError",
    "PromptPair",
    "PromptPairDataset",
    "Schema",
    "StreamingDataset",
    "is_dataset_jsonl",
    "load_text_jsonl",
    "read_text_jsonl",
    "load_jsonl",
    "load_peap_csv",
    "make_pair",
    "schema_for",
    "single_token",
    "stream_jsonl",
    "tokenize_segments",
    "tokenizer_fingerprint",
]

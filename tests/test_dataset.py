"""PromptPairDataset: JSONL round trip, batching, and errors that name file, line and field."""

from __future__ import annotations

import json

import pytest

from mechscope.data import DatasetError, PromptPair, PromptPairDataset, Schema


def small_dataset() -> PromptPairDataset:
    schema = Schema(("bos", "subject", "end"))
    examples = [
        PromptPair([1, 5, 6, 7], [1, 8, 6, 7], [9], [10], [0, 1, 3], "a b c", "x b c", {"k": 1}),
        PromptPair([1, 5, 7], [1, 8, 7], [9, 11], [], [0, 1, 2]),
    ]
    return PromptPairDataset(examples, schema, task="toy", metric="logit_diff", pad_token_id=0)


def test_round_trip_and_batch(tmp_path):
    ds = small_dataset()
    ds.save(tmp_path / "d.jsonl")
    again = PromptPairDataset.load(tmp_path / "d.jsonl")
    assert again.examples == ds.examples and again.schema == ds.schema and again.header() == ds.header()
    b = ds.batch()
    assert b.clean.tolist() == [[1, 5, 6, 7], [1, 5, 7, 0]]
    assert b.last.tolist() == [3, 2] and b.correct_mask.tolist() == [[True, False], [True, True]]
    assert ds[0].span_of_positions() == [0, 1, 1, 2]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda row: row.update(span_starts=[0, 3, 2]), "field 'span_starts'.*out of order"),
        (lambda row: row.update(span_starts=[0, 1, 9]), "field 'span_starts'.*past the prompt length"),
        (lambda row: row.update(counterfactual=[1, 8, 6]), "field 'counterfactual'.*same token length"),
        (lambda row: row.pop("correct"), "missing field 'correct'"),
        (lambda row: row.update(clean="1 5 6 7"), "field 'clean' must be a list of integers"),
        (lambda row: row.update(wrong=[9]), "fields 'correct'/'wrong': a token is both correct and wrong"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, change, message):
    path = small_dataset().save(tmp_path / "d.jsonl")
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    change(row)
    lines[1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=f"d.jsonl, line 2: {message}"):
        PromptPairDataset.load(path)


def test_not_json_and_not_a_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"mechscope_dataset": 1, "schema": ["bos"], "metric": "logit_diff"}\n{oops\n')
    with pytest.raises(DatasetError, match="line 2: not valid JSON"):
        PromptPairDataset.load(path)
    path.write_text('{"hello": 1}\n')
    with pytest.raises(DatasetError, match="line 1: not a mechscope dataset header"):
        PromptPairDataset.load(path)


def test_failed_save_leaves_nothing_behind(tmp_path):
    ds = small_dataset()
    ds.examples[0].meta = {"unserialisable": object()}
    with pytest.raises(TypeError):
        ds.save(tmp_path / "d.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_byte_order_mark_is_ignored_and_origins_follow_the_examples(tmp_path):
    """A UTF-8 byte-order mark (as some editors write) loads the same dataset; every example keeps its
    file and line through subsets, splits and single_span, without changing equality or the file."""
    ds = small_dataset()
    path = ds.save(tmp_path / "d.jsonl")
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    again = PromptPairDataset.load(marked)
    assert again.examples == ds.examples and again.header() == ds.header()
    assert [ex.origin for ex in again.examples] == [f"{marked}, line 2", f"{marked}, line 3"]
    assert again.origin == str(marked)
    first, rest = again.split(0.5, seed=1)
    assert {ex.origin for ex in first.examples + rest.examples} == {ex.origin for ex in again.examples}
    assert again.single_span()[1].origin == f"{marked}, line 3" and again[1:].origin == str(marked)
    assert again.save(tmp_path / "copy.jsonl").read_text() == path.read_text()  # origins are not saved
    again.examples[1].clean = again.examples[1].clean * 3
    again.examples[1].counterfactual = again.examples[1].counterfactual * 3
    again.examples[1].span_starts = [0, 1, 2]
    with pytest.raises(DatasetError, match=f"marked.jsonl, line 3: field 'clean': 9 tokens is longer than the "
                                           r"model's context \(8\)"):
        again.validate(n_ctx=8)
    with pytest.raises(DatasetError, match=r"dataset: example 1: field 'clean': 9 tokens"):
        PromptPairDataset(again.examples[:1] + [PromptPair(**{**again.examples[1].__dict__, "origin": ""})],
                          again.schema).validate(n_ctx=8)

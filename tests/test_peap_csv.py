"""The PEAP CSV loader (docs/method.md §8): modes, span re-derivation, answers and bad input."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from mechscope.data import DatasetError, PromptPairDataset, peap_csv, tokenize_segments
from mechscope.data.peap_csv import (
    METADATA_COLUMNS,
    CsvReport,
    _contested,
    _fit,
    _learn_counts,
    _place,
    _Placement,
    _prompt,
    _rederive,
    _Rejected,
    infer_task,
    load_peap_csv,
)

PEAP = Path(__file__).resolve().parent / "data" / "peap"  # excerpts of the PEAP authors' files; see NOTICE.md there

SPANS = ["start", "IO", "and", "S1", "event", "punct", "S2", "rest"]
CLEAN_SEGMENTS = [
    ("start", "When"),
    ("IO", " Mary"),
    ("and", " and"),
    ("S1", " John"),
    ("event", " went to the store"),
    ("punct", ","),
    ("S2", " John"),
    ("rest", " gave a drink to"),
]
CF_SEGMENTS = [
    ("start", "When"),
    ("IO", " Alice"),
    ("and", " and"),
    ("S1", " Bob"),
    ("event", " went to the store"),
    ("punct", ","),
    ("S2", " Tom"),
    ("rest", " gave a drink to"),
]
HEADER = ["", "prompt", "prompt_id"] + SPANS + ["length", "correct_token", "wrong_token", "split"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def csv_row(tokenizer, segments, index=0, **extra) -> dict:
    """A PEAP row whose indices are this tokenizer's own (BOS at 0)."""
    ids, starts = tokenize_segments(tokenizer, segments, prepend_bos=True)
    row = {"": str(index), "prompt": "".join(t for _, t in segments), "prompt_id": str(100 + index)}
    row.update({name: str(s) for (name, _), s in zip(segments, starts[1:])})
    row.update(length=str(len(ids)), correct_token=" Mary", wrong_token=" John", split="circuit")
    row.update({k: str(v) for k, v in extra.items()})
    return row


def write_csv(path: Path, rows: list[dict], header: list[str] = HEADER) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(h, "") for h in header])
    return path


def good_pair(tokenizer, n=2):
    clean = [csv_row(tokenizer, CLEAN_SEGMENTS, i) for i in range(n)]
    cf = [csv_row(tokenizer, CF_SEGMENTS, i) for i in range(n)]
    return clean, cf


def load_rows(tmp_path, tokenizer, clean_rows, cf_rows, header=HEADER, cf_header=None, **kw):
    c = write_csv(tmp_path / "toy_clean.csv", clean_rows, header)
    x = write_csv(tmp_path / "toy_counter.csv", cf_rows, cf_header or header)
    return load_peap_csv(c, x, tokenizer, **kw)


def expect_error(tmp_path, tokenizer, clean_rows, cf_rows, *needles, **kw):
    with pytest.raises(DatasetError) as info:
        load_rows(tmp_path, tokenizer, clean_rows, cf_rows, **kw)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def decoded_spans(tokenizer, ds, ex, which="clean"):
    ids = getattr(ex, which)
    return {name: tokenizer.decode(ids[a:b]) for name, (a, b) in zip(ds.schema.spans, ex.span_bounds())}


# ------------------------------------------------------------------------------------------------
# modes
# ------------------------------------------------------------------------------------------------


def test_indices_mode_when_the_tokenizer_fits(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer, n=3)
    c = write_csv(tmp_path / "toy_clean.csv", clean)
    x = write_csv(tmp_path / "toy_counter.csv", cf)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    ds, report = load_peap_csv(c, x, tiny_tokenizer)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing written
    assert isinstance(report, CsvReport)
    assert (report.mode, report.rows_read, report.rows_kept, report.excluded) == ("indices", 3, 3, [])
    assert ds.schema.spans == ("bos", *SPANS)
    assert (ds.task, ds.metric, ds.info["csv_mode"]) == ("custom", "logit_diff", "indices")
    ids, starts = tokenize_segments(tiny_tokenizer, CLEAN_SEGMENTS)
    ex = ds.examples[0]
    assert ex.clean == ids and ex.span_starts == starts
    assert ex.counterfactual == tokenize_segments(tiny_tokenizer, CF_SEGMENTS)[0]
    assert ex.correct == tiny_tokenizer(" Mary", add_special_tokens=False)["input_ids"]
    assert ex.wrong == tiny_tokenizer(" John", add_special_tokens=False)["input_ids"]
    assert ex.meta["row"] == 1 and ex.meta["prompt_id"] == "100" and ex.meta["split"] == "circuit"
    assert decoded_spans(tiny_tokenizer, ds, ex)["event"] == " went to the store"
    ds.validate()


def test_indices_mode_without_bos(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    ds, report = load_rows(tmp_path, tiny_tokenizer, clean, cf, prepend_bos=False)
    assert report.mode == "indices"
    assert ds.schema.spans == tuple(SPANS)
    ids, starts = tokenize_segments(tiny_tokenizer, CLEAN_SEGMENTS, prepend_bos=False)
    assert ds.examples[0].clean == ids and ds.examples[0].span_starts == starts
    ds.validate()


def test_rederived_mode_recovers_span_text(tmp_path, tiny_tokenizer):
    """Indices from a tokenizer that split ' drink' in two: the rows agree on it, and every row fits."""
    other = [(n, " had a long day" if n == "event" else t) for n, t in CLEAN_SEGMENTS]
    other_cf = [(n, " had a long day" if n == "event" else t) for n, t in CF_SEGMENTS]
    clean = [csv_row(tiny_tokenizer, CLEAN_SEGMENTS, 0), csv_row(tiny_tokenizer, other, 1)]
    cf = [csv_row(tiny_tokenizer, CF_SEGMENTS, 0), csv_row(tiny_tokenizer, other_cf, 1)]
    for row in clean + cf:
        row["length"] = str(int(row["length"]) + 1)
    ds, report = load_rows(tmp_path, tiny_tokenizer, clean, cf)
    assert (report.mode, report.rows_kept, report.excluded, report.ambiguous) == ("rederived", 2, [], [])
    # ' went' or ' the' in two tokens would fit the first row as well, each with a span one word on,
    # but only ' drink' fits both rows
    assert report.learned_counts == {" drink": 2}
    assert report.kept_by == {"exact": 2}
    assert ds.info["rows_kept_by"] == {"exact": 2} and ds.info["learned_word_counts"] == {" drink": 2}
    ex = ds.examples[0]
    assert (ex.clean, ex.span_starts) == tokenize_segments(tiny_tokenizer, CLEAN_SEGMENTS)
    assert ex.counterfactual == tokenize_segments(tiny_tokenizer, CF_SEGMENTS)[0]
    assert ex.meta["span_text"] == dict(CLEAN_SEGMENTS)
    assert ds.examples[1].meta["span_text"] == dict(other)
    spans = decoded_spans(tiny_tokenizer, ds, ex, "counterfactual")
    assert (spans["IO"], spans["S1"], spans["S2"]) == (" Alice", " Bob", " Tom")


def test_rederived_mode_leaves_out_ambiguous_rows(tmp_path, tiny_tokenizer):
    """' Mary' in two tokens in one row only: shifting every later boundary by one word fits the counts
    as well, so the row is left out as ambiguous, never placed by a guess."""
    clean, cf = good_pair(tiny_tokenizer, n=2)
    for row in (clean[1], cf[1]):
        for name in SPANS[2:] + ["length"]:
            row[name] = str(int(row[name]) + 1)
    ds, report = load_rows(tmp_path, tiny_tokenizer, clean, cf)
    assert (report.mode, report.rows_kept, report.ambiguous) == ("rederived", 1, [2])
    assert report.excluded_by == {"ambiguous": 1} and report.kept_by == {"exact": 1}
    assert ds.info["rows_ambiguous"] == 1 and ds.examples[0].meta["row"] == 1
    (row, reason), = report.excluded
    assert row == 2
    assert reason.startswith("clean prompt: the spans fit the token counts equally well in more than one way")
    assert report.summary()[:2] == [
        "kept 1: fit the token counts exactly (1)",
        "excluded 1: ambiguous: the spans fit equally well in more than one place (1)",
    ]
    # with no row left, loading fails and says why
    expect_error(
        tmp_path, tiny_tokenizer, clean[1:], cf[1:], "toy_clean.csv", "no row could be converted",
        "excluded 1: ambiguous",
    )


def _one_token_per_atom(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    assert "".join(pieces) == text
    offsets, at = [], 0
    for p in pieces:
        offsets.append((at, at + len(p)))
        at += len(p)
    return offsets


def _spans(text: str, chars: list[int]) -> list[str]:
    return [text[a:b] for a, b in zip(chars, chars[1:] + [len(text)])]


def test_rederive_exact_fit_and_ambiguity():
    text = "We went to the supermarket, and then home"
    words = ["We", " went", " to", " the", " supermarket", ",", " and", " then", " home"]
    # the file's tokenizer gave the first span (five words) six tokens
    starts, length = [1, 7, 8], 11
    # this tokenizer splits ' supermarket' too: its own counts fit exactly
    own = _one_token_per_atom(text, words[:4] + [" super", "market"] + words[5:])
    placed = _rederive(text, length, starts, own)
    assert (placed.cost, placed.kind) == (0, "exact")
    assert _spans(text, placed.chars) == ["We went to the supermarket", ",", " and then home"]
    # one token per word: ',' may join the first span and a later word take the extra token, or a
    # word of the first span take it: equal fits, so the spans cannot be told
    own = _one_token_per_atom(text, words)
    rejected = _rederive(text, length, starts, own)
    assert isinstance(rejected, _Rejected) and rejected.kind == "ambiguous"
    assert "equally well" in rejected.detail
    # ... unless one word's count is known
    placed = _rederive(text, length, starts, own, learned={" supermarket": 2})
    assert (placed.cost, placed.kind) == (0, "exact")
    assert _spans(text, placed.chars) == ["We went to the supermarket", ",", " and then home"]


def _prompts(rows, length, starts):
    """(text, pieces) rows, cut one token per piece, as prompts of the file."""
    return [_prompt(text, length, starts, _one_token_per_atom(text, pieces)) for text, pieces in rows]


def _row(subject: str, rest: str, pieces: dict[str, list[str]] | None = None):
    """A WinoBias-like prompt and its pieces, one per word unless `pieces` cuts a word."""
    text = f"{subject}{rest}. The pronoun she refers to the"
    words = re.findall(r"\s*\w+|\s*[^\w\s]+", text)
    return text, [q for w in words for q in (pieces or {}).get(w, [w])]


def test_learned_counts_fit_the_most_rows():
    """The agent-schema WinoBias file in small: ' The pronoun' and ' refers to' are spans of two words
    each, and the file's tokenizer made ' pronoun' two tokens. ' to' in two tokens fits the rows where
    ' to' occurs only in ' refers to' (every span around the pronoun then one word off); ' pronoun' in
    two fits every row, and is learned."""
    # spans: subject, rest, dot, The pronoun, she, refers to, the
    rows = [_row("The guard", " was tired"), _row("A nurse", " felt ill"), _row("Our cook", " is late")]
    starts, length = [1, 3, 5, 6, 9, 10, 12], 13
    rows += [_row("My guard", " went to bed"), _row("Her nurse", " wanted to go")]  # another ' to'
    prompts = _prompts(rows[:3], length, starts) + _prompts(rows[3:], length + 1, [1, 3, 6, 7, 10, 11, 13])
    learned = _learn_counts(prompts)
    assert learned == {" pronoun": 2}
    # ' The' in two tokens fits the same rows but places every span alike; ' to' fits three rows
    # fewer: no row is contested
    assert _contested(prompts, learned) == {}
    for p in prompts:
        placed = _place(p, learned)
        assert isinstance(placed, _Placement) and placed.kind == "exact"
        assert _spans(p.text, placed.chars)[3:] == [" The pronoun", " she", " refers to", " the"]
    # with one row holding another ' to', ' to' in two tokens fits only one row fewer: the rows it
    # would place differently cannot be told, and are contested
    few = prompts[:4]
    assert _learn_counts(few) == {" pronoun": 2}
    assert set(_contested(few, {" pronoun": 2})) == {0, 1, 2}


def test_rederive_learns_word_counts_across_rows():
    """Like the WinoBias files: the file's tokenizer made ' pronoun' two tokens; in one row this
    tokenizer also splits ' smelled', which the file's did not, and the counts cancel out."""
    rows = [_row("The guard", " was tired"), _row("A nurse", " felt ill"), _row("Our cook", " is late")]
    rows.append(_row("The guard", " smelled awful", {" smelled": [" sm", "elled"]}))
    # spans subject, rest, dot, The, pronoun, she, refers, to, the
    prompts = _prompts(rows, 13, [1, 3, 5, 6, 7, 9, 10, 11, 12])
    text = rows[3][0]
    wrong = _place(prompts[3], {})
    assert wrong.kind == "exact"  # this tokenizer's own cut fits the counts: every span shifted by a word
    assert text[wrong.chars[2] :].startswith(" awful")
    learned = _learn_counts(prompts)
    assert learned == {" pronoun": 2}  # ' smelled' in one token fits one row only: not learned
    assert _contested(prompts, learned) == {}
    again = _place(prompts[3], learned)
    # the closest fit (' smelled' one token) is the only one that close
    assert (again.kind, again.cost) == ("closest", 1)
    spans = _spans(text, again.chars)
    assert spans == ["The guard", " smelled awful", ".", " The", " pronoun", " she", " refers", " to", " the"]
    # had every row held ' was', ' was' in two tokens would fit every row but the last (where ' pronoun'
    # in two needs ' smelled' in one as well): too close to tell, so every row is contested
    rows = [_row("The guard", " was tired"), _row("A nurse", " was ill"), _row("Our cook", " was late")]
    rows.append(_row("The guard", " smelled awful", {" smelled": [" sm", "elled"]}))
    prompts = _prompts(rows, 13, [1, 3, 5, 6, 7, 9, 10, 11, 12])
    learned = _learn_counts(prompts)
    assert learned == {" was": 2}
    assert set(_contested(prompts, learned)) == {0, 1, 2, 3}


AGENT = "llama3_winobias_agent_schema_anti_female_first_prof.csv"  # the WinoBias file with the LLM's schema
AGENT_ROW_1 = {  # the spans its first row means
    "Subject": "The farmer",
    "Action": " gave",
    "Primary_Object": " a free ride",
    "Secondary_Object": " to the counselor",
    "Causal_Connector": " because",
    "Pronoun": " she",
    "Reason": " wanted to repay a favor",
    "Sentence_Break": ".",
    "Pronoun_Reference": " The pronoun",
    "Referenced_Pronoun": " she",
    "Reference_Verb": " refers to",
    "Final_Token": " the",
}


def test_agent_schema_file_learns_pronoun_not_to():
    """The real file, with a stand-in tokenizer of one token per word (no model needed): every prompt
    ends in " The pronoun she refers to the", two spans of two words around ' she'. With the stand-in's
    counts alone, ' to' in two tokens fits 476 of the 984 prompts (clean and swapped), with every span
    around the pronoun one word off; ' pronoun' in two fits 866, and is learned."""
    table = peap_csv._read_table(PEAP / AGENT)
    columns = peap_csv._span_columns(table, None)
    assert columns == list(AGENT_ROW_1)
    swapped = peap_csv._swapped_pronouns(table)
    peap_csv._parse_rows(table, columns)
    peap_csv._parse_rows(swapped, columns)
    rows = table.rows + swapped.rows
    pieces = [re.findall(r"\s*\w+|\s*[^\w\s]+", r.prompt) for r in rows]
    prompts = [
        _prompt(r.prompt, r.length, r.starts, _one_token_per_atom(r.prompt, w)) for r, w in zip(rows, pieces)
    ]
    fit = lambda counts: sum(_fit(p, p.expected(counts)) is not None for p in prompts)  # noqa: E731
    assert (fit({}), fit({" to": 2}), fit({" pronoun": 2})) == (0, 476, 866)
    learned = _learn_counts(prompts)
    assert learned == {" pronoun": 2, " trustful": 2, " outran": 2}
    assert _contested(prompts, learned) == {}
    kinds = []
    for row, p in zip(rows, prompts):
        placed = _place(p, learned)
        kinds.append(placed.kind)
        if placed.kind == "ambiguous":
            # ' admires' and ' appreciates' are two tokens each for Llama-3: a row two tokens short,
            # which one word two tokens off (' talent') would fit as well as the two
            assert " admires" in p.texts and " appreciates" in p.texts
            continue
        assert placed.kind == "exact", row.number
        spans = dict(zip(columns, _spans(p.text, placed.chars)))
        assert spans["Pronoun_Reference"] == " The pronoun", (row.number, spans)
        assert spans["Referenced_Pronoun"] in (" she", " her", " he", " his", " him")
        assert (spans["Reference_Verb"], spans["Final_Token"]) == (" refers to", " the")
    assert (kinds.count("exact"), kinds.count("ambiguous")) == (952, 32)
    first = _place(prompts[0], learned)
    assert dict(zip(columns, _spans(prompts[0].text, first.chars))) == AGENT_ROW_1


def test_rederive_reports_when_nothing_fits():
    text = "We went home"
    own = _one_token_per_atom(text, ["We", " went", " home"])
    nothing = _rederive(text, 3, [1, 2], own)  # three words cannot be two tokens
    assert nothing.kind == "no fit" and "no split" in nothing.detail


def test_digit_tie_break_splits_years_two_and_two():
    text = "from the year 1453 to"
    # this tokenizer's own tokens: every digit alone, as SmolLM2 does
    own = _one_token_per_atom(text, ["from", " the", " year", " ", "1", "4", "5", "3", " to"])
    # GPT-2 indices: from=1 the=2 year=3 ' 14'=4 '53'=5 to=6, length 7
    placed = _rederive(text, 7, [1, 2, 3, 4, 5, 6], own)
    assert [text[c:] for c in placed.chars][3:5] == [" 1453 to", "53 to"]


def test_span_columns_and_metadata(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    assert {"", "prompt", "length", "label", "split", "correct_token"} <= METADATA_COLUMNS
    ds, _ = load_rows(tmp_path, tiny_tokenizer, clean, cf)
    assert ds.schema.spans == ("bos", *SPANS)  # '' and prompt_id are metadata, in file order
    # explicit span columns: merge 'and' into the IO span and 'punct' into 'event'
    ds, _ = load_rows(
        tmp_path, tiny_tokenizer, clean, cf, span_columns=["start", "IO", "S1", "event", "S2", "rest"],
    )
    assert ds.schema.spans == ("bos", "start", "IO", "S1", "event", "S2", "rest")
    assert decoded_spans(tiny_tokenizer, ds, ds.examples[0])["IO"] == " Mary and"
    ds, _ = load_rows(tmp_path, tiny_tokenizer, clean, cf, task="ioi")
    assert ds.task == "ioi"


def test_task_from_file_name():
    assert infer_task("gpt2_greater_than_clean.csv") == "greater-than"
    assert infer_task("x/gpt2_ioi_abba_llm_schema_counter.csv") == "ioi"
    assert infer_task("llama3_winobias_anti_male_second_prof.csv") == "winobias"
    assert infer_task("radioisotopes.csv") == "custom"


# ------------------------------------------------------------------------------------------------
# bad input: each error names the file, the row and the field
# ------------------------------------------------------------------------------------------------


def test_spans_out_of_order(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    clean[1]["S1"] = "2"
    expect_error(
        tmp_path, tiny_tokenizer, clean, cf, "toy_clean.csv", "data row 2 (line 3)", "field 'S1'",
        "order",
    )


def test_first_span_must_follow_bos(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    clean[0]["start"] = cf[0]["start"] = "0"
    expect_error(
        tmp_path, tiny_tokenizer, clean, cf, "toy_clean.csv", "data row 1", "field 'start'", "index 1",
    )


def test_index_past_length(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    cf[0]["rest"] = str(int(cf[0]["length"]) + 1)
    expect_error(tmp_path, tiny_tokenizer, clean, cf, "toy_counter.csv", "data row 1", "field 'rest'", "past")


def test_row_count_mismatch(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer, n=3)
    expect_error(tmp_path, tiny_tokenizer, clean, cf[:2], "toy_counter.csv", "2 data rows", "has 3")


def test_clean_counterfactual_length_mismatch(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    cf[1]["length"] = str(int(cf[1]["length"]) + 1)
    expect_error(tmp_path, tiny_tokenizer, clean, cf, "toy_counter.csv", "data row 2", "field 'length'")


def test_clean_counterfactual_span_mismatch(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    cf[0]["event"] = str(int(cf[0]["event"]) + 1)
    expect_error(tmp_path, tiny_tokenizer, clean, cf, "toy_counter.csv", "data row 1", "field 'event'")


def test_missing_column(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    header = [h for h in HEADER if h != "length"]
    expect_error(
        tmp_path, tiny_tokenizer, clean, cf, "toy_counter.csv", "header", "field 'length'",
        cf_header=header,
    )
    header = [h for h in HEADER if h != "wrong_token"]
    expect_error(tmp_path, tiny_tokenizer, clean, cf, "toy_clean.csv", "field 'wrong_token'", header=header)


def test_span_columns_differ_between_files(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    header = [h for h in HEADER if h != "punct"]
    expect_error(tmp_path, tiny_tokenizer, clean, cf, "toy_counter.csv", "span columns", cf_header=header)


def test_missing_value(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    clean[1]["correct_token"] = ""
    expect_error(
        tmp_path, tiny_tokenizer, clean, cf, "toy_clean.csv", "data row 2", "field 'correct_token'",
        "missing",
    )


def test_non_integer_span_cell(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    clean[0]["event"] = "five"
    expect_error(
        tmp_path, tiny_tokenizer, clean, cf, "toy_clean.csv", "data row 1", "field 'event'",
        "not an integer",
    )


def test_answer_not_a_single_token(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    clean[1]["wrong_token"] = " Laura"  # five tokens for the tiny tokenizer
    expect_error(
        tmp_path, tiny_tokenizer, clean, cf, "toy_clean.csv", "data row 2", "field 'wrong_token'",
        "not one",
    )


def test_prompt_longer_than_context(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    expect_error(
        tmp_path, tiny_tokenizer, clean, cf, "toy_clean.csv", "data row 1", "field 'prompt'", "n_ctx=8",
        n_ctx=8,
    )
    ds, _ = load_rows(tmp_path, tiny_tokenizer, clean, cf, n_ctx=int(clean[0]["length"]))
    assert len(ds) == 2


def test_no_answers(tmp_path, tiny_tokenizer):
    clean, cf = good_pair(tiny_tokenizer)
    header = [h for h in HEADER if h not in ("correct_token", "wrong_token")]
    expect_error(tmp_path, tiny_tokenizer, clean, cf, "toy_clean.csv", "no answers", header=header)


def test_greater_than_label_errors(tmp_path, tiny_tokenizer):
    header = ["", "prompt", "A", "B", "length", "label"]
    prompt = "The war lasted from the year 1732 to the year 17"
    row = {"": "0", "prompt": prompt, "A": "1", "B": "7", "length": "12", "label": "year"}
    expect_error(
        tmp_path, tiny_tokenizer, [row], [dict(row)], "toy_clean.csv", "data row 1", "field 'label'",
        header=header,
    )
    row["label"] = "32"  # a fine label, but this toy tokenizer cannot score greater-than
    expect_error(
        tmp_path, tiny_tokenizer, [row], [dict(row)], "toy_clean.csv", "field 'label'",
        "cannot be scored", header=header,
    )


def test_counterfactual_file_required(tmp_path, tiny_tokenizer):
    clean, _ = good_pair(tiny_tokenizer)
    path = write_csv(tmp_path / "only.csv", clean)
    with pytest.raises(DatasetError, match="counterfactual"):
        load_peap_csv(path, None, tiny_tokenizer)
    with pytest.raises(DatasetError, match="no such CSV file"):
        load_peap_csv(path, tmp_path / "absent.csv", tiny_tokenizer)


# ------------------------------------------------------------------------------------------------
# the PEAP authors' files (excerpts in tests/data/peap), with SmolLM2's tokenizer
# ------------------------------------------------------------------------------------------------


def _read(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _check_loaded(ds: PromptPairDataset, report: CsvReport, tmp_path):
    assert report.rows_kept == len(ds) > 0
    assert report.rows_kept + len(report.excluded) == report.rows_read
    ds.validate()
    again = PromptPairDataset.load(ds.save(tmp_path / "roundtrip.jsonl"))
    assert again.schema == ds.schema and again.examples[0].clean == ds.examples[0].clean


@pytest.mark.slow
def test_peap_greater_than(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    ds, report = load_peap_csv(
        PEAP / "gpt2_greater_than_clean.csv", PEAP / "gpt2_greater_than_counter.csv", tok
    )
    _check_loaded(ds, report, tmp_path)
    assert (report.mode, ds.task, ds.metric) == ("rederived", "greater-than", "prob_diff")
    assert ds.info["scoring"] == "next-digit"  # SmolLM2 writes every digit as a token
    assert ds.schema.spans[:1] == ("bos",) and "XX1" in ds.schema.spans and "YY" in ds.schema.spans
    digit = {d: tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)}
    for ex in ds.examples:
        yy = int(ex.meta["label"])  # some labels lost their leading zero ("9" for 09)
        year = ex.clean_text.split(" year ")[1].split()[0]
        spans = decoded_spans(tok, ds, ex)
        assert spans["XX1"] == " " + year[:2]  # SmolLM2's space token goes with XX1
        assert spans["YY"] == f"{yy:02d}" == year[2:]
        assert spans["XX2"] == " " + year[:2]
        assert decoded_spans(tok, ds, ex, "counterfactual")["YY"] == "01"
        tens = yy // 10
        assert ex.correct == [digit[d] for d in range(tens + 1, 10)]
        assert ex.wrong == [digit[d] for d in range(tens)]
    # next-digit scoring cannot say "greater than 9x": exactly those rows are left out
    labels = {i + 1: int(r["label"]) for i, r in enumerate(_read(PEAP / "gpt2_greater_than_clean.csv"))}
    assert {n for n, _ in report.excluded} == {n for n, yy in labels.items() if yy >= 90}
    assert report.ambiguous == []
    assert all("field 'label'" in reason for _, reason in report.excluded)
    # every year is cut " 14" + "53" (the even cut; " 1453" + " 1" + "4" would cost as much)
    assert report.kept_by == {"closest": 176} and report.excluded_by == {"label": 24}


@pytest.mark.slow
def test_peap_ioi(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    ds, report = load_peap_csv(
        PEAP / "gpt2_ioi_abba_llm_schema_clean.csv", PEAP / "gpt2_ioi_abba_llm_schema_counter.csv", tok
    )
    _check_loaded(ds, report, tmp_path)
    assert (report.mode, ds.task, ds.metric) == ("rederived", "ioi", "logit_diff")
    for ex in ds.examples:
        spans = decoded_spans(tok, ds, ex)
        assert spans["First_Person"] == ex.meta["IO_token"]
        assert spans["Second_Person"] == ex.meta["S1_token"]
        # the file's own schema sometimes puts "afterwards" in Active_Person
        assert spans["Active_Person"].endswith(ex.meta["S2_token"])
        assert ex.correct == tok(ex.meta["correct_token"], add_special_tokens=False)["input_ids"]
        assert ex.wrong == tok(ex.meta["wrong_token"], add_special_tokens=False)["input_ids"]
    # the loss comes from names that are several SmolLM2 tokens, never from an unplaceable row
    assert not any("no split" in reason for _, reason in report.excluded)
    assert report.ambiguous == []
    assert report.kept_by == {"exact": 59} and report.excluded_by == {"pair": 89, "answer": 2}
    assert report.rows_kept / report.rows_read > 0.25


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["llama3_winobias_anti_male_second_prof.csv", "llama3_winobias_pro_female_first_prof.csv"]
)
def test_peap_winobias(smollm2_tokenizer, tmp_path, name):
    tok = smollm2_tokenizer
    # the two WinoBias files hold different prompts, not clean / counterfactual pairs: pair each with
    # itself to check spans and answers
    ds, report = load_peap_csv(PEAP / name, PEAP / name, tok)
    _check_loaded(ds, report, tmp_path)
    assert (report.mode, ds.task, ds.metric) == ("rederived", "winobias", "logit_diff")
    for ex in ds.examples:
        spans = decoded_spans(tok, ds, ex)
        assert spans["pronoun"] == " pronoun"  # two Llama-3 tokens, one SmolLM2 token
        assert spans["dot"] == "."
        # the file's own schema sometimes puts words before the conjunction (" on a ride because")
        assert {"because", "but", "as", "if"} & set(spans["conjunction"].split())
        assert spans["refers"] == " refers"
        assert spans["the"] == " the"
        assert spans["second_pronoun"] == spans["first_pronoun"] in (" he", " she", " his", " her", " him")
        assert spans["correct_profession"].endswith(ex.meta["correct_token"])
        assert spans["wrong_profession"].endswith(ex.meta["wrong_token"])
        assert ex.correct == tok(ex.meta["correct_token"], add_special_tokens=False)["input_ids"]
    assert all("is 2 tokens for this tokenizer" in reason for _, reason in report.excluded)
    assert report.rows_kept / report.rows_read > 0.85
    # every row holds ' pronoun', so the rows agree that the file's tokenizer gave it two tokens
    assert report.learned_counts[" pronoun"] == 2
    assert report.ambiguous == []
    assert report.kept_by == {"exact": 137} and report.excluded_by == {"answer": 13}


@pytest.mark.slow
def test_peap_winobias_with_swapped_pronoun_counterfactual(smollm2_tokenizer):
    """The WinoBias files have no counterfactual file; the he <-> she rule makes one, end to end."""
    tok = smollm2_tokenizer
    name = "llama3_winobias_pro_female_first_prof.csv"
    ds, report = load_peap_csv(PEAP / name, None, tok, counterfactual_rule="swap-pronouns")
    assert report.rows_kept / report.rows_read > 0.85
    swaps = {" he": " she", " she": " he"}
    for ex in ds.examples:
        clean, cf = decoded_spans(tok, ds, ex), dict(
            zip(ds.schema.spans, [tok.decode(ex.counterfactual[a:b]) for a, b in ex.span_bounds()])
        )
        assert cf["pronoun"] == " pronoun" and cf["dot"] == "."
        if clean["first_pronoun"] in swaps:
            assert cf["first_pronoun"] == swaps[clean["first_pronoun"]]
        assert ex.clean != ex.counterfactual or clean["first_pronoun"] not in swaps
    with pytest.raises(DatasetError, match="counterfactual CSV file is required"):
        load_peap_csv(PEAP / name, None, tok)


@pytest.mark.slow
def test_peap_winobias_agent_schema(smollm2_tokenizer, tmp_path):
    """The WinoBias file with the LLM's schema, for SmolLM2, whose counts differ from Llama-3's at
    ' pronoun' (and at ' cashier' and ' mover', which are answers SmolLM2 cuts in two). Every kept row
    fits the learned counts exactly, with the spans the file means."""
    tok = smollm2_tokenizer
    ds, report = load_peap_csv(PEAP / AGENT, None, tok, counterfactual_rule="swap-pronouns")
    _check_loaded(ds, report, tmp_path)
    assert (report.mode, ds.task) == ("rederived", "winobias")
    assert (report.rows_read, report.rows_kept, report.ambiguous) == (492, 438, [])
    assert report.kept_by == {"exact": 438} and report.excluded_by == {"answer": 54}
    assert report.learned_counts == {" pronoun": 2, " cashier": 1, " mover": 1}
    assert report.summary() == [
        "kept 438: fit the token counts exactly (438)",
        "excluded 54: answer not one token for this tokenizer (54)",
        "token counts learned for the file's tokenizer: ' cashier' 1, ' mover' 1, ' pronoun' 2",
    ]
    assert ds.examples[0].meta["row"] == 1 and ds.examples[0].meta["span_text"] == AGENT_ROW_1
    swaps = {" she": " he", " her": " her"}  # the rule swaps he and she only
    for ex in ds.examples:
        spans = decoded_spans(tok, ds, ex)
        assert spans["Pronoun_Reference"] == " The pronoun"
        assert spans["Reference_Verb"] == " refers to" and spans["Final_Token"] == " the"
        assert spans["Sentence_Break"] in (".", "")  # the file's schema leaves it empty in 13 rows
        assert spans["Subject"].startswith("The ") and spans["Causal_Connector"] in (" because", " as", "")
        assert "".join(spans[s] for s in ds.schema.spans[1:]) == ex.clean_text
        cf = decoded_spans(tok, ds, ex, "counterfactual")
        assert cf["Referenced_Pronoun"] == swaps[spans["Referenced_Pronoun"]]
        assert spans["Subject"] == "The" + ex.meta["correct_token"]  # the first profession is the answer


@pytest.mark.slow
def test_peap_winobias_agent_schema_two_tokenizers_agree(smollm2_tokenizer):
    """Gemma-3's tokenizer differs from the file's on other words: ' admires' and ' appreciates' are one
    Gemma token each and, by the file's indices, two (as for SmolLM2). Rows holding both are two tokens
    short, which one word two tokens off would fit as well: they are left out as ambiguous. Every row
    both conversions keep has the same span text."""
    from mechscope.models import load_tokenizer

    smol, _ = load_peap_csv(PEAP / AGENT, None, smollm2_tokenizer, counterfactual_rule="swap-pronouns")
    gemma, report = load_peap_csv(
        PEAP / AGENT, None, load_tokenizer("gemma3-270m"), counterfactual_rule="swap-pronouns"
    )
    assert (report.rows_kept, report.kept_by, report.excluded_by) == (476, {"exact": 476}, {"ambiguous": 16})
    assert len(report.ambiguous) == 16 and report.learned_counts == {" pronoun": 2}
    by_row = {ex.meta["row"]: ex.meta["span_text"] for ex in smol.examples}
    shared = [ex for ex in gemma.examples if ex.meta["row"] in by_row]
    assert len(shared) == 424
    assert all(ex.meta["span_text"] == by_row[ex.meta["row"]] for ex in shared)

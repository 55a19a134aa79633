"""The PEAP CSV loader (docs/method.md §8): modes, span re-derivation, answers and bad input."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from mechscope.data import DatasetError, PromptPairDataset, tokenize_segments
from mechscope.data.peap_csv import (
    METADATA_COLUMNS,
    CsvReport,
    _learn_word_counts,
    _rederive,
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
    """Indices from a tokenizer that split ' drink' in two."""
    clean, cf = good_pair(tiny_tokenizer, n=1)
    for row in (clean[0], cf[0]):
        row["length"] = str(int(row["length"]) + 1)
    ds, report = load_rows(tmp_path, tiny_tokenizer, clean, cf)
    assert (report.mode, report.rows_kept, report.excluded) == ("rederived", 1, [])
    # (' went to the' in four tokens and every later span one word on would fit the counts as well;
    # the later disagreement wins, and the row is flagged)
    assert report.ambiguous == [1]
    ex = ds.examples[0]
    assert (ex.clean, ex.span_starts) == tokenize_segments(tiny_tokenizer, CLEAN_SEGMENTS)
    assert ex.counterfactual == tokenize_segments(tiny_tokenizer, CF_SEGMENTS)[0]
    assert ex.meta["span_text"] == dict(CLEAN_SEGMENTS)
    spans = decoded_spans(tiny_tokenizer, ds, ex, "counterfactual")
    assert (spans["IO"], spans["S1"], spans["S2"]) == (" Alice", " Bob", " Tom")


def test_rederived_mode_reports_ambiguous_rows(tmp_path, tiny_tokenizer):
    """' Mary' in two tokens: shifting every later boundary by one word costs the same, so the row is
    placed by the tie-break (latest disagreement) and listed as ambiguous."""
    clean, cf = good_pair(tiny_tokenizer, n=1)
    for row in (clean[0], cf[0]):
        for name in SPANS[2:] + ["length"]:
            row[name] = str(int(row[name]) + 1)
    ds, report = load_rows(tmp_path, tiny_tokenizer, clean, cf)
    assert (report.mode, report.rows_kept, report.ambiguous) == ("rederived", 1, [1])
    assert ds.info["rows_ambiguous"] == 1
    assert ds.examples[0].meta["span_text"]["IO"] == " Mary and"


def _one_token_per_atom(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    assert "".join(pieces) == text
    offsets, at = [], 0
    for p in pieces:
        offsets.append((at, at + len(p)))
        at += len(p)
    return offsets


def test_rederive_prefers_own_counts_then_late_disagreements():
    text = "We went to the supermarket, and then home"
    words = ["We", " went", " to", " the", " supermarket", ",", " and", " then", " home"]
    # the file's tokenizer gave the first span (five words) six tokens
    starts, length = [1, 7, 8], 11
    # this tokenizer splits ' supermarket' too: its own counts decide
    own = _one_token_per_atom(text, words[:4] + [" super", "market"] + words[5:])
    placed = _rederive(text, length, starts, own)
    assert placed.cost == 0
    assert [text[c:] for c in placed.chars] == [text, ", and then home", " and then home"]
    # one token per word: ',' may also join the first span and a later word take the extra token;
    # both cost 1 and the later disagreement wins
    own = _one_token_per_atom(text, words)
    late, early = _rederive(text, length, starts, own), _rederive(text, length, starts, own, late=False)
    assert late.cost == early.cost == 1
    assert [text[c:] for c in late.chars] == [text, " and then home", " then home"]
    assert [text[c:] for c in early.chars] == [text, ", and then home", " and then home"]


def test_rederive_learns_word_counts_across_rows():
    """Like the WinoBias files: the file's tokenizer made ' pronoun' two tokens; in one row this
    tokenizer also splits ' smelled', which the file's did not, and the counts cancel out."""
    # spans subject, rest, dot, The, pronoun, he, refers, to, the
    starts, length = [1, 3, 5, 6, 7, 9, 10, 11, 12], 13
    rows = []
    for subject, rest in [("The guard", " was tired"), ("The nurse", " was late"), ("The cook", " was ill")]:
        text = f"{subject}{rest}. The pronoun he refers to the"
        rows.append((text, _one_token_per_atom(text, re.findall(r"\s*\w+|\s*[^\w\s]+", text))))
    text = "The guard smelled awful. The pronoun he refers to the"
    pieces = ["The", " guard", " sm", "elled", " awful", ".", " The", " pronoun", " he", " refers"]
    pieces += [" to", " the"]
    rows.append((text, _one_token_per_atom(text, pieces)))

    first = [_rederive(t, length, starts, own) for t, own in rows]
    wrong = first[3]
    assert wrong.cost == 0  # this tokenizer's own cut fits the counts: every span shifted by a word
    assert text[wrong.chars[2] :].startswith(" awful")
    learned = _learn_word_counts(first)
    assert learned == {" pronoun": 2}
    again = _rederive(text, length, starts, rows[3][1], learned=learned)
    spans = [text[a:b] for a, b in zip(again.chars, again.chars[1:] + [len(text)])]
    assert spans == ["The guard", " smelled awful", ".", " The", " pronoun", " he", " refers", " to", " the"]


def test_rederive_reports_when_nothing_fits():
    text = "We went home"
    own = _one_token_per_atom(text, ["We", " went", " home"])
    assert "no split" in _rederive(text, 3, [1, 2], own)  # three words cannot be two tokens
def test_digit_tie_break_splits_years_two_and_two():
    text = "from the year 1453 to"
    # this tokenizer's own tokens: every digit alone, as SmolLM2 does
    own = _one_token_per_atom(text, ["from", " the", " year", " ", "1", "4", "5", "3", " to"])
    # GPT-2 indices: from=1 the=2 year=3 ' 14'=4 '53'=5 to=6, length 7
    chars = _rederive(text, 7, [1, 2, 3, 4, 5, 6], own)
    assert [text[c:] for c in chars.chars][3:5] == [" 1453 to", "53 to"]


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

"""Greater-Than (Hanna et al. 2023).

"The war lasted from the year 1732 to the year 17" → an end year after 1732. The task measures whether
the model knows that the end year must be greater than the start year, i.e. compares two-digit
numbers.

Scoring: probability difference, Σ p(correct) − Σ p(wrong) at the last position. What counts as an
answer depends on how the tokenizer writes numbers, decided once per tokenizer:

* "two-digit": when every string "00".."99" is one token and a year such as " 1732" splits into the
  century and a two-digit token (GPT-2 style), the answers are the two-digit tokens: correct are
  YY' > YY, wrong are YY' <= YY.
* "next-digit": otherwise (tokenizers that write one digit per token, as SmolLM2 and Gemma do), the
  prompt still ends with the century and the next token is the tens digit of the end year: correct are
  digits d > tens(YY), wrong are d < tens(YY); d == tens(YY) could go either way and is left out.
  YY is drawn with its tens digit in 1..8 so both sets are non-empty.

Counterfactual: the start year replaced by the century's year 01 (e.g. 1701), for which almost every
end year is greater, so the comparison carries no information.

Spans: where the start year splits at the century boundary the schema has `xx1` (" 17") and `yy`
("32"); where the tokenizer writes the whole year as one token there is a single `xxyy` span instead.
The layout is chosen once per tokenizer, as the one under which the most start years have a
counterfactual of equal token length, and only those start years are drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import DatasetError, PromptPair, make_pair, single_token, tokenize_segments
from ._build import PerTokenizerCache, build, check_common, segments, span_tokens

CENTURIES = range(11, 20)  # years 1100..1999
NOUNS = (
    "war", "drought", "famine", "siege", "reign", "dynasty", "expedition", "voyage", "rebellion",
    "plague", "alliance", "conflict", "crusade", "marriage", "journey", "occupation", "revolution",
    "pilgrimage", "campaign", "dispute",
)  # fmt: skip
# (verb, to): "The {noun}" + verb + " the year" + start year + to + " the year" + century.
TEMPLATES = (
    (" lasted from", " to"),
    (" went on from", " until"),
    (" ran from", " to"),
    (" began in", " and ended in"),
    (" continued from", " until"),
)
YEAR = " the year"
SPLIT_SEGMENTS = ("the", "noun", "verb", "year_1", "xx1", "yy", "to", "year_2", "xx2")
WHOLE_SEGMENTS = ("the", "noun", "verb", "year_1", "xxyy", "to", "year_2", "xx2")
TWO_DIGIT_RANGE = range(2, 99)  # 01 is the counterfactual itself, and after 99 no answer is correct
NEXT_DIGIT_RANGE = range(10, 90)  # tens digit 1..8: some digits above and some below


@dataclass(frozen=True)
class Plan:
    """How one tokenizer is handled: span layout, scoring, answer token ids and usable start years."""

    segmentation: str  # "split" or "whole"
    scoring: str  # "two-digit" or "next-digit"
    answer_ids: tuple[int, ...]  # the id of "00".."99" (two-digit) or of "0".."9" (next-digit)
    years: tuple[tuple[int, int], ...]  # (XX, YY) start years whose pair tokenizes consistently


def _year_segments(segmentation: str, xx: int, yy: int) -> list[tuple[str, str]]:
    if segmentation == "split":
        return [("year", YEAR), ("xx1", f" {xx}"), ("yy", f"{yy:02d}")]
    return [("year", YEAR), ("xxyy", f" {xx}{yy:02d}")]


def _tokenize(tokenizer, segs) -> tuple[list[int], list[int]] | None:
    try:
        return tokenize_segments(tokenizer, segs, False)
    except DatasetError:
        return None


def _plan(tokenizer) -> Plan:
    # Scoring: two-digit only if years really continue the century with the two-digit tokens.
    pairs = [single_token(tokenizer, f"{v:02d}") for v in range(100)]
    scoring = "next-digit"
    if all(p is not None for p in pairs):
        hits = 0
        for xx in CENTURIES:
            for yy in TWO_DIGIT_RANGE:
                got = _tokenize(tokenizer, _year_segments("split", xx, yy))
                hits += got is not None and got[0][got[1][2] :] == [pairs[yy]]
        if hits >= 0.5 * len(CENTURIES) * len(TWO_DIGIT_RANGE):
            scoring = "two-digit"
    if scoring == "two-digit":
        answer_ids = tuple(pairs)
        yy_range = TWO_DIGIT_RANGE
    else:
        digits = [single_token(tokenizer, str(d)) for d in range(10)]
        if any(d is None for d in digits) or len(set(digits)) != 10:
            raise DatasetError(
                "task 'greater-than' needs either every two-digit string '00'..'99' or every digit "
                "'0'..'9' to be a single token for this tokenizer"
            )
        answer_ids = tuple(digits)
        yy_range = NEXT_DIGIT_RANGE

    # Segmentation: the layout under which the most start years give a clean year and its XX01
    # counterfactual of equal token length with the same span boundaries (split wins ties).
    usable: dict[str, list[tuple[int, int]]] = {}
    for segmentation in ("split", "whole"):
        usable[segmentation] = []
        for xx in CENTURIES:
            cf = _tokenize(tokenizer, _year_segments(segmentation, xx, 1))
            for yy in yy_range:
                clean = _tokenize(tokenizer, _year_segments(segmentation, xx, yy))
                if clean is None or cf is None or len(clean[0]) != len(cf[0]) or clean[1] != cf[1]:
                    continue
                if scoring == "two-digit" and (
                    segmentation != "split" or clean[0][clean[1][2] :] != [answer_ids[yy]]
                ):
                    continue
                usable[segmentation].append((xx, yy))
    segmentation = max(("split", "whole"), key=lambda s: len(usable[s]))
    if not usable[segmentation]:
        raise DatasetError(
            "task 'greater-than': no start year 'XXYY' (XX in 11..19) has a counterfactual 'XX01' of the "
            "same token length for this tokenizer"
        )
    return Plan(segmentation, scoring, answer_ids, tuple(usable[segmentation]))  # type: ignore[arg-type]


plan_for = PerTokenizerCache(_plan)

SCORING_NOTES = {
    "two-digit": "The tokenizer writes a year as century + two-digit token, so the answers are the "
    "two-digit tokens: those above the start year's YY are correct, the others wrong.",
    "next-digit": "The tokenizer does not write years as century + two-digit token, so the answers are "
    "the next digit (the end year's tens digit): digits above the start year's tens digit are correct, "
    "digits below it are wrong, and the equal digit is in neither set.",
}


def make_greater_than(tokenizer, n: int, seed: int = 0, prepend_bos: bool = True):
    """Greater-Than prompt pairs; the scoring follows the tokenizer (see the module docstring)."""
    check_common(tokenizer, n, prepend_bos)
    plan = plan_for(tokenizer)
    names = SPLIT_SEGMENTS if plan.segmentation == "split" else WHOLE_SEGMENTS
    full = (("bos",) if prepend_bos else ()) + names

    def prompt(noun: str, t: int, xx: int, yy: int) -> list[tuple[str, str]]:
        verb, to = TEMPLATES[t]
        start = [f" {xx}", f"{yy:02d}"] if plan.segmentation == "split" else [f" {xx}{yy:02d}"]
        return segments(names, ["The", " " + noun, verb, YEAR, *start, to, YEAR, f" {xx}"])

    def draw(rng: random.Random) -> PromptPair:
        noun, t = rng.choice(NOUNS), rng.randrange(len(TEMPLATES))
        xx, yy = rng.choice(plan.years)
        if plan.scoring == "two-digit":
            correct = [plan.answer_ids[v] for v in range(yy + 1, 100)]
            wrong = [plan.answer_ids[v] for v in range(0, yy + 1)]
        else:
            tens = yy // 10
            correct = [plan.answer_ids[d] for d in range(tens + 1, 10)]
            wrong = [plan.answer_ids[d] for d in range(0, tens)]
        meta = {"template": t, "noun": noun, "century": xx, "yy": yy, "start_year": 100 * xx + yy}
        meta["counterfactual_start_year"] = 100 * xx + 1
        ex = make_pair(
            tokenizer, prompt(noun, t, xx, yy), prompt(noun, t, xx, 1), correct, wrong, prepend_bos, meta
        )
        if plan.scoring == "two-digit" and span_tokens(ex, full, "yy") != [plan.answer_ids[yy]]:
            raise DatasetError(
                f"the start year of {ex.clean_text!r} does not end in the two-digit token {yy:02d}"
            )
        return ex

    info = {
        "options": {},
        "templates": [f"The {{noun}}{verb}{YEAR} {{XX}}{{YY}}{to}{YEAR} {{XX}}" for verb, to in TEMPLATES],
        "nouns": list(NOUNS),
        "segmentation": plan.segmentation,
        "start_years": [100 * xx + yy for xx, yy in plan.years],
        "scoring": plan.scoring,
        "scoring_note": SCORING_NOTES[plan.scoring],
    }
    return build("greater-than", "prob_diff", tokenizer, n, seed, prepend_bos, names, draw, info)

"""Load prompt-pair datasets from PEAP CSV files (docs/method.md §8).

The format
----------
A PEAP CSV has a `prompt` column, one integer column per span holding the index of the span's first
token, and a `length` column that closes the last span. Index 0 is the BOS token the pipeline
prepends, so the first real token is 1 and the first span must start there. A span ends one index
before the next span starts; an empty span has the same start as the next one (the last span may be
empty by starting at `length`). Files come in clean / counterfactual pairs whose rows are aligned: row
`n` of one file is the counterpart of row `n` of the other, with the same `length` and span starts.

Span columns are mixed in with metadata columns. They are `span_columns` when given, else every
column whose name is not in `METADATA_COLUMNS` (and is not `prompt` or `length`), in file order; every
cell of a span column must be an integer.

Answers
-------
* Files with `correct_token` and `wrong_token` columns (IOI, WinoBias): those strings, each of which
  must be one token for the tokenizer; metric `logit_diff`.
* Greater-than files (a `label` column holding the start year's last two digits YY and no answer
  token columns): metric `prob_diff`, scored for the tokenizer at hand. When every two-digit number is
  one token after the century ("... the year 14" + "53"), correct = the two-digit tokens YY' > YY and
  wrong = YY' <= YY ("two-digit" scoring). Otherwise, when every digit is one token there (tokenizers
  that split numbers into digits), the answer is the next digit d: correct = d > tens(YY), wrong =
  d < tens(YY), and d = tens(YY) counts for neither ("next-digit" scoring). `dataset.info["scoring"]`
  records which. A row with no correct continuation (YY = 99, or tens(YY) = 9 in next-digit scoring)
  cannot be scored and is excluded. Some files write YY without its leading zero ("9" for 09), so a
  one- or two-digit label is accepted.

Answers always come from the clean row; the counterfactual row's answer columns are not read.

Two modes
---------
Token indices only fit the tokenizer they were made for.

1. "indices": when, for every row of both files, this tokenizer turns the prompt (no special tokens)
   into exactly `length - 1` tokens and every span start falls on one of those tokens that begins at a
   word boundary (see below), the indices are used as they are.
2. "rederived": otherwise the text of every span is recovered from the indices and tokenized again
   with `spans.tokenize_segments`.

Recovering span text without the original tokenizer. The prompt is cut into *atoms* by a regular
expression: a run of letters with its leading whitespace, an English contraction ('s, 't, 're, 've,
'm, 'll, 'd), a punctuation run with its leading whitespace, whitespace before a number, a single
digit, and trailing whitespace. Atoms that may share one token with the atom before them join it in a
*word*: the digits of one number with the whitespace before it (GPT-2 writes " 1453" as " 14" + "53",
Llama-3 as " " + "145" + "3"), and letters written right after punctuation. Everything else is a word
of one atom. The original tokenizer gave each word K >= 1 tokens; inside a word a token is a run of
atoms or one of several tokens cut from a single atom (where a letter run was cut is unknown, so a
span can start at an atom, never inside one). A small dynamic program over words looks for counts
adding up to `length - 1` that put every span start at the start of an atom, and among those takes:

1. the one closest to the expected counts: least sum over words of |K - expected K|, where a word's
   expected K is this tokenizer's count for it (a token belongs to the word holding its first visible
   character), or the learned count of rule 2, which weighs double;
2. learned counts: a tokenizer cuts a word (with its leading space) the same way wherever it occurs.
   So every row of both files is first placed with this tokenizer's counts alone; a word that occurs
   at least twice, and in more than half of its occurrences got the same count, one that differs from
   this tokenizer's, has that count learned (`CsvReport.learned_counts`), and every row is placed
   again. In the WinoBias files the rows agree that " pronoun" was two Llama-3 tokens (one for
   SmolLM2), which keeps the few rows where another word also differs (" smelled") from shifting
   every span by one word;
3. on a tie, the one whose numbers are cut most evenly (least sum over number tokens of digits^2),
   so " 1453" in two tokens reads " 14" + "53";
4. on a further tie, the one whose disagreements with the expected counts sit latest in the prompt.

Counts alone can be ambiguous: when a multi-word span sits before a word whose count differs,
shifting the following boundaries by one word may cost the same. Rule 4 settles it, and kept rows
whose span text depended on rule 4 (the opposite preference would have placed a span differently)
are listed in `CsvReport.ambiguous` for the user to inspect. A placement that fits the counts but is
wrong (two differences that cancel out) cannot be told from the file alone; rule 2 exists to catch
the usual case of it, a word that differs in many rows.

A row for which no placement fits, whose recovered spans cannot be tokenized by this tokenizer (one of
its tokens straddles two spans), whose counterfactual comes out with a different length or different
span boundaries from its clean prompt, or whose answers are not single tokens for this tokenizer, is
left out and listed in `CsvReport.excluded` with the reason: those are the cost of moving to another
tokenizer, not errors in the file. A row is never bent to fit: it is placed by these rules, or it is
left out with its reason.

Errors
------
A genuine problem in the data raises `DatasetError` naming the file, the data row (1-based, header not
counted) with its line in the file, and the field: clean / counterfactual files of different row
counts or span columns, a row pair with different `length` or span starts, spans out of order or
overlapping, a first span not at index 1, an index past `length`, a missing or non-integer field, a
prompt longer than `n_ctx`, and, in "indices" mode (the tokenizer the file was made for), an answer
that is not one token. The loader reads only; it never writes.
"""

from __future__ import annotations

import csv
import re
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .dataset import (
    BOS_SPAN,
    DatasetError,
    PromptPair,
    PromptPairDataset,
    Schema,
    tokenizer_fingerprint,
    validate_example,
)
from .spans import bos_id, tokenize_segments

# Columns that describe a row rather than mark a span. "" is the unnamed index column pandas writes.
METADATA_COLUMNS = frozenset(
    {
        "",
        "index",
        "Unnamed: 0",
        "prompt",
        "length",
        "label",
        "split",
        "id",
        "prompt_id",
        "pair_id",
        "correct_token",
        "wrong_token",
        "S1_token",
        "S2_token",
        "IO_token",
        "top_answer",
        "top_answer_prob",
        "correct_prob",
        "wrong_prob",
        "correct_proffesion_idx",  # sic, as the WinoBias files spell it
        "correct_profession_idx",
    }
)

@dataclass
class CsvReport:
    """What `load_peap_csv` did: rows read and kept, the mode, and every row left out with why."""

    rows_read: int = 0
    rows_kept: int = 0
    mode: str = "indices"
    excluded: list[tuple[int, str]] = field(default_factory=list)  # (1-based data row, reason)
    # "rederived" mode (see the module docstring): kept rows whose span text rested on the last
    # tie-break, and the token counts of the file's tokenizer learned from all rows (word -> count)
    ambiguous: list[int] = field(default_factory=list)
    learned_counts: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Reading the files
# ------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    number: int  # 1-based data row
    line: int  # line of the file where the record starts
    cells: dict[str, str]
    prompt: str = ""
    length: int = 0
    starts: list[int] = field(default_factory=list)


@dataclass
class _Table:
    path: Path
    header: list[str]
    rows: list[_Row]

    def where(self, row: _Row | None = None, column: str | None = None) -> str:
        out = str(self.path)
        out += ", header (line 1)" if row is None else f", data row {row.number} (line {row.line})"
        if column is not None:
            out += f", field '{column}'"
        return out


def _read_table(path) -> _Table:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such CSV file")
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = None
            rows: list[_Row] = []
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    break
                # the line the record starts on (quoted cells may hold line breaks)
                line = reader.line_num - sum(c.count("\n") for c in record)
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # blank line
                if header is None:
                    header = record
                    continue
                rows.append(_Row(number=len(rows) + 1, line=line, cells=dict(zip(header, record))))
                if len(record) != len(header):
                    table = _Table(path, header, rows)
                    raise DatasetError(
                        f"{table.where(rows[-1])}: {len(record)} fields but the header has {len(header)}"
                    )
    except csv.Error as exc:
        raise DatasetError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if header is None:
        raise DatasetError(f"{path}: empty file, expected a header line")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DatasetError(f"{path}, header (line 1): repeated column names {dupes}")
    return _Table(path, header, rows)


_PRONOUN_SWAP = {"he": "she", "she": "he", "He": "She", "She": "He"}


def _swapped_pronouns(clean: _Table) -> _Table:
    """The clean table with he <-> she swapped in every prompt (the winobias corruption)."""
    rows = []
    for r in clean.rows:
        prompt = r.cells.get("prompt", "")
        swapped = re.sub(r"\b(he|she|He|She)\b", lambda m: _PRONOUN_SWAP[m.group(1)], prompt)
        rows.append(_Row(number=r.number, line=r.line, cells={**r.cells, "prompt": swapped}))
    return _Table(Path(f"{clean.path} (pronouns swapped)"), list(clean.header), rows)


def _require_columns(table: _Table, columns: Sequence[str]) -> None:
    for column in columns:
        if column not in table.header:
            raise DatasetError(f"{table.where(column=column)}: missing column '{column}'")


def _cell(table: _Table, row: _Row, column: str) -> str:
    value = row.cells.get(column)
    if value is None or value == "":
        raise DatasetError(f"{table.where(row, column)}: missing value")
    return value


def _int_cell(table: _Table, row: _Row, column: str, span: bool = False) -> int:
    value = _cell(table, row, column)
    try:
        return int(value.strip())
    except ValueError:
        hint = " (if the column is not a span, name the span columns with span_columns)" if span else ""
        raise DatasetError(f"{table.where(row, column)}: {value!r} is not an integer{hint}") from None


def _span_columns(table: _Table, span_columns: Sequence[str] | None) -> list[str]:
    if span_columns is not None:
        columns = list(span_columns)
        _require_columns(table, columns)
        reserved = [c for c in columns if c in ("prompt", "length")]
        if reserved:
            raise DatasetError(f"{table.where(column=reserved[0])}: '{reserved[0]}' cannot be a span column")
    else:
        columns = [c for c in table.header if c not in METADATA_COLUMNS]
    if not columns:
        raise DatasetError(f"{table.where()}: no span columns (every column is a known metadata column)")
    if len(set(columns)) != len(columns):
        raise DatasetError(f"{table.where()}: span columns repeat: {columns}")
    return columns


def _parse_rows(table: _Table, columns: list[str]) -> None:
    """Fill prompt / length / starts of every row and check the span indices (data errors raise)."""
    for row in table.rows:
        row.prompt = _cell(table, row, "prompt")
        row.length = _int_cell(table, row, "length")
        row.starts = [_int_cell(table, row, c, span=True) for c in columns]
        if row.length < 2:
            raise DatasetError(
                f"{table.where(row, 'length')}: length {row.length} leaves no token after BOS (index 0)"
            )
        if row.starts[0] != 1:
            raise DatasetError(
                f"{table.where(row, columns[0])}: the first span must start at index 1, the first token "
                f"after BOS (index 0), not {row.starts[0]}"
            )
        for i in range(1, len(columns)):
            if row.starts[i] < row.starts[i - 1]:
                raise DatasetError(
                    f"{table.where(row, columns[i])}: span '{columns[i]}' starts at {row.starts[i]}, before "
                    f"span '{columns[i - 1]}' ({row.starts[i - 1]}): spans out of order or overlapping"
                )
        for column, s in zip(columns, row.starts):
            if s > row.length:
                raise DatasetError(
                    f"{table.where(row, column)}: index {s} is past the prompt length {row.length} "
                    "(field 'length')"
                )


def _check_aligned(clean: _Table, cf: _Table, columns: list[str]) -> None:
    if len(clean.rows) != len(cf.rows):
        raise DatasetError(
            f"{cf.path}: {len(cf.rows)} data rows but the clean file {clean.path} has {len(clean.rows)}; "
            "clean and counterfactual files must be row-aligned"
        )
    for a, b in zip(clean.rows, cf.rows):
        if a.length != b.length:
            raise DatasetError(
                f"{cf.where(b, 'length')}: length {b.length} but the clean row has {a.length}; a pair must "
                "have the same token length"
            )
        for column, x, y in zip(columns, a.starts, b.starts):
            if x != y:
                raise DatasetError(
                    f"{cf.where(b, column)}: span starts at {y} but at {x} in the clean row; a pair must "
                    "share its span boundaries"
                )


def infer_task(path) -> str:
    """'ioi', 'greater-than' or 'winobias' when the file name says so, else 'custom'."""
    name = Path(path).name.lower()
    squashed = re.sub(r"[^a-z0-9]", "", name)
    if "greaterthan" in squashed:
        return "greater-than"
    if "winobias" in squashed:
        return "winobias"
    if re.search(r"(^|[^a-z])ioi([^a-z]|$)", name):
        return "ioi"
    return "custom"


# ------------------------------------------------------------------------------------------------
# Atoms and the re-derivation of span text
# ------------------------------------------------------------------------------------------------

_ATOM = re.compile(
    r"""
      (?P<contraction>'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])(?![^\W\d_]))
    | (?P<letters>\s*[^\W\d_]+)
    | (?P<space>\s+(?=\d))
    | (?P<digit>\d)
    | (?P<punct>\s*(?:[^\w\s]|_)+)
    | (?P<trail>\s+)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Atom:
    start: int
    end: int
    kind: str
    joinable: bool  # may share one token with the atom before it
    max_tokens: int


def _atoms(text: str) -> list[_Atom]:
    out: list[_Atom] = []
    for m in _ATOM.finditer(text):
        kind = m.lastgroup
        prev = out[-1] if out else None
        joinable = False
        if prev is not None and prev.end == m.start():
            if kind == "digit":
                joinable = prev.kind in ("digit", "space")
            elif kind == "letters":
                joinable = prev.kind == "punct" and not m.group()[0].isspace()
        out.append(
            _Atom(m.start(), m.end(), kind, joinable, max(1, len(m.group().encode("utf-8"))))
        )
    assert sum(a.end - a.start for a in out) == len(text), "atoms must cover the text"
    return out


def _own_counts(text: str, atoms: list[_Atom], offsets: Sequence[tuple[int, int]]) -> list[int]:
    """How many of this tokenizer's tokens each atom holds (a token belongs to its first visible char)."""
    starts = [a.start for a in atoms]
    counts = [0] * len(atoms)
    for start, end in offsets:
        piece = text[start:end]
        anchor = start + (len(piece) - len(piece.lstrip())) if piece.strip() else start
        if atoms:
            counts[max(0, bisect_right(starts, anchor) - 1)] += 1
    return counts


def _fits_indices(text: str, length: int, starts: list[int], offsets: Sequence[tuple[int, int]]) -> bool:
    """Whether this tokenizer's own tokens (offsets, no BOS) match the CSV's length and span starts."""
    if len(offsets) != length - 1:
        return False
    boundaries = {a.start for a in _atoms(text)} | {len(text)}
    for s in starts:
        if s >= length:
            continue
        c = offsets[s - 1][0]
        while c not in boundaries and c > 0 and text[c - 1].isspace():
            c -= 1  # tokenizers that leave the leading space out of the offsets
        if c not in boundaries:
            return False
    return True


def _words(atoms: list[_Atom]) -> list[list[_Atom]]:
    """Group atoms into words: an atom that may share a token with the one before joins its word."""
    words: list[list[_Atom]] = []
    for atom in atoms:
        if atom.joinable and words:
            words[-1].append(atom)
        else:
            words.append([atom])
    return words


def _split_word(word: list[_Atom], n_tokens: int, inner: frozenset[int]):
    """Best way to cut one word into `n_tokens` tokens with a token starting at an atom's start at
    every relative position in `inner`: (tie-break, {relative position: char}) or None.

    A token is a run of atoms of the word, or one of k >= 1 tokens inside a single atom. The tie-break
    adds up (digits in the token)^2 over tokens, so a number's digits spread evenly over its tokens.
    """
    m = len(word)
    # best[(j, u)]: atom j starts a token after u tokens of the word
    best: dict[tuple[int, int], tuple[int, tuple[int, int] | None]] = {(0, 0): (0, None)}
    for j in range(m):
        for u in sorted(u for (i, u) in list(best) if i == j):
            tie = best[(j, u)][0]
            blocked = min([r for r in inner if r > u] + [n_tokens])  # next position to land on
            moves = []
            for k in range(1, min(word[j].max_tokens, blocked - u) + 1):
                moves.append((j + 1, u + k, 1 if word[j].kind == "digit" else 0))
            if u + 1 <= blocked:
                digits = 0
                for end in range(j + 1, m + 1):
                    digits += word[end - 1].kind == "digit"
                    if end > j + 1:
                        moves.append((end, u + 1, digits * digits))
            for end, u2, d in moves:
                if end < m or u2 == n_tokens:
                    if (end, u2) not in best or tie + d < best[(end, u2)][0]:
                        best[(end, u2)] = (tie + d, (j, u))
    if (m, n_tokens) not in best:
        return None
    chars, key = {}, (m, n_tokens)
    while key is not None:
        j, u = key
        if j < m:
            chars[u] = word[j].start
        key = best[key][1]
    return best[(m, n_tokens)][0], chars


@dataclass
class _Placement:
    chars: list[int]  # character offset of every span start
    cost: int  # the placement's cost (rule 1 of the module docstring)
    words: list[tuple[str, int, int]]  # (word text, tokens given, this tokenizer's tokens) per word


# Learned word counts (rule 2) weigh this much more than this tokenizer's own counts.
_LEARNED_WEIGHT = 2


def _rederive(
    text: str,
    length: int,
    starts: list[int],
    offsets,
    late: bool = True,
    learned: dict[str, int] | None = None,
) -> _Placement | str:
    """Where every span starts in `text`, or the reason why no placement fits (module docstring).

    `starts` are CSV indices (BOS = 0); the token positions without BOS are `s - 1`, in [0, length-1].
    A dynamic program over words: state (w, t) means word w starts at token t; a word given K tokens
    costs |K - expected count| (`learned` counts, weighted, where known; else this tokenizer's), and
    must let every span start inside it fall on one of its atoms (`_split_word`). Ties go to the
    placement whose numbers are cut most evenly, then to the one whose disagreements sit latest in the
    prompt (earliest with `late=False`): rules 1-4 of the module docstring.
    """
    atoms = _atoms(text)
    words = _words(atoms)
    own_atom = _own_counts(text, atoms, offsets)
    own, at = [], 0
    for word in words:
        own.append(sum(own_atom[at : at + len(word)]))
        at += len(word)
    texts = [text[w[0].start : w[-1].end] for w in words]
    learned = learned or {}
    expected = [learned.get(t, k) for t, k in zip(texts, own)]
    weight = [_LEARNED_WEIGHT if t in learned else 1 for t in texts]
    n, total = len(words), length - 1
    required = sorted({s - 1 for s in starts})
    position = [n - w if late else w for w in range(n)]

    Back = tuple[int, int, int, dict[int, int]] | None
    best: dict[tuple[int, int], tuple[int, int, int, Back]] = {(0, 0): (0, 0, 0, None)}
    for w in range(n):
        for t in sorted(t for (v, t) in list(best) if v == w):
            cost, tie, order, _ = best[(w, t)]
            max_k = min(sum(a.max_tokens for a in words[w]), total - t)
            for k in range(1, max_k + 1):
                inner = frozenset(p - t for p in required if t < p < t + k)
                if len(words[w]) == 1 and inner:
                    break  # a span cannot start inside a single atom, and a larger k cannot help
                split = _split_word(words[w], k, inner)
                if split is None:
                    continue
                if w + 1 == n and t + k != total:
                    continue
                off = abs(k - expected[w]) * weight[w]
                cand = (cost + off, tie + split[0], order + off * position[w], (w, t, k, split[1]))
                key = (w + 1, t + k)
                if key not in best or cand[:3] < best[key][:3]:
                    best[key] = cand
    if (n, total) not in best:
        return (
            f"no split of the prompt into {total} tokens (length {length} minus BOS) puts every span start "
            "at the start of a word"
        )
    char_at, given = {total: len(text)}, [0] * n
    key = (n, total)
    while best[key][3] is not None:
        w, t, k, inner_chars = best[key][3]
        char_at.update({t + u: c for u, c in inner_chars.items()})
        given[w] = k
        key = (w, t)
    return _Placement(
        [char_at[s - 1] for s in starts], best[(n, total)][0], list(zip(texts, given, own))
    )


def _learn_word_counts(placements: list[_Placement | str]) -> dict[str, int]:
    """Token counts of the file's tokenizer that the placements agree on (rule 2 of the docstring).

    A word gets a learned count when it occurs at least twice, and more than half of its occurrences
    were given the same count, one that differs from this tokenizer's. (Inside a multi-word span the
    split between words is not observed, so a learned count there may be wrong; it cannot move a span
    boundary unless the word sits elsewhere next to one.)
    """
    votes: dict[str, Counter] = {}
    own: dict[str, int] = {}
    for placed in placements:
        if isinstance(placed, _Placement):
            for word, given, mine in placed.words:
                votes.setdefault(word, Counter())[given] += 1
                own[word] = mine
    learned = {}
    for word, counter in votes.items():
        count, hits = counter.most_common(1)[0]
        if hits >= 2 and 2 * hits > sum(counter.values()) and count != own[word]:
            learned[word] = count
    return learned


def _segments(names: list[str], text: str, chars: list[int]) -> list[tuple[str, str]]:
    ends = chars[1:] + [len(text)]
    return [(name, text[a:b]) for name, a, b in zip(names, chars, ends)]


# ------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------


def _continuation_ids(tokenizer, prompt: str, texts: list[str]) -> list[int] | None:
    """The one token each text adds after `prompt`, or None if any adds more or changes the prompt."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for t in texts:
        ids = tokenizer(prompt + t, add_special_tokens=False)["input_ids"]
        if len(ids) != len(base) + 1 or ids[: len(base)] != base:
            return None
        out.append(ids[-1])
    return out if len(set(out)) == len(out) else None


def _greater_than_table(tokenizer, prompt: str) -> tuple[str, list[int]]:
    """('two-digit', ids of 00..99) or ('next-digit', ids of 0..9) for this tokenizer, or raise."""
    two = _continuation_ids(tokenizer, prompt, [f"{y:02d}" for y in range(100)])
    if two is not None:
        return "two-digit", two
    one = _continuation_ids(tokenizer, prompt, [str(d) for d in range(10)])
    if one is not None:
        return "next-digit", one
    raise DatasetError(
        f"greater-than answers: after {prompt!r} this tokenizer makes neither every two-digit number nor "
        "every digit a single token, so the task cannot be scored"
    )


def _greater_than_answers(scoring: str, table: list[int], yy: int) -> tuple[list[int], list[int]]:
    if scoring == "two-digit":
        return table[yy + 1 :], table[: yy + 1]
    tens = yy // 10
    return table[tens + 1 :], table[:tens]


def _answer_kind(clean: _Table) -> tuple[str, str]:
    """('tokens', 'logit_diff') or ('greater-than', 'prob_diff'), after checking the answer cells."""
    if "correct_token" in clean.header or "wrong_token" in clean.header:
        _require_columns(clean, ["correct_token", "wrong_token"])
        for row in clean.rows:
            _cell(clean, row, "correct_token")
            _cell(clean, row, "wrong_token")
        return "tokens", "logit_diff"
    if "label" in clean.header:
        for row in clean.rows:
            label = _cell(clean, row, "label").strip()
            if not re.fullmatch(r"\d{1,2}", label):
                raise DatasetError(
                    f"{clean.where(row, 'label')}: {label!r} is not the start year's two digits (YY)"
                )
        return "greater-than", "prob_diff"
    raise DatasetError(
        f"{clean.where()}: no answers: expected 'correct_token' and 'wrong_token' columns, or a "
        "two-digit 'label' column (greater-than)"
    )


def _token_answers(tokenizer, row: _Row) -> tuple[list[int], list[int], tuple[str, str] | None]:
    """[correct id], [wrong id] from the answer columns, and (column, problem) when an answer is not
    one token for this tokenizer (else None)."""
    out = []
    for column in ("correct_token", "wrong_token"):
        text = row.cells[column]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            return [], [], (column, f"answer {text!r} is {len(ids)} tokens for this tokenizer, not one")
        out.append(list(ids))
    return out[0], out[1], None


# ------------------------------------------------------------------------------------------------
# The loader
# ------------------------------------------------------------------------------------------------


def load_peap_csv(
    clean_path,
    counterfactual_path,
    tokenizer,
    prepend_bos: bool = True,
    task: str | None = None,
    span_columns: Sequence[str] | None = None,
    n_ctx: int | None = None,
    counterfactual_rule: str | None = None,
) -> tuple[PromptPairDataset, CsvReport]:
    """Read a clean / counterfactual pair of PEAP CSV files as a `PromptPairDataset` for `tokenizer`.

    Returns the dataset and a `CsvReport` (mode, rows kept, rows excluded with reasons). Raises
    `DatasetError` on data errors; see the module docstring for the rules.

    Files that come without a counterfactual (the WinoBias files) can take one made by a rule instead:
    `counterfactual_rule="swap-pronouns"` (with `counterfactual_path=None`) swaps the whole words
    he <-> she (capitalised too) in each prompt, the corruption of the built-in winobias task; span
    indices stay those of the clean row, since both are one token in the files' tokenizers.
    """
    clean = _read_table(clean_path)
    if counterfactual_path is None:
        if counterfactual_rule != "swap-pronouns":
            raise DatasetError(
                "a counterfactual CSV file is required (rows aligned with the clean file), or "
                "counterfactual_rule='swap-pronouns'"
            )
        cf = _swapped_pronouns(clean)
    else:
        cf = _read_table(counterfactual_path)
    for table in (clean, cf):
        _require_columns(table, ["prompt", "length"])
    columns = _span_columns(clean, span_columns)
    cf_columns = _span_columns(cf, span_columns)
    if cf_columns != columns:
        raise DatasetError(
            f"{cf.where()}: span columns {cf_columns} differ from the clean file's {columns}"
        )
    _parse_rows(clean, columns)
    _parse_rows(cf, columns)
    _check_aligned(clean, cf, columns)

    bos = bos_id(tokenizer) if prepend_bos else None
    if prepend_bos and bos is None:
        raise DatasetError("the tokenizer has no BOS token; use prepend_bos=False")

    answer_kind, metric = _answer_kind(clean)
    info: dict = {}
    gt_scoring, gt_table = "", []
    if answer_kind == "greater-than" and clean.rows:
        try:
            gt_scoring, gt_table = _greater_than_table(tokenizer, clean.rows[0].prompt)
        except DatasetError as exc:
            raise DatasetError(f"{clean.where(clean.rows[0], 'label')}: {exc}") from None
        info["scoring"] = gt_scoring

    # this tokenizer's own tokens of every prompt
    prompts = [r.prompt for r in clean.rows] + [r.prompt for r in cf.rows]
    try:
        enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True) if prompts else None
    except NotImplementedError:
        raise DatasetError("loading a PEAP CSV needs a fast tokenizer (one that reports offsets)") from None
    own_ids = list(enc["input_ids"]) if enc is not None else []
    own_offsets = [list(map(tuple, o)) for o in enc["offset_mapping"]] if enc is not None else []
    n_rows = len(clean.rows)

    mode = "indices"
    for k, row in enumerate(clean.rows + cf.rows):
        if not _fits_indices(row.prompt, row.length, row.starts, own_offsets[k]):
            mode = "rederived"
            break

    schema = Schema(tuple(([BOS_SPAN] if prepend_bos else []) + columns))
    report = CsvReport(rows_read=n_rows, mode=mode)
    placements: list[_Placement | str] = []
    if mode == "rederived":
        # first pass with this tokenizer's counts, then again with the counts the rows agree on
        for k, row in enumerate(clean.rows + cf.rows):
            placements.append(_rederive(row.prompt, row.length, row.starts, own_offsets[k]))
        report.learned_counts = _learn_word_counts(placements)
        if report.learned_counts:
            placements = [
                _rederive(row.prompt, row.length, row.starts, own_offsets[k], learned=report.learned_counts)
                for k, row in enumerate(clean.rows + cf.rows)
            ]
    examples: list[PromptPair] = []
    for k, (a, b) in enumerate(zip(clean.rows, cf.rows)):
        where = clean.where(a)
        if mode == "indices":
            ids_c, ids_x = own_ids[k], own_ids[n_rows + k]
            if prepend_bos:
                ids_c, ids_x, starts = [bos] + ids_c, [bos] + ids_x, [0] + list(a.starts)
            else:
                starts = [s - 1 for s in a.starts]
            texts, ambiguous = None, False
        else:
            result = _rederive_pair(
                tokenizer,
                columns,
                [(a, own_offsets[k], placements[k]), (b, own_offsets[n_rows + k], placements[n_rows + k])],
                report.learned_counts,
                prepend_bos,
            )
            if isinstance(result, str):
                report.excluded.append((a.number, result))
                continue
            ids_c, ids_x, starts, texts, ambiguous = result
        if n_ctx is not None and len(ids_c) > n_ctx:
            raise DatasetError(
                f"{clean.where(a, 'prompt')}: {len(ids_c)} tokens is longer than the model's context "
                f"(n_ctx={n_ctx})"
            )

        if answer_kind == "tokens":
            correct, wrong, problem = _token_answers(tokenizer, a)
            if problem is not None:
                column, message = problem
                if mode == "indices":  # the file's own tokenizer: the file is wrong
                    raise DatasetError(f"{clean.where(a, column)}: {message}")
                report.excluded.append((a.number, f"field '{column}': {message}"))
                continue
        else:
            yy = int(a.cells["label"])
            correct, wrong = _greater_than_answers(gt_scoring, gt_table, yy)
            if not correct:
                reason = (
                    f"field 'label': no {gt_scoring} continuation makes the end year greater than {yy:02d}"
                )
                report.excluded.append((a.number, reason))
                continue

        meta = {"row": a.number}
        for column in clean.header:
            if column not in columns and column != "prompt":
                meta[column or "index"] = a.cells.get(column, "")
        if texts is not None:
            meta["span_text"] = texts
        ex = PromptPair(
            clean=list(ids_c),
            counterfactual=list(ids_x),
            correct=correct,
            wrong=wrong,
            span_starts=starts,
            clean_text=a.prompt,
            counterfactual_text=b.prompt,
            meta=meta,
        )
        validate_example(ex, schema, where, n_ctx)
        examples.append(ex)
        if ambiguous:
            report.ambiguous.append(a.number)

    report.rows_kept = len(examples)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    info.update(
        {
            "source": "peap-csv",
            "clean_path": str(clean.path),
            "counterfactual_path": str(cf.path),
            "csv_mode": mode,
            "rows_read": report.rows_read,
            "rows_kept": report.rows_kept,
            "rows_excluded": len(report.excluded),
            "rows_ambiguous": len(report.ambiguous),
            "learned_word_counts": len(report.learned_counts),
        }
    )
    dataset = PromptPairDataset(
        examples=examples,
        schema=schema,
        task=task or infer_task(clean.path),
        metric=metric,
        tokenizer=tokenizer_fingerprint(tokenizer),
        pad_token_id=int(pad or 0),
        info=info,
    )
    return dataset, report


def _rederive_pair(tokenizer, columns, pair, learned: dict[str, int], prepend_bos: bool):
    """(clean ids, counterfactual ids, span starts, span texts, ambiguous) for one row pair, or the
    reason it is excluded. `pair`: (row, offsets, placement) for the clean then the counterfactual row.
    `ambiguous`: the opposite tie-break (rule 4) would have placed a span differently.
    """
    out, ambiguous = [], False
    for label, (row, offsets, placed) in zip(("clean", "counterfactual"), pair):
        if isinstance(placed, str):
            return f"{label} prompt: {placed}"
        if placed.cost:
            other = _rederive(row.prompt, row.length, row.starts, offsets, late=False, learned=learned)
            ambiguous |= isinstance(other, _Placement) and other.chars != placed.chars
        segments = _segments(columns, row.prompt, placed.chars)
        try:
            ids, starts = tokenize_segments(tokenizer, segments, prepend_bos)
        except DatasetError as exc:
            return f"{label} prompt: {exc}"
        out.append((ids, starts, {name: text for name, text in segments}))
    (ids_c, starts_c, texts), (ids_x, starts_x, _) = out
    if len(ids_c) != len(ids_x):
        return (
            f"the counterfactual prompt is {len(ids_x)} tokens for this tokenizer but the clean one is "
            f"{len(ids_c)}"
        )
    if starts_c != starts_x:
        return (
            f"span boundaries differ between clean {starts_c} and counterfactual {starts_x} for this "
            "tokenizer"
        )
    return ids_c, ids_x, starts_c, texts, ambiguous

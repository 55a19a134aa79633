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
span can start at an atom, never inside one). A placement gives every word a count, the counts add
up to `length - 1`, and every span start falls at the start of an atom. The expected count of a word
is the one learned for the file's tokenizer (rule 2) or else this tokenizer's (a token belongs to the
word holding its first visible character). Rules:

1. a placement costs the sum over words of |K - expected K|, a learned count weighing double; a
   prompt whose words take exactly their expected counts is placed by them;
2. learned counts: a tokenizer cuts a word (with its leading space) the same way wherever it occurs,
   so the rows of both files are read together. Among the single-word changes of count by one token
   that make some prompt fit its row exactly (the word's count changed wherever it occurs in the
   prompt; a word two tokens off is no likelier than two words one token off each), the
   one that makes the most prompts of the files fit, less those it stops fitting, is learned, and so
   on while a change gains at least two prompts (`CsvReport.learned_counts`). In the WinoBias files
   every prompt ends in " The pronoun he refers to the", where " pronoun" was two Llama-3 tokens and
   is one SmolLM2 token. Where " The pronoun" and " refers to" are each one span, giving " to" two
   tokens would fit the prompts in which " to" occurs only there, but not those with another " to":
   " pronoun" fits them all and is learned. On a tie the longer word is learned. A rival of a
   learned count (another word's count that makes one of the same prompts fit, and would gain two
   prompts in its place) is refuted when the learned count makes at least two more prompts fit;
   otherwise every prompt that the two place differently is ambiguous (" The" in two tokens fits
   every prompt that " pronoun" does, and places every span alike, so it contests none);
3. otherwise the cheapest placement is found by a dynamic program over words, run forwards and
   backwards, which gives for every span start the cheapest placement putting it at each possible
   character. A number's cut is not told by counts: at equal cost the cut most even in digits is
   cheaper (least sum over number tokens of digits^2), so " 1453" in two tokens reads " 14" + "53"
   as GPT-2 cuts the years of its Greater-Than files. A span start whose cheapest character is not
   unique makes the prompt ambiguous.

Every kept row is verified, and `CsvReport.kept_by` counts how: "exact" (the words take exactly their
expected counts; any other placement would move a word off its count), "forced" (no other placement
fits the indices at all, whatever the counts), or "closest" (the cheapest placement; putting any span
start anywhere else costs more). A row that is ambiguous, clean or counterfactual, is left
out and listed in `CsvReport.ambiguous`: a row is never kept with spans placed by a guess between
equal fits. A placement that fits the counts but is wrong (two differences that cancel out) cannot
be told from the file alone; rule 2 exists to catch the usual case of it, a word that differs in
many rows.

A row for which no placement fits, whose recovered spans cannot be tokenized by this tokenizer (one of
its tokens straddles two spans), whose counterfactual comes out with a different length or different
span boundaries from its clean prompt, or whose answers are not single tokens for this tokenizer, is
left out and listed in `CsvReport.excluded` with the reason (`CsvReport.excluded_by` counts them by
kind, `EXCLUDED_KINDS`): those are the cost of moving to another tokenizer, not errors in the file. A
row is never bent to fit: it is placed by these rules, or it is left out with its reason. When no
row is left, loading fails with the counts.

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

# How sure a kept row's spans are, surest first, and why a row is left out (CsvReport.kept_by and
# .excluded_by count rows by these; the module docstring has the rules).
KEPT_KINDS = {
    "indices": "the file's own token indices",
    "forced": "spans forced by the indices, whatever the token counts",
    "exact": "fit the token counts exactly",
    "closest": "closest fit to the token counts, no other as close",
}
EXCLUDED_KINDS = {
    "ambiguous": "ambiguous: the spans fit equally well in more than one place",
    "no fit": "no placement fits the indices",
    "straddle": "a token of this tokenizer straddles two spans",
    "pair": "clean and counterfactual differ for this tokenizer",
    "answer": "answer not one token for this tokenizer",
    "label": "no greater continuation to score",
}


@dataclass
class CsvReport:
    """What `load_peap_csv` did: rows read and kept, the mode, and every row left out with why."""

    rows_read: int = 0
    rows_kept: int = 0
    mode: str = "indices"
    excluded: list[tuple[int, str]] = field(default_factory=list)  # (1-based data row, reason)
    # rows kept by how sure their spans are, rows left out by reason (keys of KEPT_KINDS, EXCLUDED_KINDS)
    kept_by: Counter = field(default_factory=Counter)
    excluded_by: Counter = field(default_factory=Counter)
    # "rederived" mode (see the module docstring): rows left out because their spans could be placed
    # in more than one way, and the token counts of the file's tokenizer learned from all rows
    ambiguous: list[int] = field(default_factory=list)
    learned_counts: dict[str, int] = field(default_factory=dict)

    def exclude(self, row: int, kind: str, detail: str) -> None:
        self.excluded.append((row, detail))
        self.excluded_by[kind] += 1
        if kind == "ambiguous":
            self.ambiguous.append(row)

    def summary(self) -> list[str]:
        """Lines for a person: rows kept and left out, counted by how sure and by reason."""
        lines = []
        if self.kept_by:
            lines.append(
                f"kept {self.rows_kept}: "
                + ", ".join(f"{KEPT_KINDS[k]} ({n})" for k, n in _in_order(self.kept_by, KEPT_KINDS))
            )
        if self.excluded_by:
            lines.append(
                f"excluded {len(self.excluded)}: "
                + ", ".join(
                    f"{EXCLUDED_KINDS[k]} ({n})" for k, n in _in_order(self.excluded_by, EXCLUDED_KINDS)
                )
            )
        if self.learned_counts:
            lines.append(
                "token counts learned for the file's tokenizer: "
                + ", ".join(f"{w!r} {k}" for w, k in sorted(self.learned_counts.items()))
            )
        return lines


def _in_order(counts: Counter, kinds: dict[str, str]) -> list[tuple[str, int]]:
    return [(k, counts[k]) for k in kinds if counts[k]]


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
class _Prompt:
    """One prompt of the file cut into words, with what its row says about the file's tokens."""

    text: str
    words: list[list[_Atom]]
    texts: list[str]  # each word's text, leading whitespace included
    own: list[int]  # this tokenizer's tokens in each word (at least 1: every word takes a token)
    total: int  # the file's tokens without BOS: length - 1
    starts: list[int]  # span starts as token positions without BOS (CSV index - 1)

    def expected(self, learned: dict[str, int]) -> list[int]:
        """The token count expected of each word: the learned one where known, else this tokenizer's."""
        return [learned.get(t, k) for t, k in zip(self.texts, self.own)]

    def capacity(self, w: int) -> int:
        return sum(a.max_tokens for a in self.words[w])


def _prompt(text: str, length: int, starts: list[int], offsets) -> _Prompt:
    atoms = _atoms(text)
    words = _words(atoms)
    own_atom = _own_counts(text, atoms, offsets)
    own, at = [], 0
    for word in words:
        own.append(max(1, sum(own_atom[at : at + len(word)])))
        at += len(word)
    texts = [text[w[0].start : w[-1].end] for w in words]
    return _Prompt(text, words, texts, own, length - 1, [s - 1 for s in starts])


def _fit(p: _Prompt, counts: list[int]) -> list[int] | None:
    """The character where every span starts when word w takes exactly counts[w] tokens, or None when
    those counts do not add up to the row's length or put a span start inside an atom."""
    required = sorted(set(p.starts))
    char_at, t = {p.total: len(p.text)}, 0
    for w, (word, k) in enumerate(zip(p.words, counts)):
        if not 1 <= k <= p.capacity(w) or t + k > p.total:
            return None
        inner = frozenset(q - t for q in required if t < q < t + k)
        if inner:
            split = None if len(word) == 1 else _split_word(word, k, inner)
            if split is None:
                return None
            char_at.update({t + u: c for u, c in split[1].items()})
        else:
            char_at[t] = word[0].start
        t += k
    return [char_at[s] for s in p.starts] if t == p.total else None


def _single_fixes(p: _Prompt, counts: list[int]) -> list[tuple[str, int, list[int]]]:
    """(word, count, span starts) for every word that, given `count` tokens wherever it occurs in the
    prompt and every other word keeping its count, makes the prompt fit exactly. The count may differ
    by one token from the word's: a word two tokens off is no likelier than two words one token off
    each, which a single change cannot tell apart."""
    short = p.total - sum(counts)
    if short == 0:
        return []
    where: dict[str, list[int]] = {}
    for w, text in enumerate(p.texts):
        where.setdefault(text, []).append(w)
    out = []
    for text, ws in where.items():
        changed = sum(counts[w] for w in ws) + short
        if changed % len(ws) or changed // len(ws) < 1:
            continue
        k = changed // len(ws)
        if any(abs(k - counts[w]) > 1 for w in ws):
            continue
        trial = list(counts)
        for w in ws:
            trial[w] = k
        chars = _fit(p, trial)
        if chars is not None:
            out.append((text, k, chars))
    return out


# A learned count must let at least this many more prompts of the files fit exactly.
_MIN_GAIN = 2


def _holding(prompts: list[_Prompt]) -> dict[str, list[int]]:
    """{word: indices of the prompts that hold it}."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        for text in set(p.texts):
            out.setdefault(text, []).append(i)
    return out


def _learn_counts(prompts: list[_Prompt]) -> dict[str, int]:
    """Token counts of the file's tokenizer learned from all prompts (rule 2 of the module docstring).

    Greedy: among the single-word changes that make some prompt fit exactly, take the one that makes
    the most prompts of the files fit (the gain counts prompts it breaks against it), until no change
    gains `_MIN_GAIN`. A change applies to every occurrence of the word, so a count that holds in one
    place but not in another (" to" in " refers to" but not in " wanted to") loses there.
    """
    holding = _holding(prompts)
    learned: dict[str, int] = {}
    fits = [_fit(p, p.expected(learned)) is not None for p in prompts]
    while True:
        candidates = set()
        for p, ok in zip(prompts, fits):
            if not ok:
                fixes = _single_fixes(p, p.expected(learned))
                candidates.update((w, k) for w, k, _ in fixes if w not in learned)
        scored = []
        for word, k in candidates:
            trial = {**learned, word: k}
            after = [_fit(prompts[i], prompts[i].expected(trial)) is not None for i in holding[word]]
            gain = sum(after) - sum(fits[i] for i in holding[word])
            scored.append((gain, word, k, after))
        if not scored:
            break
        # most gain; on a tie the longer word (a long rare word is the likelier to be cut in more pieces)
        gain, word, k, after = min(scored, key=lambda s: (-s[0], -len(s[1].strip()), s[1], s[2]))
        if gain < _MIN_GAIN:
            break
        learned[word] = k
        for i, ok in zip(holding[word], after):
            fits[i] = ok
    return learned


def _contested(prompts: list[_Prompt], learned: dict[str, int]) -> dict[int, str]:
    """Prompts whose spans a rival of a learned count would place differently: {prompt index: why}.

    A rival of a learned count (word, k) is another single-word count that makes one of the prompts
    the learned count fits fit too. It counts when, in place of the learned count, it would itself
    gain `_MIN_GAIN` prompts, and is refuted when the learned count makes at least `_MIN_GAIN` more
    prompts of the files fit than it does; every prompt that a rival that counts and is not refuted
    places differently is contested.
    """
    holding = _holding(prompts)
    mine = [_fit(p, p.expected(learned)) is not None for p in prompts]
    out: dict[int, str] = {}
    for word, k in learned.items():
        base = {w: c for w, c in learned.items() if w != word}
        # without the learned count: only the prompts that hold the word fit differently
        unlearned = list(mine)
        for i in holding[word]:
            unlearned[i] = _fit(prompts[i], prompts[i].expected(base)) is not None
        rivals = set()
        for i in holding[word]:
            if mine[i]:
                p = prompts[i]
                rivals.update(
                    (w, c) for w, c, _ in _single_fixes(p, p.expected(base)) if w != word and w not in learned
                )
        for other, c in sorted(rivals):
            rival = {**base, other: c}
            theirs = {i: _fit(prompts[i], prompts[i].expected(rival)) is not None for i in holding[other]}
            union = set(holding[word]) | set(holding[other])
            gain = sum(theirs.get(i, unlearned[i]) - unlearned[i] for i in union)
            lead = sum(mine[i] - theirs.get(i, unlearned[i]) for i in union)
            if gain < _MIN_GAIN or lead >= _MIN_GAIN:
                continue  # the rival would not have been learned on its own, or is refuted
            for i in sorted(union):
                a, b = _place(prompts[i], learned), _place(prompts[i], rival)
                if isinstance(a, _Placement) and isinstance(b, _Placement) and a.chars != b.chars:
                    out.setdefault(
                        i,
                        f"the rows fit about as well with {other!r} in {c} tokens as with {word!r} in {k}, "
                        "and the two place the spans differently",
                    )
    return out


@dataclass
class _Placement:
    chars: list[int]  # character offset of every span start
    cost: int  # sum over words of |tokens given - expected| (learned counts weighted)
    kind: str  # how sure: 'forced', 'exact' or 'closest' (KEPT_KINDS)


@dataclass
class _Rejected:
    kind: str  # EXCLUDED_KINDS
    detail: str


# Learned word counts (rule 2) weigh this much more than this tokenizer's own counts.
_LEARNED_WEIGHT = 2


def _rederive(
    text: str, length: int, starts: list[int], offsets, learned: dict[str, int] | None = None
) -> _Placement | _Rejected:
    """Where every span of one prompt starts, and how sure that is, or why it cannot be told."""
    return _place(_prompt(text, length, starts, offsets), learned or {})


def _place(p: _Prompt, learned: dict[str, int]) -> _Placement | _Rejected:
    """Place the spans of `p` (rules 1-3 of the module docstring).

    A prompt whose words fit the expected counts exactly is placed by them: any other placement would
    have to move some word off its count. Otherwise a dynamic program over words, run forwards and
    backwards: state (w, t) means word w starts at token t; a word given K tokens costs |K - expected|
    (learned counts weighted) and must let every span start inside it fall on one of its atoms
    (`_split_word`). For each span start it finds the cheapest placement that puts the start at each
    possible character; the prompt is placed only when one character is cheapest for every start.
    """
    expected = p.expected(learned)
    chars = _fit(p, expected)
    if chars is not None:
        return _Placement(chars, 0, "exact")
    weight = [_LEARNED_WEIGHT if t in learned else 1 for t in p.texts]
    n, total = len(p.words), p.total
    # a cost is (count cost, number-cut tie-break) folded into one integer, the tie-break below one unit
    unit = len(p.text) ** 2 + 1
    required = sorted(set(p.starts))
    forward: list[dict[int, int]] = [{} for _ in range(n + 1)]
    forward[0][0] = 0
    edges: list[tuple[int, int, int, int, dict[int, int]]] = []  # (w, t, k, cost, {token: char})
    for w in range(n):
        for t, cost in forward[w].items():
            for k in range(1, min(p.capacity(w), total - t) + 1):
                inner = frozenset(q - t for q in required if t < q < t + k)
                if len(p.words[w]) == 1 and inner:
                    break  # a span cannot start inside a single atom, and a larger k cannot help
                split = _split_word(p.words[w], k, inner)
                if split is None:
                    continue
                off = abs(k - expected[w]) * weight[w] * unit + split[0]
                edges.append((w, t, k, off, split[1]))
                if t + k not in forward[w + 1] or cost + off < forward[w + 1][t + k]:
                    forward[w + 1][t + k] = cost + off
    if total not in forward[n]:
        return _Rejected(
            "no fit",
            f"no split of the prompt into {total} tokens (length {total + 1} minus BOS) puts every span "
            "start at the start of a word",
        )
    backward: list[dict[int, int]] = [{} for _ in range(n + 1)]
    backward[n][total] = 0
    for w, t, k, off, _ in reversed(edges):
        if t + k in backward[w + 1]:
            rest = off + backward[w + 1][t + k]
            if t not in backward[w] or rest < backward[w][t]:
                backward[w][t] = rest
    best = backward[0][0]
    # the cheapest placement that puts span start q at each character: {q: {char: cost}}
    cheapest: dict[int, dict[int, int]] = {q: {} for q in required if q < total}
    for w, t, k, off, inner_chars in edges:
        if t + k not in backward[w + 1]:
            continue
        cost = forward[w][t] + off + backward[w + 1][t + k]
        for q in required:
            if t <= q < t + k:
                c = inner_chars[q - t]
                cheapest[q][c] = min(cost, cheapest[q].get(c, cost))
    char_at = {total: len(p.text)}
    for q, costs in cheapest.items():
        winners = [c for c, cost in costs.items() if cost == best]
        if len(winners) > 1:
            ends = {a.start: a.end for word in p.words for a in word}
            at = " or ".join(repr(p.text[c : ends.get(c, c + 1)]) for c in sorted(winners))
            return _Rejected(
                "ambiguous",
                f"the spans fit the token counts equally well in more than one way (index {q + 1} "
                f"could start at {at})",
            )
        char_at[q] = winners[0]
    forced = all(len(costs) == 1 for costs in cheapest.values())
    return _Placement([char_at[s] for s in p.starts], best // unit, "forced" if forced else "closest")


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
    placements: list[_Placement | _Rejected] = []
    if mode == "rederived":
        prompts = [
            _prompt(row.prompt, row.length, row.starts, own_offsets[k])
            for k, row in enumerate(clean.rows + cf.rows)
        ]
        report.learned_counts = _learn_counts(prompts)
        contested = _contested(prompts, report.learned_counts)
        placements = [
            _Rejected("ambiguous", contested[k]) if k in contested else _place(p, report.learned_counts)
            for k, p in enumerate(prompts)
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
            texts, kind = None, "indices"
        else:
            result = _rederive_pair(
                tokenizer,
                columns,
                [(a, placements[k]), (b, placements[n_rows + k])],
                prepend_bos,
            )
            if isinstance(result, _Rejected):
                report.exclude(a.number, result.kind, result.detail)
                continue
            ids_c, ids_x, starts, texts, kind = result
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
                report.exclude(a.number, "answer", f"field '{column}': {message}")
                continue
        else:
            yy = int(a.cells["label"])
            correct, wrong = _greater_than_answers(gt_scoring, gt_table, yy)
            if not correct:
                reason = (
                    f"field 'label': no {gt_scoring} continuation makes the end year greater than {yy:02d}"
                )
                report.exclude(a.number, "label", reason)
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
            origin=where,  # later checks against a model name the file and row
        )
        validate_example(ex, schema, where, n_ctx)
        examples.append(ex)
        report.kept_by[kind] += 1

    report.rows_kept = len(examples)
    if not examples:
        counts = "; ".join(report.summary()) or "the file has no data rows"
        raise DatasetError(f"{clean.path}: no row could be converted for this tokenizer ({counts})")
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
            "rows_kept_by": dict(report.kept_by),
            "rows_excluded_by": dict(report.excluded_by),
            "learned_word_counts": dict(report.learned_counts),
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
        origin=str(clean.path),
    )
    return dataset, report


def _rederive_pair(tokenizer, columns, pair, prepend_bos: bool):
    """(clean ids, counterfactual ids, span starts, span texts, how sure) for one row pair, or why it is
    left out. `pair`: (row, placement) for the clean then the counterfactual row; the pair is as sure
    as the less sure of its two placements.
    """
    out, kinds = [], []
    for label, (row, placed) in zip(("clean", "counterfactual"), pair):
        if isinstance(placed, _Rejected):
            return _Rejected(placed.kind, f"{label} prompt: {placed.detail}")
        segments = _segments(columns, row.prompt, placed.chars)
        try:
            ids, starts = tokenize_segments(tokenizer, segments, prepend_bos)
        except DatasetError as exc:
            return _Rejected("straddle", f"{label} prompt: {exc}")
        out.append((ids, starts, {name: text for name, text in segments}))
        kinds.append(placed.kind)
    (ids_c, starts_c, texts), (ids_x, starts_x, _) = out
    if len(ids_c) != len(ids_x):
        return _Rejected(
            "pair",
            f"the counterfactual prompt is {len(ids_x)} tokens for this tokenizer but the clean one is "
            f"{len(ids_c)}",
        )
    if starts_c != starts_x:
        return _Rejected(
            "pair",
            f"span boundaries differ between clean {starts_c} and counterfactual {starts_x} for this "
            "tokenizer",
        )
    return ids_c, ids_x, starts_c, texts, max(kinds, key=list(KEPT_KINDS).index)

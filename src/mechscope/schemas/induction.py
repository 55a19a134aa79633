"""Schema induction without an LLM (issue 7; docs/method.md §9): named spans from the data and the
model's saliency.

1. **Anchors.** Tokens shared by (nearly) every prompt, in the same order: a progressive longest
   common subsequence over the clean prompts' token ids (after the BOS token). A prompt that would
   shrink the anchor list by more than `tolerance` does not update it; prompts that do not contain the
   final anchors as a subsequence are reported and excluded.
2. **Alignment.** Each prompt's anchors are placed by dynamic programming so that the stretches
   between them (the slots) have lengths as close as possible to their typical (median) lengths; two
   rounds, starting from the leftmost placement. Anchors that are never separated by a slot merge into
   one span; slots that are empty everywhere disappear.
3. **Content cuts.** Tokens are classed as names (a capitalised word after a space), numbers (digits)
   or text. When (nearly) every prompt fills a slot with the same sequence of name / number runs and
   text between them, the slot is cut at those runs (e.g. " John went to" -> name | text).
   **Saliency cuts.** A slot whose last (or first) token is, on average over the prompts, at least
   1.5 times as salient (|input x gradient|) as its other tokens is cut there, so that token gets a span
   of its own; the final token (where the logits read) always gets its own span, `end`.
4. **Names** from typical content: an anchor span is named by its words (`and`, `gave_a_drink`) or
   its punctuation (`comma`, `dot`); a slot by what fills it (`name` for capitalised single words,
   `number` for digits, `word` for other single words, `text` otherwise), numbered when repeated.
5. **Checks.** Every kept example tiles its tokens with the spans in schema order (validated like any
   dataset row); the report gives the valid fraction and why each excluded example failed.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

from ..data.dataset import BOS_SPAN, DatasetError, PromptPair, PromptPairDataset, Schema, validate_example


@dataclass
class InductionReport:
    schema: Schema
    n_examples: int
    kept: list[int] = field(default_factory=list)  # indices into the input dataset
    excluded: list[tuple[int, str]] = field(default_factory=list)

    @property
    def valid_fraction(self) -> float:
        return len(self.kept) / self.n_examples if self.n_examples else 0.0


# ------------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------------


def _lcs(a: list[int], b: list[int]) -> list[int]:
    """A longest common subsequence of a and b (ties resolved towards earlier positions of b)."""
    n, m = len(a), len(b)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, nxt = table[i], table[i + 1]
        for j in range(m - 1, -1, -1):
            row[j] = nxt[j + 1] + 1 if a[i] == b[j] else max(nxt[j], row[j + 1])
    out, i, j = [], 0, 0
    while i < n and j < m:
        if a[i] == b[j]:
            out.append(a[i])
            i += 1
            j += 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


def find_anchors(sequences: list[list[int]], tolerance: float = 0.3, ambiguity: float = 0.2,
                 first: int | None = None, banned: set[int] | None = None) -> list[int]:
    """Token ids common to the sequences in order (progressive LCS, outliers skipped).

    A token that occurs in a prompt more often than among the anchors can be placed in more than one
    way; when that is so in more than `ambiguity` of the prompts the token is banned from the anchors
    (it plays different roles in different prompts) and the anchors are recomputed without it."""
    if not sequences:
        return []
    banned = set(banned or ())
    while True:
        views = [[t for t in s if t not in banned] for s in sequences]
        order = sorted(range(len(views)), key=lambda i: len(views[i]))
        if first is not None:  # start the progressive LCS from another prompt
            order.remove(first)
            order.insert(0, first)
        anchors = list(views[order[0]])
        for i in order[1:]:
            common = _lcs(anchors, views[i])
            if len(common) >= (1 - tolerance) * len(anchors):
                anchors = common
        in_anchors = {t: anchors.count(t) for t in set(anchors)}
        ambiguous = {t for t, n in in_anchors.items()
                     if sum(s.count(t) > n for s in sequences) > ambiguity * len(sequences)}
        if not ambiguous:
            return anchors
        banned |= ambiguous


def _contains(seq: list[int], anchors: list[int]) -> bool:
    it = iter(seq)
    return all(any(tok == a for tok in it) for a in anchors)


def _place(seq: list[int], anchors: list[int], target: list[float] | None) -> list[int]:
    """Positions of the anchors in seq: leftmost when `target` is None, else the placement whose slot
    lengths (before, between and after the anchors) are closest to `target` in total |difference|."""
    if target is None:
        out, pos = [], 0
        for a in anchors:
            while seq[pos] != a:
                pos += 1
            out.append(pos)
            pos += 1
        return out
    n, k = len(seq), len(anchors)
    if k == 0:
        return []
    inf = float("inf")
    # best[j][p]: cost of placing anchors 0..j with anchor j at position p; prev for the traceback.
    best = [[inf] * n for _ in range(k)]
    prev = [[-1] * n for _ in range(k)]
    for p in range(n):
        if seq[p] == anchors[0]:
            best[0][p] = abs(p - target[0])
    for j in range(1, k):
        for p in range(n):
            if seq[p] != anchors[j]:
                continue
            for q in range(p):
                if best[j - 1][q] < inf:
                    cost = best[j - 1][q] + abs(p - q - 1 - target[j])
                    if cost < best[j][p]:
                        best[j][p], prev[j][p] = cost, q
    last = min(range(n), key=lambda p: best[k - 1][p] + abs(n - p - 1 - target[k]))
    out = [last]
    for j in range(k - 1, 0, -1):
        out.append(prev[j][out[-1]])
    return out[::-1]


def _slot_lengths(n: int, positions: list[int]) -> list[int]:
    bounds = [-1] + positions + [n]
    return [bounds[i + 1] - bounds[i] - 1 for i in range(len(bounds) - 1)]


# ------------------------------------------------------------------------------------------------
# Spans and names
# ------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", text)


def _anchor_name(text: str) -> str:
    words = [w.lower() for w in _words(text)]
    if words and all(w.isdigit() for w in words):
        return "number"
    if words:
        return "_".join(words[:3])
    stripped = text.strip()
    return {",": "comma", ".": "dot", ":": "colon", ";": "semicolon", "?": "question", "!": "exclamation",
            "'": "quote", '"': "quote"}.get(stripped, "punct")


def _slot_name(contents: list[list[str]]) -> str:
    filled = [c for c in contents if c]
    if not filled:
        return "text"
    if all(c == filled[0] for c in filled) and len(filled) == len(contents):
        return _anchor_name("".join(filled[0]))  # the same words everywhere: named like an anchor
    single = all(len(c) == 1 for c in filled)
    texts = ["".join(c).strip() for c in filled]
    if single and all(t[:1].isupper() and t.isalpha() for t in texts):
        return "name"
    if all(t.isdigit() for t in texts):
        return "number"
    if single and all(t.isalpha() for t in texts):
        return "word"
    return "text"


def _unique(names: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for n in names:
        n = f"{n}_word" if n == BOS_SPAN else n
        seen[n] = seen.get(n, 0) + 1
        out.append(f"{n}_{seen[n]}" if counts.get(n, 0) > 1 else n)
    return out


# ------------------------------------------------------------------------------------------------
# Induction
# ------------------------------------------------------------------------------------------------


def induce_schema(
    dataset: PromptPairDataset,
    tokenizer,
    saliency: list | None = None,
    tolerance: float = 0.3,
    cut_agreement: float = 0.75,
    pattern_agreement: float = 0.95,
    cut_ratio: float = 1.5,
) -> tuple[PromptPairDataset, InductionReport]:
    """A schema for `dataset`'s prompts (its own schema, if any, is ignored) and the dataset under it,
    with the examples that do not fit excluded (see the report).

    tolerance: how much a prompt may shrink the anchor list and still update it (outliers do not); if
    fewer than `pattern_agreement` of the prompts then contain the anchors, they are recomputed from
    every prompt. cut_agreement: share of prompts in which a slot must hold two tokens or more for a
    saliency cut; cut_ratio: how much more salient its end token must be than the rest, on average. pattern_agreement: share of prompts that must share a slot's
    name / number pattern for a content cut (the others are excluded)."""
    examples = dataset.examples
    if not examples:
        raise DatasetError("cannot induce a schema for an empty dataset")
    bos = bos_length(examples, tokenizer)
    seqs = [list(ex.clean[bos:]) for ex in examples]
    # The progressive LCS depends on where it starts when prompts come from several templates: try a
    # few starts (prompts of different lengths) and keep the finest schema that fits enough prompts.
    by_length = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    starts = sorted({by_length[round(q * (len(seqs) - 1))] for q in (0, 0.2, 0.4, 0.6, 0.8, 1.0)})
    # Each anchor list is also tried without each of its tokens, since a shared token can still play
    # different roles in different templates. The winner fits enough prompts and has the most spans,
    # names and numbers counted twice (separating them is what a schema is for).
    candidates: list[list[int]] = []
    for first in starts:
        for tol in (tolerance, 1.0):
            base = find_anchors(seqs, tol, first=first)
            # Only tokens some prompt holds more often than the anchors do can be misplaced.
            doubtful = sorted(t for t in set(base) if any(q.count(t) > base.count(t) for q in seqs))
            for extra in [None] + doubtful:
                anchors = base if extra is None else find_anchors(seqs, tol, first=first, banned={extra})
                if anchors not in candidates:
                    candidates.append(anchors)
    best = None
    for anchors in candidates:
        result = _induce(dataset, tokenizer, saliency, seqs, bos, anchors, cut_agreement, pattern_agreement,
                         cut_ratio)
        spans = result[1].schema.spans
        typed = sum(n.startswith(("name", "number")) for n in spans)
        key = (result[1].valid_fraction >= pattern_agreement, len(spans) + typed, result[1].valid_fraction)
        if best is None or key > best[0]:
            best = (key, result)
    return best[1]


def _induce(dataset, tokenizer, saliency, seqs, bos, anchors, cut_agreement, pattern_agreement, cut_ratio):
    """The rest of `induce_schema` for one anchor list."""
    examples = dataset.examples
    fits = [i for i, s in enumerate(seqs) if len(s) > 0 and _contains(s, anchors)]
    fit_set = set(fits)
    excluded = [(i, "does not contain the prompts' shared tokens in order") for i in range(len(seqs))
                if i not in fit_set]
    placements = {i: _place(seqs[i], anchors, None) for i in fits}
    for _ in range(2):
        lengths = [_slot_lengths(len(seqs[i]), placements[i]) for i in fits]
        target = [statistics.median(col) for col in zip(*lengths)] if lengths else []
        placements = {i: _place(seqs[i], anchors, target) for i in fits}

    # Pieces of each example in order: slot 0, anchor 0, slot 1, ..., anchor K-1, slot K, each a
    # (kind, index) with [start, end) positions in the prompt after BOS.
    def pieces(i: int) -> list[tuple[int, int]]:
        bounds, pos = [], 0
        for p in placements[i]:
            bounds.append((pos, p))  # slot
            bounds.append((p, p + 1))  # anchor
            pos = p + 1
        bounds.append((pos, len(seqs[i])))
        return bounds

    all_pieces = {i: pieces(i) for i in fits}
    n_pieces = 2 * len(anchors) + 1
    # Group pieces into spans: drop slots empty everywhere; merge anchors not separated by a slot.
    groups: list[list[int]] = []
    for k in range(n_pieces):
        is_slot = k % 2 == 0
        if is_slot and all(all_pieces[i][k][0] == all_pieces[i][k][1] for i in fits):
            continue
        if not is_slot and groups and groups[-1][-1] % 2 == 1:
            groups[-1].append(k)
            continue
        groups.append([k])
    spans = [{"pieces": g, "kind": "slot" if g[0] % 2 == 0 else "anchor"} for g in groups]

    def span_ranges(i: int) -> list[tuple[int, int]]:
        ps = all_pieces[i]
        return [(ps[s["pieces"][0]][0], ps[s["pieces"][-1]][1]) for s in spans]

    ranges = {i: span_ranges(i) for i in fits}
    # Content cuts: split slots at their name / number runs where the pattern is shared.
    text_of = {}

    def klass(token: int) -> str:
        if token not in text_of:
            t = tokenizer.decode([token])
            core = t.strip()
            if core.isdigit():
                text_of[token] = "number"
            elif t.startswith(" ") and core[:1].isupper() and core.isalpha():
                text_of[token] = "name"
            else:
                text_of[token] = "text"
        return text_of[token]

    def runs(i: int, a: int, b: int) -> list[tuple[str, int, int]]:
        out: list[tuple[str, int, int]] = []
        for t in range(a, b):
            k = klass(seqs[i][t])
            if out and out[-1][0] == k and k != "name":  # each name is a run of its own
                out[-1] = (k, out[-1][1], t + 1)
            else:
                out.append((k, t, t + 1))
        return out

    new_spans, new_ranges = [], {i: [] for i in fits}
    drop: set[int] = set()
    for si, sp in enumerate(spans):
        pattern_of = {}
        if sp["kind"] == "slot":
            pattern_of = {i: runs(i, *ranges[i][si]) for i in fits}
            patterns = [tuple(k for k, _, _ in r) for r in pattern_of.values()]
            common = max(set(patterns), key=patterns.count) if patterns else ()
            useful = len(common) > 1 and any(k != "text" for k in common)
            if useful and patterns.count(common) >= pattern_agreement * len(patterns):
                for i in fits:
                    if tuple(k for k, _, _ in pattern_of[i]) != common:
                        drop.add(i)
                new_spans += [{"kind": "slot"} for _ in common]
                for i in fits:
                    if i not in drop:
                        new_ranges[i] += [(a, b) for _, a, b in pattern_of[i]]
                continue
            # No shared pattern: cut a name / number run off either end where nearly all prompts have one.
            heads = [r[0][0] if len(r) > 1 else None for r in pattern_of.values()]
            tails = [r[-1][0] if len(r) > 1 else None for r in pattern_of.values()]
            head = next((k for k in ("name", "number") if heads.count(k) >= pattern_agreement * len(heads)), None)
            tail = next((k for k in ("name", "number") if tails.count(k) >= pattern_agreement * len(tails)), None)
            if head or tail:
                new_spans += [{"kind": "slot"} for _ in range(1 + bool(head) + bool(tail))]
                for i in fits:
                    r = pattern_of[i]
                    if (head and (len(r) < 2 or r[0][0] != head)) or (tail and (len(r) < 2 or r[-1][0] != tail)):
                        drop.add(i)
                        continue
                    a, b = ranges[i][si]
                    mid_a = r[0][2] if head else a
                    mid_b = r[-1][1] if tail else b
                    new_ranges[i] += ([(a, mid_a)] if head else []) + [(mid_a, mid_b)] + ([(mid_b, b)] if tail else [])
                continue
        new_spans.append(sp)
        for i in fits:
            new_ranges[i].append(ranges[i][si])
    excluded += [(i, "its slot contents do not follow the names / numbers pattern of the others") for i in drop]
    fits = [i for i in fits if i not in drop]
    spans, ranges = new_spans, {i: new_ranges[i] for i in fits}
    # Saliency cuts: a slot whose last (first) token is, averaged over the prompts, at least
    # `cut_ratio` times as salient as the slot's other tokens gets cut there.
    cuts: list[tuple[int, str]] = []
    if saliency is not None:
        for si, s in enumerate(spans):
            if s["kind"] != "slot":
                continue
            ends = {"first": [0.0, 0.0], "last": [0.0, 0.0]}  # [edge token total, rest mean total]
            counted = 0
            for i in fits:
                a, b = ranges[i][si]
                if b - a < 2:
                    continue
                values = [abs(float(saliency[i][bos + t])) for t in range(a, b)]
                counted += 1
                ends["first"][0] += values[0]
                ends["first"][1] += sum(values[1:]) / (len(values) - 1)
                ends["last"][0] += values[-1]
                ends["last"][1] += sum(values[:-1]) / (len(values) - 1)
            if counted < cut_agreement * len(fits):
                continue  # most prompts leave this slot too short to cut
            ratios = {k: v[0] / max(v[1], 1e-12) for k, v in ends.items()}
            side = max(ratios, key=ratios.get)
            if ratios[side] >= cut_ratio:
                cuts.append((si, side))
    # Apply cuts (and the final token's own span) to the span list and every example's ranges.
    new_spans, new_ranges = [], {i: [] for i in fits}
    cut_of = dict(cuts)
    for si, s in enumerate(spans):
        how = cut_of.get(si)
        if how is None:
            new_spans.append(s)
            for i in fits:
                new_ranges[i].append(ranges[i][si])
            continue
        new_spans += [{"kind": "slot"}, {"kind": "slot"}]
        for i in fits:
            a, b = ranges[i][si]
            if b - a == 0:
                new_ranges[i] += [(a, a), (a, a)]
            elif how == "last":
                split = b - 1 if b - a >= 2 else a
                new_ranges[i] += [(a, split), (split, b)]
            else:
                split = a + 1
                new_ranges[i] += [(a, split), (split, b)]
    spans, ranges = new_spans, new_ranges
    if any(ranges[i][-1][1] - ranges[i][-1][0] > 1 for i in fits):
        spans.append({"kind": "end"})
        for i in fits:
            a, b = ranges[i][-1]
            ranges[i][-1] = (a, max(a, b - 1))
            ranges[i].append((max(a, b - 1), b))
    else:
        spans[-1] = dict(spans[-1], kind="end")

    names = []
    for si, s in enumerate(spans):
        contents = [[tokenizer.decode([t]) for t in seqs[i][slice(*ranges[i][si])]] for i in fits]
        if s["kind"] == "end":
            names.append("end")
        elif s["kind"] == "anchor":
            names.append(_anchor_name("".join(contents[0])) if contents else "anchor")
        else:
            names.append(_slot_name(contents))
    schema = Schema(tuple([BOS_SPAN] + _unique(names)))

    starts = {i: [0] + [bos + a for a, _ in ranges[i]] for i in fits}
    return assign_schema(dataset, schema, starts, excluded)


def assign_schema(dataset: PromptPairDataset, schema: Schema, starts: dict[int, list[int]],
                  excluded: list[tuple[int, str]]) -> tuple[PromptPairDataset, InductionReport]:
    """The examples `starts` names, given those span starts under `schema` and validated; the ones
    that fail validation join `excluded` (index, reason)."""
    kept_examples, kept, excluded = [], [], list(excluded)
    for i in sorted(starts):
        new = PromptPair(**{**dataset.examples[i].__dict__, "span_starts": starts[i]})
        try:
            validate_example(new, schema, f"example {i}")
        except DatasetError as exc:
            excluded.append((i, str(exc)))
            continue
        kept_examples.append(new)
        kept.append(i)
    excluded.sort()
    return dataset._with(kept_examples, schema), InductionReport(schema, len(dataset), kept, excluded)


def bos_length(examples, tokenizer) -> int:
    """1 when every prompt starts with a special (BOS) token, which then forms the `bos` span; else 0."""
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    return 1 if all(ex.clean and ex.clean[0] in specials for ex in examples) else 0


def strip_schema(dataset: PromptPairDataset) -> PromptPairDataset:
    """The dataset with its schema removed: one span (`bos`) over every token."""
    return dataset.single_span(BOS_SPAN)


def mark_spans(example: PromptPair, schema: Schema, tokenizer) -> str:
    """The clean prompt with its spans marked: [name: text] ..."""
    parts = []
    for name, (a, b) in zip(schema.spans, example.span_bounds()):
        if b > a:
            parts.append(f"[{name}:{tokenizer.decode(example.clean[a:b])}]")
    return " ".join(parts)

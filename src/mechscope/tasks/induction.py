"""Induction: continuing a repeated random token sequence.

A random sequence A of L word tokens is shown, then repeated up to its second-to-last token:
[BOS] a1 .. aL a1 .. a(L-1). Nothing but the earlier occurrence says what comes next, so the next
token aL is predictable only by induction ("the token after a(L-1) last time was aL"). The task
measures induction heads and the previous-token heads feeding them.

Scoring: the logit of aL at the last position (`logit_diff` with no wrong answers).

Counterfactual: the first occurrence replaced by another random sequence of the same length, drawn
from tokens not in A, so the prompt holds no earlier a(L-1) to copy from.

Spans: `first` (the first occurrence), `second` (the repeat up to a(L-2)) and `last` (the token
a(L-1) whose prediction is scored).
"""

from __future__ import annotations

import random

from ..data import DatasetError, PromptPair, make_pair
from ._build import PerTokenizerCache, build, check_common

SEGMENTS = ("first", "second", "last")


def _word_tokens(tokenizer) -> list[int]:
    # Ordinary words (a space then ASCII letters) that encode back to the same single token, so a
    # sequence of them written as text tokenizes into exactly those tokens.
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    candidates = [
        (i, t)
        for i, t in zip(ids, texts)
        if len(t) >= 2 and t[0] == " " and t[1:].isascii() and t[1:].isalpha()
    ]
    if not candidates:
        return []
    encoded = tokenizer([t for _, t in candidates], add_special_tokens=False)["input_ids"]
    return [i for (i, _), enc in zip(candidates, encoded) if list(enc) == [i]]


word_tokens = PerTokenizerCache(_word_tokens)


def make_induction(
    tokenizer,
    n: int,
    seed: int = 0,
    prepend_bos: bool = True,
    length: int = 10,
):
    """Repeated-sequence prompt pairs; `length` is the number of tokens in the first occurrence (>= 2)."""
    check_common(tokenizer, n, prepend_bos)
    if not isinstance(length, int) or isinstance(length, bool) or length < 2:
        raise DatasetError(f"option 'length' must be an integer of at least 2, not {length!r}")
    pool = word_tokens(tokenizer)
    if len(pool) < 2 * length:
        raise DatasetError(
            f"task 'induction' with length {length} needs {2 * length} distinct word tokens; this "
            f"tokenizer has only {len(pool)} tokens that are a space followed by letters"
        )
    bos = [tokenizer.bos_token_id] if prepend_bos else []

    def text(ids: list[int]) -> str:
        return "".join(tokenizer.decode([i]) for i in ids)

    def draw(rng: random.Random) -> PromptPair:
        # Distinct tokens throughout: a repeat inside A would make the continuation ambiguous.
        drawn = rng.sample(pool, 2 * length)
        seq, other = drawn[:length], drawn[length:]
        tail = [("second", text(seq[:-2])), ("last", text(seq[-2:-1]))]
        ex = make_pair(
            tokenizer,
            [("first", text(seq))] + tail,
            [("first", text(other))] + tail,
            [seq[-1]],
            [],
            prepend_bos,
            meta={"sequence": seq, "counterfactual_sequence": other},
        )
        if ex.clean != bos + seq + seq[:-1] or ex.counterfactual != bos + other + seq[:-1]:
            raise DatasetError(f"the words of {ex.clean_text!r} do not tokenize back into the drawn tokens")
        return ex

    info = {
        "options": {"length": length},
        "templates": ["[BOS] a1 .. aL a1 .. a(L-1) -> aL"],
        "n_word_tokens": len(pool),
        "scoring": "logit",
        "scoring_note": "logit of the token that followed the last token's earlier occurrence; the "
        "counterfactual replaces the first occurrence by other random tokens.",
    }
    return build("induction", "logit_diff", tokenizer, n, seed, prepend_bos, SEGMENTS, draw, info)

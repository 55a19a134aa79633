"""From text a person writes to token spans.

A prompt is written as a list of `(span_name, text)` pieces; joined, they are the prompt. Tokenizing
the joined text with character offsets tells which piece each token comes from: a token belongs to the
piece holding its first non-space character (a whitespace-only token, to the piece where it starts).
A token whose visible characters come from two pieces cannot be assigned and is an error: move the
piece boundary to a token boundary.
"""

from __future__ import annotations

from typing import Sequence

from .dataset import BOS_SPAN, DatasetError, PromptPair, Schema

Segments = Sequence[tuple[str, str]]


def bos_id(tokenizer) -> int | None:
    """The BOS id to prepend, or None when the tokenizer has no BOS token."""
    return tokenizer.bos_token_id


def pad_id(tokenizer) -> int:
    """The id used for right padding: the tokenizer's pad token, else its EOS token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def schema_for(segments: Segments, prepend_bos: bool = True) -> Schema:
    names = [name for name, _ in segments]
    return Schema(tuple(([BOS_SPAN] if prepend_bos else []) + names))


def tokenize_segments(tokenizer, segments: Segments, prepend_bos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the joined text (BOS first when `prepend_bos`) and the start of every span.

    The spans are `bos` (when prepended) followed by the segments in order; an empty segment gives an
    empty span.
    """
    text = "".join(t for _, t in segments)
    bounds = [0]
    for _, t in segments:
        bounds.append(bounds[-1] + len(t))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])

    seg_of_token = []
    for (start, end), tok in zip(offsets, ids):
        piece = text[start:end]
        anchor = start + (len(piece) - len(piece.lstrip())) if piece.strip() else start
        k = _segment_at(bounds, anchor)
        last_visible = start + len(piece.rstrip()) - 1 if piece.strip() else start
        if piece.strip() and last_visible >= bounds[k + 1]:
            other = _segment_at(bounds, last_visible)
            raise DatasetError(
                f"token {tokenizer.decode([tok])!r} spans segments '{segments[k][0]}' and "
                f"'{segments[other][0]}' of {text!r}; put the segment boundary at a token boundary"
            )
        seg_of_token.append(k)

    offset = 1 if prepend_bos else 0
    starts = []
    for k in range(len(segments)):
        first = next((i for i, s in enumerate(seg_of_token) if s >= k), len(ids))
        starts.append(first + offset)
    if prepend_bos:
        bos = bos_id(tokenizer)
        if bos is None:
            raise DatasetError("the tokenizer has no BOS token; use prepend_bos=False")
        return [bos] + ids, [0] + starts
    return ids, starts


def _segment_at(bounds: list[int], char: int) -> int:
    for k in range(len(bounds) - 1):
        if bounds[k] <= char < bounds[k + 1]:
            return k
    return len(bounds) - 2


def single_token(tokenizer, text: str) -> int | None:
    """The id of `text` if it is exactly one token (no special tokens added), else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def answer_ids(tokenizer, answers: Sequence[str], field_name: str, require_single: bool = True) -> list[int]:
    """Token ids of answer strings, each of which must be one token when `require_single`."""
    out = []
    for a in answers:
        ids = tokenizer(a, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            if require_single:
                raise DatasetError(
                    f"field '{field_name}': answer {a!r} is {len(ids)} tokens for this tokenizer, "
                    "not a single token"
                )
            ids = ids[:1]
        out.append(ids[0])
    return out


def make_pair(
    tokenizer,
    clean: Segments,
    counterfactual: Segments,
    correct: Sequence[str] | Sequence[int],
    wrong: Sequence[str] | Sequence[int],
    prepend_bos: bool = True,
    meta: dict | None = None,
) -> PromptPair:
    """Build a validated `PromptPair` from segment lists and answers (strings or token ids).

    Raises DatasetError, naming the field ('clean', 'counterfactual', 'correct', 'wrong'), when the
    pair's token lengths or span boundaries differ, or an answer string is not a single token.
    """
    names_c = [n for n, _ in clean]
    names_x = [n for n, _ in counterfactual]
    if names_c != names_x:
        raise DatasetError(f"field 'counterfactual': segments {names_x} differ from the clean prompt's {names_c}")
    ids_c, starts_c = _tokenize_field(tokenizer, clean, prepend_bos, "clean")
    ids_x, starts_x = _tokenize_field(tokenizer, counterfactual, prepend_bos, "counterfactual")
    text_c = "".join(t for _, t in clean)
    text_x = "".join(t for _, t in counterfactual)
    if len(ids_c) != len(ids_x):
        raise DatasetError(
            f"field 'counterfactual': {len(ids_x)} tokens but the clean prompt has {len(ids_c)}; a pair must "
            f"have the same token length: {text_c!r} / {text_x!r}"
        )
    if starts_c != starts_x:
        raise DatasetError(
            f"field 'counterfactual': span boundaries {starts_x} differ from the clean prompt's {starts_c}: "
            f"{text_c!r} / {text_x!r}"
        )
    correct_ids = _as_ids(tokenizer, correct, "correct")
    wrong_ids = _as_ids(tokenizer, wrong, "wrong")
    return PromptPair(
        clean=ids_c,
        counterfactual=ids_x,
        correct=correct_ids,
        wrong=wrong_ids,
        span_starts=starts_c,
        clean_text=text_c,
        counterfactual_text=text_x,
        meta=dict(meta or {}),
    )


def _tokenize_field(tokenizer, segments: Segments, prepend_bos: bool, field_name: str):
    try:
        return tokenize_segments(tokenizer, segments, prepend_bos)
    except DatasetError as exc:
        raise DatasetError(f"field '{field_name}': {exc}") from None


def _as_ids(tokenizer, answers, field_name: str) -> list[int]:
    if all(isinstance(a, int) for a in answers):
        return list(answers)
    return answer_ids(tokenizer, answers, field_name)

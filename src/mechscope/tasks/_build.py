"""Shared machinery of the task generators: the resampling loop and the dataset wrapper.

A generator describes one example at a time as a function of a `random.Random`; a draw that does not
work for the tokenizer at hand (a name that splits into two tokens, a boundary inside a token, a pair
of unequal length) raises `DatasetError` and is simply drawn again. Only when draws keep failing do we
give up, and then the message carries the last reason so the user can see what the tokenizer objects to.
"""

from __future__ import annotations

import numbers
import random
import weakref
from typing import Any, Callable, Sequence

from ..data import DatasetError, PromptPair, PromptPairDataset, schema_for, tokenizer_fingerprint
from ..data.dataset import validate_example
from ..data.spans import pad_id

# Draws allowed per requested example (plus a fixed allowance) before a generator gives up. Generous,
# because some tokenizers reject most draws of a template; and when the first TRIES_BASE draws all
# fail the case is taken as hopeless, so a tokenizer that fits no draw is reported quickly.
TRIES_PER_EXAMPLE = 50
TRIES_BASE = 500


def check_common(tokenizer, n: int, prepend_bos: bool) -> None:
    """Reject arguments every generator rejects, before any sampling starts."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise DatasetError(f"the number of examples must be a non-negative integer, not {n!r}")
    if prepend_bos and tokenizer.bos_token_id is None:
        raise DatasetError("the tokenizer has no BOS token; use prepend_bos=False")


def choose_option(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise DatasetError(f"option '{name}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return value


def segments(names: Sequence[str], texts: Sequence[str]) -> list[tuple[str, str]]:
    """Pair span names with texts; building every example through this keeps the schema fixed."""
    return list(zip(names, texts, strict=True))


def span_tokens(ex: PromptPair, schema_names: Sequence[str], name: str, which: str = "clean") -> list[int]:
    """The token ids of span `name` in the clean (or counterfactual) prompt of `ex`."""
    i = list(schema_names).index(name)
    a, b = ex.span_bounds()[i]
    return list(getattr(ex, which)[a:b])


def build(
    task: str,
    metric: str,
    tokenizer,
    n: int,
    seed: int,
    prepend_bos: bool,
    segment_names: Sequence[str],
    draw: Callable[[random.Random], PromptPair],
    info: dict[str, Any],
) -> PromptPairDataset:
    """Draw examples with `random.Random(seed)` until there are `n` valid ones.

    `draw` returns a `PromptPair` whose spans follow `segment_names` (BOS first when `prepend_bos`), or
    raises DatasetError for a draw that should be redrawn.
    """
    schema = schema_for([(name, "") for name in segment_names], prepend_bos)
    rng = random.Random(seed)
    examples: list[PromptPair] = []
    n = int(n)
    tries, limit = 0, TRIES_PER_EXAMPLE * n + TRIES_BASE
    last_problem: str | None = None
    while len(examples) < n:
        if tries >= limit or (not examples and tries >= TRIES_BASE):
            raise DatasetError(
                f"task '{task}': built only {len(examples)} of {n} examples in {tries} draws; this "
                f"tokenizer rejects {'all' if not examples else 'most'} of them. Last problem: {last_problem}"
            )
        tries += 1
        try:
            ex = draw(rng)
        except DatasetError as exc:
            last_problem = str(exc)
            continue
        # A draw that breaks the schema is a bug in the generator, not a property of the tokenizer.
        validate_example(ex, schema, f"task '{task}': example {len(examples)}")
        examples.append(ex)
    return PromptPairDataset(
        examples=examples,
        schema=schema,
        task=task,
        metric=metric,
        tokenizer=tokenizer_fingerprint(tokenizer),
        pad_token_id=pad_id(tokenizer),
        info=info,
    )


class PerTokenizerCache:
    """Remember a value computed from a tokenizer for as long as that tokenizer object lives."""

    def __init__(self, compute: Callable[[Any], Any]):
        self._compute = compute
        self._values: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()

    def __call__(self, tokenizer):
        try:
            return self._values[tokenizer]
        except KeyError:
            pass
        except TypeError:  # an object that cannot be weakly referenced: compute every time
            return self._compute(tokenizer)
        value = self._compute(tokenizer)
        self._values[tokenizer] = value
        return value

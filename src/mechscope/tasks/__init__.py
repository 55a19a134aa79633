"""Built-in tasks: generators of clean / counterfactual prompt-pair datasets (docs/method.md §7).

Each generator takes a Hugging Face tokenizer, the number of examples and a seed, and returns a
`PromptPairDataset` whose prompts, answers and span boundaries fit that tokenizer: words that are not
single tokens for it are left out, and draws that do not tokenize cleanly are drawn again. The same
seed gives the same dataset.

>>> ds = make_task("ioi", tokenizer, n=200, seed=0, templates="ABBA")
"""

from __future__ import annotations

import inspect
from typing import Callable

from ..data import DatasetError, PromptPairDataset
from .greater_than import make_greater_than
from .induction import make_induction
from .ioi import make_ioi
from .winobias import make_winobias

TASKS: dict[str, Callable[..., PromptPairDataset]] = {
    "ioi": make_ioi,
    "greater-than": make_greater_than,
    "winobias": make_winobias,
    "induction": make_induction,
}

_COMMON = ("tokenizer", "n", "seed", "prepend_bos")


def task_options(name: str) -> dict[str, object]:
    """The task-specific options of task `name` with their defaults."""
    params = inspect.signature(_generator(name)).parameters
    return {k: p.default for k, p in params.items() if k not in _COMMON}


def _generator(name: str) -> Callable[..., PromptPairDataset]:
    try:
        return TASKS[name]
    except KeyError:
        raise DatasetError(f"unknown task '{name}'; the built-in tasks are: {', '.join(TASKS)}") from None


def make_task(
    name: str, tokenizer, n: int, seed: int = 0, prepend_bos: bool = True, **options
) -> PromptPairDataset:
    """Generate `n` prompt pairs of built-in task `name` for `tokenizer` (see `TASKS`)."""
    generator = _generator(name)
    known = task_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = ", ".join(known) if known else "none"
        raise DatasetError(
            f"task '{name}' has no option {', '.join(map(repr, unknown))}; its options: {allowed}"
        )
    return generator(tokenizer, n, seed=seed, prepend_bos=prepend_bos, **options)


__all__ = ["TASKS", "make_task", "task_options"]

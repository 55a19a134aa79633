"""Prompt-pair tasks for compiled programs.

Each example is a clean input from the program's input space and a counterfactual of the same token
length whose program output at the last position differs; the metric is the logit difference on the
output directions at the last position (the output value itself for a numerical program). The
schema gives every position its own span (`bos`, `p1`, ..., `p{max_seq_len}`; positions past an
example's length are empty spans), so PEAP scores stay per position.

A program whose output is the same for every input of one length (`length`) gets
`pad_counterfactuals`: its counterfactuals replace the first k tokens by the compiler's PAD token.
The selectors of a tracr model match no PAD key, so the last position then computes the program on
the n - k real tokens; the counterfactual's output is the RASP program's on those tokens (the model
is tested to agree).
"""

from __future__ import annotations

import itertools
import random

from ...data.dataset import PromptPair, PromptPairDataset, Schema, tokenizer_fingerprint
from .compile import PAD, CompiledProgram


def schema(max_seq_len: int) -> Schema:
    return Schema(("bos",) + tuple(f"p{i}" for i in range(1, max_seq_len + 1)))


def all_inputs(vocab, length: int, unique: bool = False) -> list[tuple]:
    """Every input of `length` over `vocab` (without repeated tokens when `unique`)."""
    vocab = sorted(vocab, key=str)
    if unique:
        return list(itertools.permutations(vocab, length))
    return list(itertools.product(vocab, repeat=length))


def _last_output(compiled: CompiledProgram, values) -> object:
    return compiled.run_program(values)[-1]


def _outputs(compiled: CompiledProgram, length: int, unique: bool):
    """(input, last-position output) for every input of `length` (cached on the compiled program)."""
    cache = compiled.__dict__.setdefault("_last_outputs", {})
    if (length, unique) not in cache:
        cache[length, unique] = [(x, _last_output(compiled, x)) for x in all_inputs(compiled.vocab, length, unique)]
    return cache[length, unique]


def _answer_ids(compiled: CompiledProgram, clean_out, cf_out) -> tuple[list[int], list[int]]:
    if compiled.categorical:
        return [compiled.output_values.index(clean_out)], [compiled.output_values.index(cf_out)]
    return [0], []  # numerical: the metric is the output value itself


def make_tracr_task(compiled: CompiledProgram, n: int = 64, seed: int = 0, unique: bool = False,
                    min_len: int = 2, pad_counterfactuals: bool = False) -> PromptPairDataset:
    """`n` clean / counterfactual pairs whose last-position outputs differ. With `pad_counterfactuals`
    each counterfactual is its clean input with the first k tokens turned into PAD."""
    rng = random.Random(seed)
    tok = compiled.tokenizer
    max_len = compiled.max_seq_len
    examples = []
    lengths = list(range(min_len, max_len + 1))
    if pad_counterfactuals:
        vocab = sorted(compiled.vocab, key=str)
        while len(examples) < n:
            clean = [rng.choice(vocab) for _ in range(rng.choice(lengths))]
            k = rng.randrange(1, len(clean))
            y, z = _last_output(compiled, clean), _last_output(compiled, clean[k:])
            if _key(y) != _key(z):
                examples.append(_pair(compiled, clean, [PAD] * k + clean[k:], y, z, max_len))
        return _dataset(compiled, examples, tok)
    pools = {}
    for length in lengths:
        outs = _outputs(compiled, length, unique)
        outs = [(x, y) for x, y in outs if y is not None]
        if len({_key(y) for _, y in outs}) > 1:
            pools[length] = outs
    if not pools:
        raise ValueError(f"{compiled.name}: no input length has more than one output at the last position")
    for _ in range(n):
        length = rng.choice(sorted(pools))
        pool = pools[length]
        clean, y = rng.choice(pool)
        others = [(x, z) for x, z in pool if _key(z) != _key(y)]
        cf, z = rng.choice(others)
        examples.append(_pair(compiled, list(clean), list(cf), y, z, max_len))
    return _dataset(compiled, examples, tok)


def _key(y):
    return round(float(y), 6) if isinstance(y, (int, float, bool)) and not isinstance(y, str) else y


def _pair(compiled: CompiledProgram, clean, cf, clean_out, cf_out, max_len: int) -> PromptPair:
    tok = compiled.tokenizer
    correct, wrong = _answer_ids(compiled, clean_out, cf_out)
    length = len(clean) + 1
    starts = [0] + [min(i, length) for i in range(1, max_len + 1)]
    return PromptPair(clean=tok.encode(clean), counterfactual=tok.encode(cf), correct=correct, wrong=wrong,
                      span_starts=starts, clean_text=" ".join(map(str, clean)), counterfactual_text=" ".join(map(str, cf)),
                      meta={"clean_output": _json_value(clean_out), "counterfactual_output": _json_value(cf_out)})


def _json_value(y):
    return y if isinstance(y, (int, float, str, bool)) or y is None else str(y)


def _dataset(compiled: CompiledProgram, examples, tok) -> PromptPairDataset:
    return PromptPairDataset(examples=examples, schema=schema(compiled.max_seq_len), task=f"tracr-{compiled.name}",
                             metric="logit_diff", model=compiled.model.cfg.model_name,
                             tokenizer=tokenizer_fingerprint(tok), pad_token_id=tok.pad_token_id)

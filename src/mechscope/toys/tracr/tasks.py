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

Inputs: every input of each length while there are at most `max_inputs` of them (|V|^L, or the
arrangements without repeats for `unique`); beyond that, `max_inputs` distinct inputs drawn with the
seed. Inputs on which the RASP program raises (a program defined on part of its input space only)
are dropped and counted; the dataset's `info["inputs"]` says how many inputs there were, how many
were evaluated and dropped, and which lengths were sampled.
"""

from __future__ import annotations

import itertools
import math
import random

from ...data.dataset import PromptPair, PromptPairDataset, Schema, tokenizer_fingerprint
from .compile import PAD, CompiledProgram, TracrError

MAX_INPUTS = 4096  # inputs of one length evaluated at most; more than this are sampled


def schema(max_seq_len: int) -> Schema:
    return Schema(("bos",) + tuple(f"p{i}" for i in range(1, max_seq_len + 1)))


def all_inputs(vocab, length: int, unique: bool = False) -> list[tuple]:
    """Every input of `length` over `vocab` (without repeated tokens when `unique`)."""
    vocab = sorted(vocab, key=str)
    if unique:
        return list(itertools.permutations(vocab, length))
    return list(itertools.product(vocab, repeat=length))


def count_inputs(n_vocab: int, length: int, unique: bool = False) -> int:
    """How many inputs of `length` there are over `n_vocab` values."""
    return math.perm(n_vocab, length) if unique else n_vocab ** length


def nth_input(vocab, length: int, unique: bool, i: int) -> tuple:
    """The `i`-th input of `all_inputs(vocab, length, unique)`, without listing the others."""
    vocab = sorted(vocab, key=str)
    left, out = list(vocab), []
    for j in range(length):
        block = count_inputs(len(left) - 1, length - j - 1, True) if unique else len(vocab) ** (length - j - 1)
        q, i = divmod(i, block)
        out.append(left.pop(q) if unique else vocab[q])
    return tuple(out)


def _last_output(compiled: CompiledProgram, values) -> object:
    return compiled.run_program(values)[-1]


class _Inputs:
    """The inputs a task draws from, and the count of those the RASP program raised on."""

    def __init__(self, compiled: CompiledProgram, seed: int, max_inputs: int):
        self.compiled, self.seed, self.max_inputs = compiled, seed, max_inputs
        self.space = self.evaluated = self.dropped = 0
        self.sampled: list[int] = []

    def output(self, values):
        """The program's last-position output on `values`, or raise _Dropped (counted)."""
        self.evaluated += 1
        try:
            return _last_output(self.compiled, values)
        except Exception:  # noqa: BLE001 - any error of the user's program drops the input
            self.dropped += 1
            raise _Dropped from None

    def pool(self, length: int, unique: bool) -> list[tuple]:
        """(input, last-position output) of every input of `length`, or of `max_inputs` sampled."""
        vocab = self.compiled.vocab
        total = count_inputs(len(vocab), length, unique)
        self.space += total
        if total <= self.max_inputs:
            inputs = all_inputs(vocab, length, unique)
        else:
            self.sampled.append(length)
            rng = random.Random(f"tracr-inputs-{self.seed}-{length}")
            inputs = [nth_input(vocab, length, unique, i) for i in sorted(rng.sample(range(total), self.max_inputs))]
        out = []
        for x in inputs:
            try:
                out.append((x, self.output(x)))
            except _Dropped:
                pass
        return out

    def info(self) -> dict:
        return {"space": self.space, "evaluated": self.evaluated, "dropped": self.dropped,
                "sampled_lengths": self.sampled, "max_inputs": self.max_inputs}


class _Dropped(Exception):
    pass


def _answer_ids(compiled: CompiledProgram, clean_out, cf_out) -> tuple[list[int], list[int]]:
    if compiled.categorical:
        return [compiled.output_values.index(clean_out)], [compiled.output_values.index(cf_out)]
    return [0], []  # numerical: the metric is the output value itself


def make_tracr_task(compiled: CompiledProgram, n: int = 64, seed: int = 0, unique: bool = False,
                    min_len: int = 2, pad_counterfactuals: bool = False,
                    max_inputs: int = MAX_INPUTS) -> PromptPairDataset:
    """`n` clean / counterfactual pairs whose last-position outputs differ. With `pad_counterfactuals`
    each counterfactual is its clean input with the first k tokens turned into PAD. Lengths with more
    than max(`max_inputs`, `n`) inputs are sampled; inputs the program raises on are dropped."""
    rng = random.Random(seed)
    max_len = compiled.max_seq_len
    inputs = _Inputs(compiled, seed, max(max_inputs, n))
    examples = []
    lengths = list(range(min_len, max_len + 1))
    if pad_counterfactuals:  # clean inputs are drawn at random (their suffixes are evaluated too)
        vocab = sorted(compiled.vocab, key=str)
        inputs.space = sum(count_inputs(len(vocab), length) for length in lengths)
        inputs.sampled = list(lengths)
        for _ in range(100 * n + 1000):
            if len(examples) == n:
                break
            clean = [rng.choice(vocab) for _ in range(rng.choice(lengths))]
            k = rng.randrange(1, len(clean))
            try:
                y, z = inputs.output(clean), inputs.output(clean[k:])
            except _Dropped:
                continue
            if y is not None and z is not None and _key(y) != _key(z):
                examples.append(_pair(compiled, clean, [PAD] * k + clean[k:], y, z, max_len))
        if len(examples) < n:
            raise TracrError(f"{compiled.name}: only {len(examples)} of {n} padded counterfactuals change the "
                             f"output ({inputs.dropped} of {inputs.evaluated} inputs raised in the program)")
        return _dataset(compiled, examples, inputs)
    pools = {}
    for length in lengths:
        outs = [(x, y) for x, y in inputs.pool(length, unique) if y is not None]
        if len({_key(y) for _, y in outs}) > 1:
            pools[length] = outs
    if not pools:
        raise TracrError(f"{compiled.name}: no input length has more than one output at the last position "
                         f"({inputs.dropped} of {inputs.evaluated} inputs raised in the program)")
    for _ in range(n):
        length = rng.choice(sorted(pools))
        pool = pools[length]
        clean, y = rng.choice(pool)
        others = [(x, z) for x, z in pool if _key(z) != _key(y)]
        cf, z = rng.choice(others)
        examples.append(_pair(compiled, list(clean), list(cf), y, z, max_len))
    return _dataset(compiled, examples, inputs)


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


def _dataset(compiled: CompiledProgram, examples, inputs: _Inputs) -> PromptPairDataset:
    tok = compiled.tokenizer
    return PromptPairDataset(examples=examples, schema=schema(compiled.max_seq_len), task=f"tracr-{compiled.name}",
                             metric="logit_diff", model=compiled.model.cfg.model_name,
                             tokenizer=tokenizer_fingerprint(tok), pad_token_id=tok.pad_token_id,
                             info={"inputs": inputs.info()})
